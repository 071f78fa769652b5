"""Group-relative advantages: one value per trajectory, from the rewards of its group.

ParaRL (like GRPO) has no value function: a trajectory is good or bad relative to the other samples
of the same prompt. Estimators are registered by name so a run's config can swap them, and all of
them are vectorised over groups (scatter sums), never a Python loop over groups.

A group whose rewards are all equal teaches nothing (every advantage is zero); such groups are
counted, and optionally dropped, so a run can see when its reward has saturated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pararl.registry import Registry

AdvantageFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# fn(rewards [R], group [R] (0..G-1), eps) -> advantages [R]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGE_ESTIMATORS.register


def group_stats(rewards: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-trajectory (group mean, group population std, group size), broadcast back to each trajectory."""
    n_groups = int(group.max()) + 1
    r = rewards.double()
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, r) / count
    dev = r - mean[group]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group, dev * dev) / count
    return mean[group], var.sqrt()[group], count[group]


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, group: torch.Tensor, eps: float) -> torch.Tensor:
    """``(R_i - mean_G) / (std_G + eps)`` with the POPULATION std (unbiased=False, divide by G).

    The population std is defined for groups of one and gives advantages whose group variance is
    (almost) exactly 1; the paper does not say which std it uses.
    """
    mean, std, _ = group_stats(rewards, group)
    return ((rewards.double() - mean) / (std + eps)).to(rewards.dtype)


@register_advantage("drgrpo")
def drgrpo(rewards: torch.Tensor, group: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr. GRPO: ``R_i - mean_G``, no division by the std (which up-weights near-constant groups)."""
    mean, _, _ = group_stats(rewards, group)
    return (rewards.double() - mean).to(rewards.dtype)


@dataclass
class Advantages:
    values: torch.Tensor  # [R] one advantage per trajectory (zero in constant groups)
    keep: torch.Tensor  # [R] bool: trajectories to train on (all, unless constant groups are dropped)
    constant_groups: int  # groups whose rewards are all equal
    groups: int


def compute_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    estimator: str = "grpo",
    eps: float = 1e-6,
    drop_constant_groups: bool = False,
) -> Advantages:
    """Advantages of trajectories ``r`` whose group is ``group[r]`` (any integer ids, e.g. prompt indices)."""
    ADVANTAGE_ESTIMATORS.check(estimator, "learner.advantage")
    rewards = torch.as_tensor(rewards)
    group = torch.as_tensor(group).long()
    if rewards.ndim != 1 or group.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group {tuple(group.shape)} must be equal 1-d shapes")
    if not rewards.numel():
        raise ValueError("no rewards: an empty batch has no advantages")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"non-finite rewards at trajectories {bad[:8]}: the reward service returned NaN/inf")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    _, dense = torch.unique(group, return_inverse=True)
    n_groups = int(dense.max()) + 1
    lo = torch.full((n_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, dense, rewards.double(), "amin")
    hi = torch.full((n_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, dense, rewards.double(), "amax")
    constant = lo == hi  # exact: equal floats, not "nearly equal"
    values = ADVANTAGE_ESTIMATORS[estimator](rewards, dense, eps)
    values = torch.where(constant[dense], torch.zeros_like(values), values)
    keep = ~constant[dense] if drop_constant_groups else torch.ones_like(dense, dtype=torch.bool)
    return Advantages(values, keep, int(constant.sum()), n_groups)
