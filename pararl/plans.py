"""Which tokens of a trajectory an iteration scores: the plans behind the log-probability estimators.

The plan of an iteration is drawn once (by the driver, from the learner's config) and shipped with
the batch, so the rollout worker's pi_old and the learner's old, current and reference log-probs all
score the same tokens: a trace plan names the replayed step windows, a random-mask plan the seed of
its masks (``pararl.logprobs`` computes them).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Union

import torch

from pararl import noise
from pararl.guidance import Scoring
from pararl.seeds import derive

MASK_RATIO_STREAM, MASK_POSITION_STREAM = 11, 12  # counter-based noise streams (pararl.noise) of the random mask
MASK_UPDATE_STRIDE = 1 << 20  # an inner update's mask counter: derive(plan seed, update)
MASK_STRUCTURES = ("uniform", "stratified")


@dataclass(frozen=True)
class TracePlan:
    """Replay windows ``[k, k + merge)`` for each k in ``steps`` (sorted, non-overlapping).

    ``scoring``: score under the distribution the rollout drew from (its guidance, with the
    unconditional rows replayed, and its temperatures) instead of the unguided policy at temperature 1.
    Part of the plan so that behaviour, old, current and reference log-probs are one distribution.
    """

    steps: tuple[int, ...]
    merge: int = 1
    scoring: Scoring | None = None
    estimator: str = field(default="trace", init=False)

    def windows(self, total_steps: int) -> list[tuple[int, int]]:
        steps = sorted(int(s) for s in self.steps)
        if not steps:
            raise ValueError("trace plan has no sampled steps: nothing would be scored")
        if self.merge < 1:
            raise ValueError(f"merge={self.merge} must be >= 1")
        if len(set(steps)) != len(steps):
            raise ValueError(f"sampled steps {steps} repeat a step: its tokens would be scored twice")
        if steps[0] < 0 or steps[-1] >= total_steps:
            raise ValueError(f"sampled steps {steps} must lie in [0, {total_steps}) (the trajectories' step count)")
        wins = [(k, min(k + self.merge, total_steps)) for k in steps]
        for (a, b), (c, _) in zip(wins, wins[1:]):
            if c < b:
                raise ValueError(f"merged windows [{a}, {b}) and [{c}, ...) overlap (merge={self.merge}): tokens would be scored twice")
        return wins


@dataclass(frozen=True)
class RandomMaskPlan:
    """A random mask per trajectory: ratio t in [ratio_min, ratio_max], positions masked w.p. t; the
    prompt is never masked.

    ``structure``: ``uniform`` draws t ~ U(min, max) once per iteration, and every inner update of the
    batch scores the same mask. ``stratified`` is UniGRPO's structured masking: a batch's ``updates``
    inner updates each get their own mask, and a trajectory's ratios are spread over them, one in
    each of ``updates`` equal strata of [min, max] (a shared offset per trajectory), so the updates of
    one batch together see it from lightly to heavily masked. ``update`` picks one update's mask.
    """

    seed: int
    ratio_min: float = 0.05
    ratio_max: float = 1.0
    structure: str = "uniform"
    updates: int = 1
    update: int = 0
    estimator: str = field(default="random_mask", init=False)

    def per_update(self) -> tuple["RandomMaskPlan", ...]:
        """The plan of each inner update: one for ``uniform`` (every update shares it)."""
        if self.structure == "uniform":
            return (self,)
        return tuple(replace(self, update=u) for u in range(self.updates))

    def draw(self, seeds: torch.Tensor, scoreable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [R, N] bool, ratio t [R]): depends only on (plan seed, update, trajectory seed), never on the batch.

        A row whose draw masks nothing gets its lowest-noise scoreable position, so every trajectory is scored.
        """
        if not 0 < self.ratio_min <= self.ratio_max <= 1:
            raise ValueError(f"mask ratios [{self.ratio_min}, {self.ratio_max}] must satisfy 0 < min <= max <= 1")
        if self.structure not in MASK_STRUCTURES or not 0 <= self.update < self.updates:
            raise ValueError(f"mask structure {self.structure!r} (known: {', '.join(MASK_STRUCTURES)}), update "
                             f"{self.update} of {self.updates}")
        seeds = seeds.to(scoreable.device)
        u = noise.uniform(seeds, MASK_RATIO_STREAM, self.seed, 1)[:, 0]
        if self.structure == "stratified":
            u = (self.update + u) / self.updates
        ratio = self.ratio_min + (self.ratio_max - self.ratio_min) * u
        counter = self.seed if self.update == 0 else derive(self.seed, self.update, MASK_UPDATE_STRIDE)
        pos = noise.uniform(seeds, MASK_POSITION_STREAM, counter, scoreable.shape[1]).masked_fill(~scoreable, 2.0)
        mask = (pos < ratio[:, None]) & scoreable
        first = torch.zeros_like(mask).scatter_(1, pos.argmin(1, keepdim=True), True) & scoreable
        mask |= first & ~mask.any(1, keepdim=True)
        return mask, ratio


Plan = Union[TracePlan, RandomMaskPlan]


def update_plans(plan: Plan) -> tuple[Plan, ...]:
    """The plan of each inner update of a batch: one shared plan, or one mask per update (stratified)."""
    return plan.per_update() if isinstance(plan, RandomMaskPlan) else (plan,)


def sample_trace_plan(total_steps: int, sampled: int, merge: int = 1, seed: int = 0,
                      scoring: Scoring | None = None) -> TracePlan:
    """Windows for one iteration: the steps cut into consecutive blocks of ``merge``, ``sampled`` of them at
    random (0: all). Aligned blocks never overlap, and with ``sampled=0`` every step is scored once."""
    if total_steps < 1 or merge < 1 or sampled < 0:
        raise ValueError(f"total_steps={total_steps}, merge={merge} must be >= 1 and sampled={sampled} >= 0")
    starts = list(range(0, total_steps, merge))
    if sampled and sampled < len(starts):
        starts = sorted(random.Random(seed).sample(starts, sampled))
    return TracePlan(tuple(starts), merge, scoring)


def make_plan(estimator: str, total_steps: int, seed: int, sampled: int = 0, merge: int = 1,
              ratio_min: float = 0.05, ratio_max: float = 1.0, scoring: Scoring | None = None,
              structure: str = "uniform", updates: int = 1) -> Plan:
    """The plan of one iteration from config values (the driver calls this once and ships it with the batch)."""
    if estimator == "trace":
        return sample_trace_plan(total_steps, sampled, merge, seed, scoring)
    if estimator == "random_mask" and scoring is not None:
        raise ValueError("the random-mask estimator scores states no sampler step saw: it cannot score under the "
                         "rollout's guidance (use the trace estimator)")
    if estimator == "random_mask":
        return RandomMaskPlan(seed, ratio_min, ratio_max, structure, updates if structure == "stratified" else 1)
    raise ValueError(f"unknown log-probability estimator {estimator!r}; known: random_mask, trace")
