"""LLaDA: the bidirectional masked-diffusion transformer behind MMaDA-Parallel.

Module names mirror the reference implementation (``model.transformer.blocks.{i}.q_proj`` …) so that
the state dict of a released checkpoint loads without any key renaming, and what we save loads there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils import ModelOutput

from pararl.models.config import LLaDAConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as LLaDA does (matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, L, head_dim] in float32 for explicit positions (padded rows keep their real positions)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class LLaDABlock(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn_out(attn(attn_norm(x)))``, then ``x + ff_out(silu(ff_proj) * up_proj)``."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, hd
        self.rope_theta = config.rope_theta
        bias, qkv_bias = config.include_bias, config.include_bias or config.include_qkv_bias
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_proj = nn.Linear(d, config.ffn_hidden_size, bias=bias)
        self.up_proj = nn.Linear(d, config.ffn_hidden_size, bias=bias)
        self.ff_out = nn.Linear(config.ffn_hidden_size, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, sink: list | None = None,
                keep: int = 0) -> torch.Tensor:
        """``past``: keys and values of positions before ``x`` (a prefix cache), attended to as if they
        were in the sequence; ``sink`` receives this layer's keys and values of the first ``keep`` positions."""
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if sink is not None:
            sink.append((k[:, :, :keep], v[:, :, :keep]))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # GQA: key/value head j serves the consecutive query heads j*g … j*g+g-1 (enable_gqa's grouping).
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=self.n_kv_heads != self.n_heads
        )
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """Holds ``transformer`` as a ModuleDict, which is what puts the reference key names in the state dict."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        modules = {
            "wte": nn.Embedding(config.output_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        }
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.output_size, bias=config.include_bias)
        self.transformer = nn.ModuleDict(modules)
        self.config = config

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        heads: Sequence[tuple[slice, slice]] | None = None, prefix: PrefixCache | None = None, keep_prefix: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """With ``prefix``, ``input_ids`` are the positions after the cached ones (``attention_mask`` still
        spans the whole sequence) and ``heads`` index them. ``keep_prefix``: also return the cache of the
        first ``keep_prefix`` positions, as (logits, cache)."""
        t, cfg = self.transformer, self.config
        x = t.wte(input_ids)
        if getattr(cfg, "input_emb_norm", False):  # the reference scales embeddings by sqrt(d_model)
            x = x * (cfg.d_model**0.5)
        start = 0 if prefix is None else prefix.length
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                # Left padding must not shift a prompt's positions: count only real tokens.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
        cos, sin = rope_cos_sin(position_ids, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        sink = [] if keep_prefix else None
        for i, block in enumerate(t.blocks):
            past = None if prefix is None else (prefix.keys[i], prefix.values[i])
            x = block(x, cos, sin, mask, past, sink, keep_prefix)
        x = t.ln_f(x)
        out = self.head(x, slice(None)) if heads is None else tuple(self.head(x[:, p], vocab) for p, vocab in heads)
        if sink is None:
            return out
        return out, PrefixCache(keep_prefix, [k for k, _ in sink], [v for _, v in sink])

    def head(self, x: torch.Tensor, vocab: slice) -> torch.Tensor:
        """Logits over the ids ``vocab``: the head's rows for those ids only, so the rest is never computed."""
        t, cfg = self.transformer, self.config
        weight = t.wte.weight if cfg.weight_tying else t.ff_out.weight
        bias = None if cfg.weight_tying or t.ff_out.bias is None else t.ff_out.bias[vocab]
        logits = F.linear(x, weight[vocab], bias)
        if getattr(cfg, "scale_logits", False):  # and divides the logits by it
            logits = logits * (1 / math.sqrt(cfg.d_model))
        return logits


@dataclass
class HeadsOutput(ModelOutput):
    """``heads[i]``: logits [B, positions_i, vocab_i] of the i-th (positions, vocab) pair asked for;
    ``prefix``: the prefix cache, when asked to keep one."""

    heads: tuple[torch.Tensor, ...] | None = None
    prefix: PrefixCache | None = None


@dataclass
class PrefixCache:
    """Every layer's keys and values [B, kv_heads, length, head_dim] of the first ``length`` positions,
    from the forward that refreshed it. A bidirectional model's prefix keys move as the rest of the
    sequence changes, so a forward that reuses them is an approximation (``sampler.prompt_cache_refresh``)."""

    length: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class LLaDAModelLM(PreTrainedModel):
    """The policy: ``forward(input_ids, attention_mask=None)`` gives ``.logits`` [B, L, embedding_size];
    with ``heads`` (pairs of position and id slices, ``pararl.heads``) only those blocks, as ``.heads``."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "init_std", 0.02) or 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        heads: Sequence[tuple[slice, slice]] | None = None,
        prefix: PrefixCache | None = None,
        keep_prefix: int = 0,
        **_: object,
    ) -> MaskedLMOutput | HeadsOutput:
        if heads is None:
            if prefix is not None or keep_prefix:
                raise ValueError("a prefix cache is read and kept only with span heads (heads=...)")
            return MaskedLMOutput(logits=self.model(input_ids, attention_mask, position_ids))
        out = self.model(input_ids, attention_mask, position_ids, heads, prefix, keep_prefix)
        return HeadsOutput(heads=out[0], prefix=out[1]) if keep_prefix else HeadsOutput(heads=out)
