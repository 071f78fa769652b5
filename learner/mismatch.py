"""The gap between the distribution a rollout sampled from and the one the learner scores.

Rollouts draw each token from CFG-guided, tempered logits (call that distribution mu); the behaviour
log-probs pi_old and the learner's pi_theta are the unguided policy at temperature 1. The clipped
ratio pi_theta / pi_old then starts at exactly 1 and never sees the gap, and the KL estimators
assume samples from pi_theta that were drawn from mu. This module measures the gap per token, from
the log-probabilities the sampler recorded as it drew (``Trajectories.sampled_logp``), and offers
the two corrections in use for it: truncated importance sampling (TIS: each token's policy-gradient
term weighted by min(pi_old / mu, cap)) and masked importance sampling (MIS: the weight pi_old / mu,
and tokens above the cap dropped). With no guidance and temperature 1, mu is pi_old and every weight is 1.
"""
from __future__ import annotations

import torch

from learner.loss import k3
from pararl.formats import OutputLayout

CORRECTIONS = ("none", "tis", "mis")
GAP_KEYS = ("text_abs", "text_n", "image_abs", "image_n", "kl", "truncated", "n")


def correction_weights(old_logp: torch.Tensor, sampled_logp: torch.Tensor, mask: torch.Tensor, kind: str,
                       cap: float) -> torch.Tensor:
    """[R, N] detached per-token weights on the policy-gradient term (1 outside ``mask``)."""
    if kind not in CORRECTIONS:
        raise ValueError(f"unknown correction {kind!r}; known: {', '.join(CORRECTIONS)}")
    ratio = torch.where(mask, old_logp.detach() - sampled_logp, torch.zeros_like(old_logp)).exp()
    if kind == "none":
        return torch.ones_like(ratio)
    weight = ratio.clamp(max=cap) if kind == "tis" else torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))
    return torch.where(mask, weight, torch.ones_like(weight))


def gap_sums(old_logp: torch.Tensor, sampled_logp: torch.Tensor, mask: torch.Tensor, layout: OutputLayout,
             cap: float) -> torch.Tensor:
    """Sums (``GAP_KEYS``) over the scored tokens, so they reduce across ranks by addition.

    ``kl`` is k3 of KL(mu || pi_old) on samples from mu: with d = log pi_old - log mu, exp(d) - d - 1
    (non-negative, unbiased). ``truncated`` counts the ratios above ``cap``.
    """
    d = torch.where(mask, old_logp.detach() - sampled_logp, torch.zeros_like(old_logp)).double()
    text = torch.zeros_like(mask)
    text[:, layout.relative(layout.text)] = True
    text &= mask
    image = mask & ~text
    return torch.stack([d.abs()[text].sum(), text.sum().double(), d.abs()[image].sum(), image.sum().double(),
                        k3(d)[mask].sum(), (d.exp() > cap)[mask].sum().double(), mask.sum().double()])


def gap_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Per-token means: the |log pi_old - log mu| gap of text and image apart, the KL, the truncated share."""
    s = dict(zip(GAP_KEYS, (float(v) for v in sums)))
    return {"mismatch/text_gap": s["text_abs"] / max(s["text_n"], 1.0), "mismatch/image_gap": s["image_abs"] / max(s["image_n"], 1.0),
            "mismatch/kl": s["kl"] / max(s["n"], 1.0), "mismatch/truncated": s["truncated"] / max(s["n"], 1.0)}
