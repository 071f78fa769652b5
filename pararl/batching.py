"""Turn requests of different lengths into one left-padded batch with aligned output spans.

Left padding puts every row's output region in the same columns, so spans are plain slices and the
sampler never loops over rows; the attention mask (and position ids derived from it) make padding
invisible to the model. What an unconditional (CFG) row holds is the format's choice
(``fmt.unconditional``); the image span's length is ``fmt.image_span_len`` (codes plus any fixed
structural positions such as row newlines).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pararl.formats import OutputLayout, ParallelFormat
from pararl.tasks import IMAGE, TEXT, one_family, task_of
from pararl.types import GenerationRequest


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, L] conditional sequences with masked outputs
    uncond_ids: torch.Tensor  # [B, L] the same with the prompt blanked (CFG; -A: its uncond_text row)
    attention_mask: torch.Tensor  # [B, L]
    layout: OutputLayout
    uncond_image_ids: torch.Tensor | None = None  # [B, L] -A's second row (uncond_img), when asked for


def build_batch(
    fmt: ParallelFormat, requests: Sequence[GenerationRequest], text_len: int, drop_input_image: bool = False,
    released_rows: bool = False,
) -> PromptBatch:
    """Requests of one task family (their output spans must agree). ``released_rows``: the released -A
    generator's two unconditional rows (``fmt.released_unconditional``) instead of the format's one."""
    if not requests:
        raise ValueError("no requests to sample")
    outputs = one_family([task_of(r.task, r.input_codes is not None) for r in requests])
    prompts = [fmt.encode_prompt(r.prompt_ids, r.input_codes, r.task) for r in requests]
    output, image_off, text_off = fmt.output_ids(text_len, outputs)
    width = max(len(p.ids) for p in prompts)
    length = width + len(output)
    ids = torch.full((len(prompts), length), fmt.pad_id, dtype=torch.long)
    uncond = ids.clone()
    uncond_image = ids.clone() if released_rows else None
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    out = torch.tensor(output)
    for row, p in enumerate(prompts):  # building token lists, once per call: not the sampling loop
        start = width - len(p.ids)
        ids[row, start:width] = torch.tensor(p.ids)
        if released_rows:
            if not hasattr(fmt, "released_unconditional"):
                raise ValueError(f"format {fmt.name!r} has no released two-row guidance (only the -A format has)")
            u_text, u_img = fmt.released_unconditional(p)
            uncond[row, start:width] = torch.tensor(u_text)
            uncond_image[row, start:width] = torch.tensor(u_img)
        else:
            uncond[row, start:width] = torch.tensor(fmt.unconditional(p, drop_input_image))
        mask[row, start:] = 1
    for t in (ids, uncond, uncond_image):
        if t is not None:
            t[:, width:] = out
    image_len, text_len = (fmt.image_span_len if IMAGE in outputs else 0), (text_len if TEXT in outputs else 0)
    layout = OutputLayout(length, width, width + image_off, image_len, width + text_off, text_len)
    return PromptBatch(ids, uncond, mask, layout, uncond_image)
