"""The output heads: logits only where the sampler and the learner read them.

A forward over a prompt and its output is read at the output positions only, and a position only
ever draws from its span's ids: a text position from the text vocabulary (every id with the
releases' ``text_vocab: all``), an image position from the codebook. At the 8B shapes the full head
is 134,656 ids at every one of ~2.5k positions; these blocks are a small part of it. Each block is
the full head's slice to float rounding (the matrix kernel sums a smaller matrix's dot products in
its own order on some CPUs), so sampling through them changes no token and scoring moves a log-prob
by a few units in the last place (``tests/test_heads.py``).

A policy whose forward does not take ``heads`` (a wrapper, a user's model) still works: its full
logits are sliced here instead.
"""
from __future__ import annotations

import inspect

import torch

from pararl.formats import OutputLayout, ParallelFormat


def text_ids(fmt: ParallelFormat) -> slice:
    """The ids a text position may draw before the format's masking (``fmt.restrict_text_logits``)."""
    return slice(0, None) if fmt.text_vocab == "all" else slice(0, fmt.text_vocab_size)


def image_ids(fmt: ParallelFormat) -> slice:
    return slice(fmt.image_offset, fmt.image_offset + fmt.codebook_size)


def span_heads(fmt: ParallelFormat, lay: OutputLayout, spans: tuple[str, ...] = ("text", "image")) -> list[tuple[slice, slice]]:
    """(positions, ids) of each span asked for, in order."""
    table = {"text": (lay.text, text_ids(fmt)), "image": (lay.image, image_ids(fmt))}
    return [table[name] for name in spans]


def span_forward(policy: torch.nn.Module, fmt: ParallelFormat, lay: OutputLayout, inputs: torch.Tensor,
                 attention_mask: torch.Tensor | None, spans: tuple[str, ...] = ("text", "image")) -> list[torch.Tensor]:
    """One forward; each span's logits [B, positions, ids]: text over ``text_ids`` (unmasked: guidance
    acts on these, then ``fmt.restrict_text_logits``), image over the codebook (index c is code c)."""
    heads = span_heads(fmt, lay, spans)
    if takes_heads(policy):
        out = policy(inputs, attention_mask=attention_mask, heads=heads)
    else:
        out = policy(inputs, attention_mask=attention_mask)
    if getattr(out, "heads", None) is not None:
        return list(out.heads)
    return [out.logits[:, positions, ids] for positions, ids in heads]  # no head support: slice the full logits


def takes_heads(policy: torch.nn.Module) -> bool:
    """Whether ``policy``'s forward accepts ``heads`` (by name, or through ``**kwargs`` as DeepSpeed's engine)."""
    params = inspect.signature(policy.forward).parameters.values()
    return any(p.name == "heads" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def cached_span_forward(policy: torch.nn.Module, fmt: ParallelFormat, lay: OutputLayout, inputs: torch.Tensor,
                        attention_mask: torch.Tensor | None, cache, refresh: bool) -> tuple[list[torch.Tensor], object]:
    """``span_forward`` with the prompt cache: a refresh runs every position and keeps the keys and values
    of those before the output (``lay.output_start``); otherwise the transformer runs on the output
    positions only, attending to the kept ones. Returns (span logits, the cache to use next)."""
    start = lay.output_start
    if not takes_heads(policy):
        raise ValueError("sampler.prompt_cache_refresh > 1 needs a policy whose forward takes heads and a prefix "
                         "cache (pararl.models.LLaDAModelLM)")
    if refresh or cache is None:
        out = policy(inputs, attention_mask=attention_mask, heads=span_heads(fmt, lay), keep_prefix=start)
        return list(out.heads), out.prefix
    shifted = [(slice(p.start - start, p.stop - start), ids) for p, ids in span_heads(fmt, lay)]
    out = policy(inputs[:, start:], attention_mask=attention_mask, heads=shifted, prefix=cache)
    return list(out.heads), cache


class FullHead(torch.nn.Module):
    """``policy`` through a forward that knows no span heads: every position over every id, sliced by
    ``span_forward`` afterwards. The reference the span heads are measured against (tests, bench)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.policy(input_ids, attention_mask=attention_mask)
