"""ParaRL's semantic reward: standardise a CLIP score with training-data statistics, clip, average.

``R_t = clip(1/2 + (CLIP(img_t, text_t) - mean) / (2 Z), 0, 1)``, and a trajectory's reward is the
mean of R_t over its sampled steps. Standardising maps a typical score to 1/2 and one standard
deviation to +-1/2, so rewards of different CLIP models share a scale and can be combined.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from pararl.errors import ConfigError


def standardise(scores: torch.Tensor, mean: float, z: float) -> torch.Tensor:
    if not z > 0:
        raise ConfigError(f"the statistics' Z (std) must be positive, got {z}")
    return (0.5 + (scores - mean) / (2 * z)).clamp(0.0, 1.0)


def trajectory_reward(r_t: torch.Tensor) -> torch.Tensor:
    """[R, s] step rewards -> [R] trajectory rewards (a non-finite step makes the trajectory non-finite)."""
    return r_t.mean(-1)


def choose_steps(total_steps: int, count: int, include_final: bool, mode: str, rng: random.Random,
                 first: float = 0.0) -> list[int]:
    """Which denoising steps get snapshots and scores: sparse on purpose, scoring all is too costly.

    ``first`` (a share of the trajectory) is the earliest step that may be drawn: in the first steps
    almost every token is masked and the score of a nearly empty text says little about the trajectory.
    """
    if count < 1:
        raise ConfigError("sampled_steps must be >= 1")
    if not 0.0 <= first < 1.0:
        raise ConfigError(f"first_step must be in [0, 1), got {first}")
    lo = int(first * total_steps)
    last = total_steps - 1 if include_final else total_steps - 2
    if count > last - lo + 1:
        raise ConfigError(f"sampled_steps {count} exceed the {max(0, last - lo + 1)} denoising steps that can be sampled"
                         f" (steps {lo}..{last})")
    if mode == "uniform":  # evenly spaced, ending at the last available step
        return [last] if count == 1 else [lo + round(i * (last - lo) / (count - 1)) for i in range(count)]
    if mode != "random":
        raise ConfigError(f"step_sampling must be 'random' or 'uniform', got {mode!r}")
    final = [total_steps - 1] if include_final else []
    return sorted(rng.sample(range(lo, total_steps - 1), count - len(final)) + final)


def run_steps(cfg, total_steps: int, rng: random.Random) -> list[int]:
    """The sampled steps of one iteration as a ``RewardConfig`` asks for them."""
    return choose_steps(total_steps, cfg.sampled_steps, cfg.include_final, cfg.step_sampling, rng, cfg.first_step)


def clipped_shares(r_t: torch.Tensor) -> tuple[float, float]:
    """Shares of finite R_t at exactly 0 and 1: if most are clipped, the stats do not fit the steps."""
    finite = r_t[torch.isfinite(r_t)]
    if not finite.numel():
        return 0.0, 0.0
    return float((finite == 0).float().mean()), float((finite == 1).float().mean())


def combine(per_model: dict[str, torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum of each reward model's R_t (weights as configured, not renormalised)."""
    total = None
    for values, w in zip(per_model.values(), weights):
        total = values * w if total is None else total + values * w
    return total
