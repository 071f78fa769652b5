"""One unit of each actor's work at the config's shapes, on fake tensors, and its memory beside the
estimate of ``cluster.memory``.

Measured (MemTracker's peak on the actor's device): the weights each process holds in full, and the
peak of everything its unit allocates on top of them. Analytic, and labelled so: ZeRO's partitions of
weights, gradients and optimizer state (each rank holds 1/N of what its stage partitions), the
parameters ZeRO-3 gathers for the layers in flight, and the CUDA context and allocator slack. A
learner's gradients are dropped as they are produced, as ZeRO hands each one to its reduce-scatter.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cluster.memory import CUDA_SLACK, Estimate, activation_peak
from cluster.plan.fake import DEVICE, TRAIN_DEVICE, HostRealMode, Measured, build_fake, measure
from learner.batch import Plan, TrainBatch, iteration_plan
from learner.config import uses_reference
from learner.loss import LossSettings, Normalizer, modality_weights
from learner.trainer import UpdateTargets, micro_batch_loss
from pararl.logprobs import behaviour_logprobs, trajectory_logprobs, window_index
from pararl.models import LLaDAConfig, LLaDAModelLM
from pararl.types import Trajectories
from rollout.config import scoring_of
from rollout.sampler import ParallelSampler


@dataclass
class ActorPlan:
    """One actor's GPU memory: parts measured on fake tensors, parts taken from the estimate, the
    estimate's own total, and what could not be measured."""

    actor: str
    measured: dict[str, float] = field(default_factory=dict)  # bytes
    analytic: dict[str, float] = field(default_factory=dict)  # bytes, from cluster.memory
    estimate: float = 0.0
    share: float = 1.0  # of one GPU
    unmeasured: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.measured.values()) + sum(self.analytic.values())


@dataclass
class Context:
    """What every unit reads: the run config, the policy's config, the format, the mode."""

    cfg: Any
    config: LLaDAConfig
    fmt: Any
    mode: HostRealMode
    reward_steps: list[int]
    requests: list
    _policies: dict = field(default_factory=dict)

    def policy(self, device: str) -> LLaDAModelLM:
        """The policy in bf16 on fake ``device`` tensors, built once per device."""
        if device not in self._policies:
            self._policies[device] = build_fake(lambda: LLaDAModelLM(self.config), self.mode, device, torch.bfloat16)
        return self._policies[device]


def weights_of(module: torch.nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in module.parameters()))


def sampling_step(ctx: Context, sampler: ParallelSampler, prompts: int, step: int, group: int,
                  snapshots: tuple[int, ...] = (), memory: bool = True, flops: bool = True) -> Measured:
    """Step ``step`` of ``prompts`` x ``group`` trajectories: every row, the guidance's included."""
    reqs = ctx.requests[:prompts]

    def work() -> None:
        with torch.inference_mode():
            state = sampler.begin(reqs, group, snapshots)
            sampler.step(state, step)

    return measure(work, ctx.mode, DEVICE, [sampler.model], memory=memory, flops=flops)


def heaviest_step(sampler: ParallelSampler) -> int:
    """An image update: the step that forwards the most rows (-A's two unconditional rows go through a
    forward of their own there) and runs both schedulers."""
    return next(s for s in range(sampler.cfg.steps) if sampler.plan.image_update[s]) if any(sampler.plan.image_update) else 0


def iteration(ctx: Context, steps: int) -> Plan:
    """The plan of a run's first iteration, as the driver makes it (scored under the rollouts'
    distribution when ``learner.scoring`` is ``sampled``)."""
    return iteration_plan(ctx.cfg.learner, steps, ctx.cfg.seed, ctx.reward_steps, scoring_of(ctx.cfg.sampler))


def behaviour_chunk(ctx: Context, tr: Trajectories, chunk_rows: int | None) -> Measured:
    plan = iteration(ctx, tr.steps)
    policy = ctx.policy(DEVICE)

    def work() -> None:
        with torch.inference_mode():
            behaviour_logprobs(policy, ctx.fmt, tr, plan, chunk_rows=chunk_rows)

    return measure(work, ctx.mode, DEVICE, [policy], flops=False)


def rollout_worker(ctx: Context, tr: Trajectories, prompts: int, estimate: Estimate, share: float) -> ActorPlan:
    policy = ctx.policy(DEVICE)
    sampler = ParallelSampler(policy, ctx.fmt, ctx.cfg.sampler)
    heaviest = heaviest_step(sampler)
    step = sampling_step(ctx, sampler, prompts, heaviest, ctx.cfg.data.group_size, (heaviest,), flops=False)
    chunk = behaviour_chunk(ctx, tr, ctx.cfg.cluster.rollout_logprob_chunk_rows)
    weights = weights_of(policy)
    out = ActorPlan("rollout worker", estimate=estimate.total, share=share)
    out.measured["weights"] = weights
    out.measured["sampling step"] = step.total - weights
    out.measured["behaviour log-probs beyond it"] = max(0.0, chunk.total - weights - out.measured["sampling step"])
    out.analytic["CUDA slack"] = CUDA_SLACK
    return out


def train_batch(ctx: Context, tr: Trajectories) -> TrainBatch:
    plan = iteration(ctx, tr.steps)
    advantages = torch.linspace(-1.0, 1.0, len(tr))
    return TrainBatch.from_trajectories(tr, advantages, plan)


def micro_batch(ctx: Context, batch: TrainBatch) -> tuple[Measured, Measured]:
    """(the reference's forward, the policy's forward and backward) of one micro-batch, on meta tensors
    (see ``cluster.plan.fake``), with the config's gradient checkpointing."""
    lc = ctx.cfg.learner
    mb = lc.micro_batch_size
    sub = batch.select(slice(0, mb))
    # the run moves the whole batch to the GPU; here its bookkeeping stays where it has values
    sub = replace(sub, advantages=sub.advantages.to(TRAIN_DEVICE))
    policy = ctx.policy(TRAIN_DEVICE)
    policy.train()
    if lc.gradient_checkpointing:  # as learner.engine.build_engine enables it
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_holder: dict = {}

    def reference() -> None:
        with torch.no_grad():
            ref_holder["ref"] = trajectory_logprobs(policy, ctx.fmt, sub, sub.plan).detach()

    ref = measure(reference, ctx.mode, TRAIN_DEVICE, [policy], wrap=False, flops=False)
    old = ref_holder["ref"]
    scored = old.mask.clone()
    window = window_index(sub.step_map[:, sub.layout.output], sub.plan, sub.steps).to(scored.device)
    norm = Normalizer(float(scored.numel()), float(mb), float(mb))  # a scale, not a shape: any count costs the same
    targets = UpdateTargets(sub.plan, old, old if lc.beta > 0 else None, scored, window, [norm], None, {})
    per_column = modality_weights(sub.layout, lc.text_weight, lc.image_weight).to(old.logp.device)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in policy.parameters()]

    def step() -> None:
        loss, _ = micro_batch_loss(policy, ctx.fmt, sub, targets, slice(0, mb), LossSettings.from_config(lc), per_column, norm)
        loss.backward()

    try:
        train = measure(step, ctx.mode, TRAIN_DEVICE, [policy], wrap=False)
    finally:
        for h in hooks:
            h.remove()
    return ref, train


def learner_rank(ctx: Context, batch: TrainBatch, estimate: Estimate, share: float) -> tuple[ActorPlan, Measured]:
    """ZeRO's partitions from the estimate; the micro-batch's activations and the reference measured."""
    lc = ctx.cfg.learner
    ref, train = micro_batch(ctx, batch)
    weights = weights_of(ctx.policy(TRAIN_DEVICE))
    out = ActorPlan("learner rank", estimate=estimate.total, share=share)
    for key in ("weights", "fp32 master + Adam", "gradients", "ZeRO-3 gathered params"):
        if estimate.parts.get(key):
            out.analytic[key + " (ZeRO)"] = estimate.parts[key]
    reference = uses_reference(lc)
    ref_weights = weights if reference and not lc.lora.enabled else 0.0
    ref_act = ref.total - weights if reference else 0.0
    peak, resident = activation_peak(lc, train.total - weights, ref_weights, ref_act)
    if resident is None:
        out.measured["activations or reference (peak)"] = peak
    else:
        out.measured["activations (peak)"] = peak
        out.measured["reference"] = resident
    out.analytic["CUDA slack"] = CUDA_SLACK
    return out, train


def colocated(ctx: Context, train: ActorPlan, roll: ActorPlan, estimates: list[Estimate], share: float) -> list[ActorPlan]:
    """A colocated rank's two phases: the update (the learner rank under its ZeRO stage) and sampling,
    with the rank's full weights, its gradient partition and, unless offloaded, its optimizer state."""
    training = ActorPlan("colocated rank, training", dict(train.measured), dict(train.analytic), estimates[0].total, share)
    sampling = ActorPlan("colocated rank, sampling", estimate=estimates[1].total, share=share)
    sampling.measured = dict(roll.measured)
    # the states that stay on the GPU while it samples are those cluster.memory.colocated_rank keeps there
    stay = {f"{k} (ZeRO)" for k in ("gradients", "fp32 master + Adam") if k in estimates[1].parts}
    sampling.analytic = {k: v for k, v in train.analytic.items() if k in stay}
    sampling.analytic["CUDA slack"] = CUDA_SLACK
    return [training, sampling]
