"""The ParaRL objective: a clipped surrogate per token, minus beta times a KL estimate, aggregated by config.

Per scored token of trajectory i: ``ratio = exp(logp - logp_old)``,
``pg = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)`` and ``kl = k(logp_ref - logp)``.
The per-token terms are combined with coefficients ``c`` that encode the aggregation:

- token: ``c = w / T`` with T the number of scored tokens in the whole optimizer step;
- sequence: ``c = w / (n_i * S)`` with n_i the trajectory's scored tokens and S the trajectories in the step;
- row: ``c = w / (n_ik * P)`` with n_ik the tokens trajectory i reveals in replay window k and P the
  (trajectory, window) rows with a scored token in the step: TraceRL's mean over its replayed rows,
  so a window that reveals few tokens (an early step's text) weighs as much as one that reveals many,

where w is the estimator's token weight (1 for trace replay, 1/t for random masking). T and S are
counted over the whole optimizer step (all micro-batches and all ranks), so the sum of the pieces
computed per micro-batch and per rank is exactly the loss of the full batch: splitting a batch over
ranks or micro-batches does not change the update.

Statistics are kept as sums, minima and maxima so they reduce across micro-batches and ranks the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pararl.formats import OutputLayout
from pararl.registry import Registry

KLFn = Callable[[torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")  # fn(d) -> per-token KL estimate, d = logp_ref - logp
register_kl = KL_ESTIMATORS.register


@register_kl("k1")
def k1(d: torch.Tensor) -> torch.Tensor:
    """``-d``: unbiased, high variance, can be negative per token."""
    return -d


@register_kl("k2")
def k2(d: torch.Tensor) -> torch.Tensor:
    """``d^2 / 2``: low variance, biased."""
    return d * d / 2


@register_kl("k3")
def k3(d: torch.Tensor) -> torch.Tensor:
    """``exp(d) - d - 1``: unbiased and non-negative (Schulman's estimator, used by GRPO and UniGRPO)."""
    return torch.expm1(d) - d


AGGREGATIONS = ("token", "sequence", "row")


@dataclass(frozen=True)
class LossSettings:
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token"

    def __post_init__(self) -> None:
        KL_ESTIMATORS.check(self.kl_estimator, "learner.kl_estimator")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; known: {', '.join(sorted(AGGREGATIONS))}")

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        return cls(cfg.eps_low, cfg.eps_high, cfg.beta, cfg.kl_estimator, cfg.aggregation)


@dataclass(frozen=True)
class Normalizer:
    """Denominators of one optimizer step, counted over all its micro-batches and ranks."""

    tokens: float  # scored tokens
    sequences: float  # trajectories
    rows: float = 0.0  # (trajectory, replay window) rows with a scored token: the row aggregation's


def row_sizes(mask: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """[R, W] scored tokens of each (trajectory, window) row; ``window`` as ``pararl.logprobs.window_index``."""
    idx = torch.where(mask, window, 0).clamp_min(0)
    width = int(idx.max()) + 1 if idx.numel() else 1
    return torch.zeros(mask.shape[0], width, dtype=torch.float64, device=mask.device).scatter_add_(1, idx, mask.double())


def coefficients(mask: torch.Tensor, weight: torch.Tensor, aggregation: str, norm: Normalizer,
                 window: torch.Tensor | None = None) -> torch.Tensor:
    """[R, N] per-token coefficients c: the loss is ``sum(c * per_token_term)``."""
    w = torch.where(mask, weight, torch.zeros_like(weight))
    if aggregation == "token":
        return w / norm.tokens
    if aggregation == "sequence":
        per_seq = mask.sum(-1, keepdim=True).clamp_min(1)
        return w / (per_seq * norm.sequences)
    if window is None:
        raise ValueError("the row aggregation needs each token's replay window")
    sizes = row_sizes(mask, window).gather(1, torch.where(mask, window, 0).clamp_min(0)).to(w.dtype)
    return w / (sizes.clamp_min(1) * norm.rows)


def modality_weights(layout: OutputLayout, text: float, image: float) -> torch.Tensor:
    """[N] per output column: ``text`` on the text positions, ``image`` on the image span's."""
    w = torch.ones(layout.length - layout.output_start)
    w[layout.relative(layout.text)] = text
    w[layout.relative(layout.image)] = image
    return w


SUM_KEYS = ("loss", "pg_loss", "kl", "tokens", "clipped", "ratio_sum", "entropy_sum", "sequences")


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    settings: LossSettings,
    norm: Normalizer,
    entropy: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    pg_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats) for per-token tensors [R, N] and advantages [R].

    ``ref_logp`` is the KL anchor (frozen reference, or pi_old when the run says so); None or beta = 0
    drops the KL term. ``window`` [R, N] (the row aggregation's) names each token's replay window.
    ``pg_weight`` [R, N] multiplies the policy-gradient term only (a sampling correction, ``learner.mismatch``).
    ``stats`` holds sums (see ``SUM_KEYS``) plus ``ratio_min`` / ``ratio_max``.
    """
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match {logp.shape[0]} trajectories")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask), ("weight", weight)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match logp {tuple(logp.shape)}")
    c = coefficients(mask, weight, settings.aggregation, norm, window)
    adv = advantages.to(logp.dtype)[:, None]
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - settings.eps_low, 1 + settings.eps_high)
    pg = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if pg_weight is not None:
        pg = pg * pg_weight.detach()
    loss_terms = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None and settings.beta > 0:
        d = torch.where(mask, ref_logp - logp, torch.zeros_like(logp))
        kl = KL_ESTIMATORS[settings.kl_estimator](d)
        loss_terms = pg + settings.beta * kl
    loss = (c * loss_terms).sum()

    with torch.no_grad():
        r = ratio.detach()
        clipped = mask & (((adv > 0) & (r > 1 + settings.eps_high)) | ((adv < 0) & (r < 1 - settings.eps_low)))
        big = torch.finfo(r.dtype).max
        stats = {
            "loss": loss.detach(),
            "pg_loss": (c * pg).sum().detach(),
            "kl": (c * kl).sum().detach(),
            "tokens": mask.sum().to(r.dtype),
            "clipped": clipped.sum().to(r.dtype),
            "ratio_sum": torch.where(mask, r, 0.0).sum(),
            "entropy_sum": torch.where(mask, entropy, 0.0).sum() if entropy is not None else r.new_zeros(()),
            "sequences": r.new_tensor(float(logp.shape[0])),
            "ratio_min": torch.where(mask, r, big).min(),
            "ratio_max": torch.where(mask, r, -big).max(),
        }
    return loss, stats


def merge_stats(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Combine two stats dicts (micro-batches): sums add, extremes take min / max."""
    if a is None:
        return dict(b)
    out = {k: a[k] + b[k] for k in SUM_KEYS}
    out["ratio_min"] = torch.minimum(a["ratio_min"], b["ratio_min"])
    out["ratio_max"] = torch.maximum(a["ratio_max"], b["ratio_max"])
    return out


def summarize(stats: dict[str, torch.Tensor], steps: int = 1) -> dict[str, float]:
    """Readable metrics; loss, pg_loss and kl are per optimizer step (averaged over ``steps``)."""
    tokens = float(stats["tokens"]) or 1.0
    return {
        "loss": float(stats["loss"]) / steps,
        "pg_loss": float(stats["pg_loss"]) / steps,
        "kl": float(stats["kl"]) / steps,
        "clip_fraction": float(stats["clipped"]) / tokens,
        "entropy": float(stats["entropy_sum"]) / tokens,
        "ratio_mean": float(stats["ratio_sum"]) / tokens,
        "ratio_min": float(stats["ratio_min"]),
        "ratio_max": float(stats["ratio_max"]),
        "tokens": float(stats["tokens"]),
    }
