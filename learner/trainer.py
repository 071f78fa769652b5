"""One learner rank: the policy's DeepSpeed engine, the frozen reference, and the update loop over a batch.

A rank receives its shard of the iteration's batch (trajectories, advantages, the plan, the
behaviour log-probs) and takes ``updates_per_batch`` passes over it, each pass split into optimizer
steps of ``micro_batch_size * grad_accumulation`` trajectories. pi_old stays the behaviour
log-probs for every pass (the ratio is 1 only in the first), and the reference log-probs are
computed once per batch, since the reference never changes (once per mask where UniGRPO's
structured masking gives each pass its own: ``UpdateTargets``). Loss denominators are counted over the
whole optimizer step on all ranks (``learner.loss``), so N ranks on N shards take the same step as
one rank on the whole batch.

This class is plain Python (no Ray): ``learner.rank`` is one rank, ``cluster.learner_group`` runs it as a Ray actor, and tests and
single-process tools use it directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from learner.batch import TrainBatch
from learner.config import LearnerConfig, uses_reference, validate
from learner.engine import build_engine, init_distributed, resolve_backend, resolve_device
from learner.loss import SUM_KEYS, LossSettings, Normalizer, clipped_surrogate, merge_stats, modality_weights, row_sizes, summarize
from learner.mismatch import correction_weights, gap_metrics, gap_sums
from learner.offload import move_optimizer_state
from pararl.devices import resolve_dtype
from pararl.formats import ParallelFormat
from pararl.logprobs import TokenLogProbs, trajectory_logprobs, window_index
from pararl.lora import adapter_spec, adapters_off, add_adapters, is_adapter
from pararl.models import load_policy
from pararl.net import free_port
from pararl.plans import Plan, update_plans


@dataclass
class UpdateTargets:
    """What one inner update's loss compares against (learner.loss.clipped_surrogate's fixed inputs)."""

    plan: Plan
    old: TokenLogProbs
    ref: TokenLogProbs | None
    scored: torch.Tensor  # [R, N] tokens in the loss (padding rows excluded)
    window: torch.Tensor  # [R, N] the forward row that scores each token
    norms: list[Normalizer]  # per optimizer step
    correction: torch.Tensor | None
    mismatch: dict


def micro_batch_loss(policy: torch.nn.Module, fmt: ParallelFormat, sub: TrainBatch, t: UpdateTargets, rows: slice,
                     settings: LossSettings, per_column: torch.Tensor, norm: Normalizer) -> tuple[torch.Tensor, dict]:
    """The loss a rank backpropagates for the micro-batch ``sub`` (rows ``rows`` of its shard) against an
    update's fixed targets. One function for ``Learner.train_batch`` and ``pararl plan``, which runs it at
    the real shapes on fake tensors."""
    cur = trajectory_logprobs(policy, fmt, sub, t.plan, with_entropy=True)
    if not torch.equal(cur.mask, t.old.mask[rows]):
        raise ValueError("the behaviour log-probs score other tokens than the batch's plan: "
                         "they were computed with a different plan")
    loss, st = clipped_surrogate(
        cur.logp, t.old.logp[rows], None if t.ref is None else t.ref.logp[rows], sub.advantages,
        t.scored[rows], cur.weight * per_column, settings, norm, cur.entropy, t.window[rows],
        None if t.correction is None else t.correction[rows],
    )
    st["sequences"] = sub.row_weight.sum().to(st["sequences"].dtype)
    return loss, st


class Learner:
    def __init__(self, cfg: LearnerConfig, policy_path: str | Path, fmt: ParallelFormat, rank: int = 0,
                 world: int = 1, port: int | None = None, addr: str = "127.0.0.1",
                 reference_path: str | Path | None = None, local_rank: int | None = None) -> None:
        self.cfg = validate(cfg)
        self.fmt, self.rank, self.world = fmt, rank, world
        kind = self.device = resolve_device(cfg)
        if kind == "cuda":
            torch.cuda.set_device(local_rank if local_rank is not None else rank % torch.cuda.device_count())
            self.device = f"cuda:{torch.cuda.current_device()}"
        if port is None and world > 1:
            raise ValueError("a learner group of more than one rank needs the MASTER_PORT picked by the driver")
        init_distributed(rank, world, port or free_port(), resolve_backend(cfg, kind), addr, local_rank)
        torch.manual_seed(cfg.seed + rank)
        self.policy_path = str(policy_path)
        policy = load_policy(policy_path, dtype=torch.float32)
        if cfg.lora.enabled:  # only the adapters train; the base with them switched off is the reference
            add_adapters(policy, cfg.lora)
        self.engine = build_engine(policy, cfg, world, self.device)
        self.settings = LossSettings.from_config(cfg)
        self._grad_norm: float | None = None
        self.stepped_aside = False  # the optimizer's state is in host memory (a colocated rank sampling)
        self.reference = None
        if uses_reference(cfg) and not cfg.lora.enabled:
            where = "cpu" if cfg.reference_offload else self.device
            self.reference = load_policy(reference_path or policy_path, dtype=resolve_dtype(cfg.precision), device=where)
            self.reference.requires_grad_(False)

    # ----- log-probabilities -------------------------------------------------------------------
    def _score(self, model: torch.nn.Module, batch: TrainBatch, with_entropy: bool = False) -> TokenLogProbs:
        """Log-probs of the whole local batch without gradients, one micro-batch of trajectories at a time."""
        mb = self.cfg.micro_batch_size
        with torch.no_grad():
            parts = [trajectory_logprobs(model, self.fmt, batch.select(slice(i, i + mb)), batch.plan, with_entropy=with_entropy)
                     for i in range(0, len(batch), mb)]
        return TokenLogProbs.cat(parts).detach()

    def reference_logprobs(self, batch: TrainBatch) -> TokenLogProbs:
        if self.cfg.lora.enabled:
            with adapters_off(self.engine.module) as base:
                return self._score(base, batch)
        if self.cfg.reference_offload and self.device != "cpu":
            self.reference.to(self.device)
            try:
                return self._score(self.reference, batch)
            finally:
                self.reference.to("cpu")
        return self._score(self.reference, batch)

    # ----- the update ------------------------------------------------------------------------
    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        t = t.to(self.engine.device)
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t.cpu()

    def _reduce_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sums = self._all_reduce(torch.stack([stats[k].double().cpu() for k in SUM_KEYS]))
        out = dict(zip(SUM_KEYS, sums.unbind()))
        out["ratio_min"] = self._all_reduce(stats["ratio_min"].double().cpu().reshape(1), dist.ReduceOp.MIN)[0]
        out["ratio_max"] = self._all_reduce(stats["ratio_max"].double().cpu().reshape(1), dist.ReduceOp.MAX)[0]
        return out

    def step_aside(self, copy: bool = False) -> int:
        """Move the optimizer's state to host memory until the next update (a GPU rank that samples
        between its updates needs the room); a CPU rank's is there already (``copy`` moves it anyway, for
        tests). Returns the bytes moved."""
        if self.stepped_aside or (self.device == "cpu" and not copy):
            return 0
        self.stepped_aside = True
        return move_optimizer_state(self.engine, "cpu", copy=copy)

    def come_back(self) -> int:
        """The optimizer's state back where the update runs."""
        if not self.stepped_aside:
            return 0
        self.stepped_aside = False
        return move_optimizer_state(self.engine, self.engine.device)

    def train_batch(self, batch: TrainBatch) -> dict:
        """``updates_per_batch`` passes over this rank's shard; returns metrics reduced over all ranks."""
        cfg = self.cfg
        start = time.perf_counter()
        self.come_back()
        batch.validate()
        batch = batch.to(self.engine.device)
        mb, gas = cfg.micro_batch_size, cfg.grad_accumulation
        per_step = mb * gas
        if len(batch) % per_step:
            raise ValueError(
                f"this rank got {len(batch)} trajectories, not a multiple of micro_batch_size x grad_accumulation "
                f"= {per_step} (the trajectories of one optimizer step on one rank)"
            )
        steps = len(batch) // per_step
        agree = self._all_reduce(torch.tensor([steps, -steps], dtype=torch.float64), dist.ReduceOp.MAX)
        if int(agree[0]) != -int(agree[1]):
            raise ValueError(f"learner ranks got different shard sizes ({steps} optimizer steps here): split batches equally")

        targets = self._update_targets(batch, steps, per_step)
        mismatch = targets[0].mismatch
        per_column = modality_weights(batch.layout, cfg.text_weight, cfg.image_weight).to(targets[0].old.logp.device)
        updates, total = [], None
        for u in range(cfg.updates_per_batch):
            t = targets[u % len(targets)]
            stats = None
            for j in range(steps):
                norm = t.norms[j]
                for i in range(gas):
                    rows = slice(j * per_step + i * mb, j * per_step + (i + 1) * mb)
                    loss, st = micro_batch_loss(self.engine, self.fmt, batch.select(rows), t, rows, self.settings,
                                                per_column, norm)
                    # DeepSpeed divides by gas and averages over ranks; the normalizer already counts both.
                    self.engine.backward(loss * (gas * self.world))
                    if self.engine.is_gradient_accumulation_boundary():
                        self._grad_norm = self._plain_grad_norm()
                    self.engine.step()
                    stats = merge_stats(stats, st)
            stats = self._reduce_stats(stats)
            total = merge_stats(total, stats)
            metrics = summarize(stats, steps)
            norm_value = self.engine.get_global_grad_norm()
            if norm_value is None:  # DeepSpeed keeps no norm for plain fp32 ZeRO-0: use ours (before clipping)
                norm_value = self._grad_norm
            metrics["grad_norm"] = float(norm_value) if norm_value is not None else float("nan")
            updates.append(metrics)
        out = summarize(total, steps * cfg.updates_per_batch)
        out["tokens"] /= cfg.updates_per_batch
        norms = [u["grad_norm"] for u in updates if u["grad_norm"] == u["grad_norm"]]
        out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        out["ratio_mean_last_update"] = updates[-1]["ratio_mean"]
        out.update(updates=updates, optimizer_steps=steps * cfg.updates_per_batch, global_steps=int(self.engine.global_steps))
        out["compute_seconds"] = time.perf_counter() - start  # forward/backward/step of this rank, reference included
        out.update(mismatch)
        return out

    def _update_targets(self, batch: TrainBatch, steps: int, per_step: int) -> list[UpdateTargets]:
        """What each inner update scores against: one entry shared by every update, or under UniGRPO's
        structured masking one per update (its own mask, pi_old and reference log-probs, denominators)."""
        plans = update_plans(batch.plan)
        if len(plans) not in (1, self.cfg.updates_per_batch):
            raise ValueError(f"the batch's plan has {len(plans)} inner-update masks; learner.updates_per_batch is "
                             f"{self.cfg.updates_per_batch}")
        if batch.old is not None:
            olds = batch.old.per_update(len(plans))
        else:  # pi_old is this rank's weights before the first update (the synchronous, on-policy case)
            olds = [self._score(self.engine, replace(batch, plan=plan)) for plan in plans]
        real, out = batch.row_weight > 0, []
        for plan, old in zip(plans, olds):
            view = batch if plan is batch.plan else replace(batch, plan=plan, old=old)
            if self.cfg.beta > 0:
                ref = self.reference_logprobs(view) if self.cfg.kl_reference == "reference" else old
            else:
                ref = None
            scored = old.mask & real[:, None]
            window = window_index(batch.step_map[:, batch.layout.output], plan, batch.steps).to(scored.device)
            norms = self._normalizers(scored, real, window, steps, per_step)
            correction, mismatch = self._mismatch(batch, old, scored)
            out.append(UpdateTargets(plan, old, ref, scored, window, norms, correction, mismatch))
        return out

    def _normalizers(self, scored: torch.Tensor, real: torch.Tensor, window: torch.Tensor, steps: int,
                     per_step: int) -> list[Normalizer]:
        """The denominators of each optimizer step over all ranks: scored tokens, trajectories and
        (trajectory, window) rows; padding rows (row_weight 0) count in none."""
        per_opt_step = lambda t: self._all_reduce(t.view(steps, per_step).sum(1).double().cpu())  # noqa: E731
        tokens = per_opt_step(scored.sum(1))
        if (tokens == 0).any():
            raise ValueError("an optimizer step has no scored token on any rank: the plan scores nothing in this batch")
        sequences = per_opt_step(real)
        rows = per_opt_step((row_sizes(scored, window) > 0).sum(1))
        return [Normalizer(float(t), float(s), float(r)) for t, s, r in zip(tokens, sequences, rows)]

    def _mismatch(self, batch: TrainBatch, old: TokenLogProbs, scored: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """(per-token correction weights or None, the gap's metrics over all ranks) between the sampled
        distribution and pi_old; a correction asked for without recorded sampled log-probs is refused."""
        cfg = self.cfg
        if batch.sampled is None:
            if cfg.correction != "none":
                raise ValueError(f"learner.correction={cfg.correction} needs the log-probs the rollout sampled from, "
                                 "and this batch has none (a sampler that does not record them)")
            return None, {}
        sampled = batch.sampled.to(old.logp.device)
        sums = self._all_reduce(gap_sums(old.logp, sampled, scored, batch.layout, cfg.correction_cap).cpu())
        weights = None if cfg.correction == "none" else correction_weights(old.logp, sampled, scored, cfg.correction,
                                                                           cfg.correction_cap)
        return weights, gap_metrics(sums)

    def _plain_grad_norm(self) -> float | None:
        """Global L2 norm of the (already averaged) gradients where they live on the parameters (ZeRO-0)."""
        if self.cfg.zero_stage != 0:
            return None
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else None

    # ----- weights and checkpoints -------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def weight_buckets(self, bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None):
        from learner.weights import iter_weight_buckets

        return iter_weight_buckets(self.engine.module, bucket_bytes, dtype, only=self.synced)

    @property
    def synced(self):
        """Which tensors a new policy version sends: all of them, or under LoRA only the adapters (the
        rollout workers hold the same frozen base)."""
        return is_adapter if self.cfg.lora.enabled else None

    def weights_hash(self) -> str:
        from learner.weights import policy_hash

        return policy_hash(self.engine.module)

    def save_checkpoint(self, state, folder: str | Path | None = None, files: dict[str, bytes] | None = None) -> Path:
        from learner.checkpoint import save_checkpoint

        folder = folder or self.cfg.checkpoint.folder
        self.come_back()  # the optimizer's state is saved from (and restored to) where it trains
        if folder is None:
            raise ValueError("no checkpoint folder: set learner.checkpoint.folder")
        return save_checkpoint(self.engine, folder, state, keep_last=self.cfg.checkpoint.keep_last,
                               checksums=self.cfg.checkpoint.checksums, source=self.policy_path,
                               adapters=adapter_spec(self.cfg.lora) if self.cfg.lora.enabled else None, files=files)

    def load_checkpoint(self, path: str | Path | None = None):
        """Resume from ``path`` (a checkpoint, or a folder with a ``latest`` pointer; default: the config's folder)."""
        from learner.checkpoint import load_checkpoint, resolve_checkpoint

        where = resolve_checkpoint(path or self.cfg.checkpoint.folder)
        self.come_back()
        return load_checkpoint(self.engine, where)
