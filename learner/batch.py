"""What the driver hands the learner group: trajectories, their advantages, the iteration's plan, pi_old.

The plan (which steps are replayed, or which random mask) travels with the batch because the
behaviour log-probs were computed with it on the rollout workers: the learner must score exactly
the same tokens, or the ratio compares different things. The batch splits into contiguous shards,
one per learner rank, without copying models or anything but tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from pararl.formats import OutputLayout
from pararl.guidance import Scoring
from pararl.logprobs import TokenLogProbs
from pararl.plans import Plan, update_plans
from pararl.types import Trajectories

ROW_FIELDS = ("tokens", "attention_mask", "step_map", "seeds", "advantages", "row_weight")
OPTIONAL_ROW_FIELDS = ("sampled", "guidance_rows")  # None when the rollout did not record them


@dataclass
class TrainBatch:
    tokens: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, L]
    step_map: torch.Tensor  # [R, L]
    seeds: torch.Tensor  # [R] per-trajectory seeds (the random-mask estimator hashes them)
    advantages: torch.Tensor  # [R]
    layout: OutputLayout
    steps: int
    plan: Plan
    old: TokenLogProbs | None = None  # behaviour log-probs (pi_old); None: computed by the learner before updating
    policy_version: int = 0
    # [R] 1 for a trajectory that trains, 0 for a copy that only pads the batch to whole optimizer steps
    # (so no usable trajectory is cut): its tokens count in no loss and no denominator.
    row_weight: torch.Tensor | None = None
    # [R, L_out] each output token's log-probability under the distribution the rollout drew it from
    # (``Trajectories.sampled_logp``); None when the sampler did not record it
    sampled: torch.Tensor | None = None
    # [R, U, L] the unconditional rows' prompts (``Trajectories.guidance_rows``): what a plan that scores
    # under the rollout's guidance replays beside each trajectory
    guidance_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.row_weight is None:
            self.row_weight = torch.ones(self.tokens.shape[0], dtype=torch.float32)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def from_trajectories(cls, tr: Trajectories, advantages: torch.Tensor, plan: Plan,
                          old: TokenLogProbs | None = None) -> "TrainBatch":
        batch = cls(tr.tokens, tr.attention_mask, tr.step_map, tr.seeds, torch.as_tensor(advantages, dtype=torch.float32),
                    tr.layout, tr.steps, plan, old, tr.policy_version, sampled=tr.sampled_logp,
                    guidance_rows=tr.guidance_rows)
        batch.validate()
        return batch

    def validate(self) -> None:
        rows = len(self)
        if rows == 0:
            raise ValueError("empty training batch")
        for name in ROW_FIELDS:
            t = getattr(self, name)
            if t.shape[0] != rows:
                raise ValueError(f"batch field {name} has {t.shape[0]} rows, tokens have {rows}")
        for name in ("attention_mask", "step_map"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"batch field {name} {tuple(getattr(self, name).shape)} != tokens {tuple(self.tokens.shape)}")
        if self.tokens.shape[1] != self.layout.length:
            raise ValueError(f"tokens have {self.tokens.shape[1]} columns, the layout {self.layout.length}")
        if not torch.isfinite(self.advantages).all():
            raise ValueError("non-finite advantages in the training batch")
        if not bool(((self.row_weight == 0) | (self.row_weight == 1)).all()):
            raise ValueError("row_weight must be 0 (padding) or 1 (a trajectory that trains)")
        n_out = self.layout.length - self.layout.output_start
        masks = len(update_plans(self.plan))  # pi_old of each inner update's mask, side by side
        if self.old is not None and self.old.logp.shape != (rows, n_out * masks):
            raise ValueError(f"behaviour log-probs {tuple(self.old.logp.shape)} != ({rows}, {n_out} output tokens x "
                             f"{masks} mask(s))")
        if self.sampled is not None and self.sampled.shape != (rows, n_out):
            raise ValueError(f"sampled log-probs {tuple(self.sampled.shape)} != ({rows}, {n_out}) output tokens")
        g = self.guidance_rows
        if g is not None and (g.dim() != 3 or g.shape[0] != rows or g.shape[2] != self.tokens.shape[1]):
            raise ValueError(f"unconditional rows {tuple(g.shape)} != ({rows}, U, {self.tokens.shape[1]})")

    def select(self, index: torch.Tensor | slice) -> "TrainBatch":
        """The rows ``index`` (a slice or index tensor), everything else shared."""
        rows = {k: getattr(self, k)[index] for k in ROW_FIELDS}
        rows.update({k: None if getattr(self, k) is None else getattr(self, k)[index] for k in OPTIONAL_ROW_FIELDS})
        return replace(self, old=None if self.old is None else self.old.rows(index), **rows)

    def padded(self, unit: int) -> "TrainBatch":
        """The batch grown to a multiple of ``unit`` rows with weight-0 copies of its first rows: every
        usable trajectory trains, whatever micro_batch_size x grad_accumulation x ranks is."""
        extra = -len(self) % unit
        if extra == 0:
            return self
        index = torch.cat([torch.arange(len(self)), torch.arange(extra) % len(self)])
        out = self.select(index)
        out.row_weight = torch.cat([self.row_weight, torch.zeros(extra, dtype=self.row_weight.dtype)])
        return out

    def shard(self, rank: int, world: int) -> "TrainBatch":
        """Contiguous shard ``rank`` of ``world`` equal shards (equal, so every rank takes the same optimizer steps)."""
        if len(self) % world:
            raise ValueError(f"a batch of {len(self)} trajectories does not split into {world} equal learner shards")
        size = len(self) // world
        return self.select(slice(rank * size, (rank + 1) * size))

    def to(self, device: str | torch.device) -> "TrainBatch":
        rows = {k: getattr(self, k).to(device) for k in ROW_FIELDS}
        rows.update({k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in OPTIONAL_ROW_FIELDS})
        return replace(self, old=None if self.old is None else self.old.to(device), **rows)


def uses_reward_steps(cfg) -> bool:
    """Trace replay at the reward's sampled steps (``learner.coverage=reward_steps``, ParaRL's choice)."""
    return cfg.logprob_estimator == "trace" and cfg.coverage == "reward_steps"


def iteration_plan(cfg, total_steps: int, seed: int, reward_steps: Sequence[int] | None = None,
                   sampled_as: Scoring | None = None) -> Plan:
    """The plan of one iteration from a ``LearnerConfig`` (estimator, sampled/merged steps, mask ratios).

    The driver draws it once per iteration and ships it with the batch; rollout workers compute the
    behaviour log-probs with the same plan. With ``reward_steps`` (the reward's sampled steps) and the
    default config, the likelihood is estimated at the same steps as the reward. ``sampled_as`` is the
    distribution the rollouts draw from; the plan scores under it when ``learner.scoring=sampled``.
    """
    from pararl.plans import TracePlan, make_plan

    scoring = None
    if cfg.scoring == "sampled":
        if sampled_as is None:
            raise ValueError("learner.scoring=sampled needs the rollouts' distribution (sampled_as)")
        scoring = sampled_as
    if uses_reward_steps(cfg):
        if reward_steps is None:
            raise ValueError("learner.coverage=reward_steps needs the reward's sampled steps (reward_steps)")
        return TracePlan(tuple(reward_steps), scoring=scoring)
    sampled = cfg.sampled_steps if cfg.coverage == "random" else 0
    return make_plan(cfg.logprob_estimator, total_steps, seed, sampled, cfg.merge_steps, cfg.mask_ratio_min,
                     cfg.mask_ratio_max, scoring, cfg.mask_structure, cfg.updates_per_batch)


def rows_per_trajectory(cfg, reward_sampled_steps: int, total_steps: int) -> int:
    """Rows each trajectory becomes in a log-prob forward under ``iteration_plan`` (for memory estimates)."""
    if cfg.logprob_estimator == "random_mask":
        return 1
    if uses_reward_steps(cfg):
        return reward_sampled_steps
    blocks = -(-total_steps // cfg.merge_steps)
    return min(cfg.sampled_steps, blocks) if cfg.coverage == "random" else blocks
