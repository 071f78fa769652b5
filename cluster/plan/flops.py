"""FLOPs per trajectory, counted on fake tensors, and the GPU-hours they imply.

Rollout: every sampling step of a trajectory (one forward of all its rows, the guidance's included;
-A adds a forward of its two unconditional rows at image updates; idle steps of a family without text
run nothing), each kind of step counted once and multiplied by how many the reveal plan has, plus the
behaviour log-probs. The released generator: the same steps at batch 1 with its head over every
position and id (``pararl.heads.FullHead``). Learner: a forward and backward per replayed row (with
gradient checkpointing, the recomputed forward counted), and the reference forward; rows of one
config are the same length, so other coverages are the per-row count times their rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cluster.plan.actors import Context, iteration, sampling_step
from cluster.plan.fake import DEVICE, measure
from learner.batch import TrainBatch, rows_per_trajectory
from learner.config import uses_reference
from pararl.heads import FullHead
from pararl.logprobs import behaviour_logprobs
from pararl.types import Trajectories
from rollout.sampler import ParallelSampler

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (SXM); H200 adds memory, not compute


@dataclass
class TrajectoryFlops:
    rollout: float  # sampling steps + behaviour log-probs
    released: float  # the released generator's steps, batch 1, full head
    learner: dict[str, float]  # coverage -> forward+backward + reference
    reward: float
    steps: dict[str, int] = field(default_factory=dict)  # step kind -> how many

    def total(self, coverage: str) -> float:
        return self.rollout + self.learner[coverage] + self.reward


def step_kinds(sampler: ParallelSampler) -> dict[str, tuple[int, int]]:
    """kind -> (a step of that kind, how many steps of it the reveal plan has)."""
    plan, kinds = sampler.plan, {}
    for s in range(sampler.cfg.steps):
        if plan.image_update[s]:
            kind = "image update"
        elif plan.text_reveal[s]:
            kind = "text only"
        else:
            continue
        first, n = kinds.get(kind, (s, 0))
        kinds[kind] = (first, n + 1)
    return kinds


def sampling_flops(ctx: Context, policy: torch.nn.Module, prompts: int, group: int) -> tuple[float, dict[str, int]]:
    """FLOPs of all of one trajectory's sampling steps."""
    sampler = ParallelSampler(policy, ctx.fmt, ctx.cfg.sampler)
    total, counts = 0.0, {}
    for kind, (step, n) in step_kinds(sampler).items():
        total += n * sampling_step(ctx, sampler, prompts, step, group, memory=False).flops / (prompts * group)
        counts[kind] = n
    return total, counts


def learner_flops(ctx: Context, train_flops: int, rows_measured: int, ref_flops: int) -> dict[str, float]:
    """Per trajectory and coverage: forward+backward of each replayed row, and the reference's forward."""
    lc, r = ctx.cfg.learner, ctx.cfg.reward
    per_row, ref_row = train_flops / rows_measured, ref_flops / rows_measured
    uses_ref = uses_reference(lc)
    coverages = {
        "reward_steps": dict(logprob_estimator="trace", coverage="reward_steps"),
        "all, merge_steps 4": dict(logprob_estimator="trace", coverage="all", merge_steps=4),
        "random mask": dict(logprob_estimator="random_mask"),
    }
    out = {}
    for name, fields in coverages.items():
        rows = rows_per_trajectory(_with(lc, fields), r.sampled_steps, ctx.cfg.sampler.steps) * lc.updates_per_batch
        out[name] = rows * (per_row + (ref_row if uses_ref else 0.0))
    return out


def _with(lc, fields: dict) -> object:
    from dataclasses import replace

    return replace(lc, **fields)


def gpu_hours(flops_per_step: float, steps: int, mfu: float, gpu: str) -> float:
    return flops_per_step * steps / (PEAK_BF16[gpu] * mfu) / 3600


def released_flops(ctx: Context, policy: torch.nn.Module) -> float:
    """The released generator's sampling FLOPs for one trajectory: batch 1, the full head."""
    flops, _ = sampling_flops(ctx, FullHead(policy), 1, 1)
    return flops


def trajectory_flops(ctx: Context, tr: Trajectories, batch: TrainBatch, train_flops: int,
                     reward_flops: dict[str, int]) -> TrajectoryFlops:
    """Every count of one trajectory: its sampling steps and behaviour log-probs, the released generator's
    steps, the learner per coverage (``train_flops``: the measured micro-batch of ``batch``), the reward."""
    cfg = ctx.cfg
    policy = ctx.policy(DEVICE)
    rollout, counts = sampling_flops(ctx, policy, len(ctx.requests), cfg.data.group_size)
    plan = iteration(ctx, tr.steps)
    behaviour = measure(lambda: behaviour_logprobs(policy, ctx.fmt, tr, plan), ctx.mode, DEVICE, memory=False).flops
    mb = cfg.learner.micro_batch_size
    sub = batch.select(slice(0, mb))

    def reference() -> None:
        with torch.no_grad():
            behaviour_logprobs(policy, ctx.fmt, sub, plan)

    ref = measure(reference, ctx.mode, DEVICE, memory=False).flops
    rows = mb * rows_per_trajectory(cfg.learner, cfg.reward.sampled_steps, cfg.sampler.steps)
    learner = learner_flops(ctx, train_flops, rows, ref)
    reward = (reward_flops["decode"] + reward_flops["score"]) * cfg.reward.sampled_steps
    return TrajectoryFlops(rollout + behaviour / len(tr), released_flops(ctx, policy), learner, reward, counts)
