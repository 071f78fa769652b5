"""The body of a rollout worker (``cluster.rollout_group`` runs it as a Ray actor): a live policy that
samples trajectories and takes new weights.

Weights arrive bucket by bucket and are copied into the live model's own tensors (preallocated: no
second model is built); the worker's policy version only moves once every tensor of the new version
has arrived, so a trajectory is never sampled from a half-synced model under a version it does not have.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from pararl.bundle import load_bundle
from pararl.devices import resolve_dtype
from pararl.logprobs import TokenLogProbs, behaviour_logprobs, from_sampler
from pararl.lora import AdapterConfig, add_adapters, has_adapters, is_adapter
from pararl.plans import Plan
from pararl.sync import collective
from pararl.sync.buckets import named_weights, weights_hash
from pararl.sync.wire import SyncError, TensorRun, decode_bucket
from pararl.types import GenerationRequest, Trajectories
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler


class RolloutWorker:
    def __init__(self, model_folder: str, sampler_cfg: SamplerConfig, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None, logprob_chunk_rows: int | None = None,
                 named_format: dict[str, Any] | None = None, behaviour: str = "replay",
                 policy: torch.nn.Module | None = None, adapters: AdapterConfig | None = None) -> None:
        """``policy``: sample from this model (a colocated learner's own, in the same process) instead of
        loading the folder's weights. ``adapters``: the learner trains LoRA adapters; the worker carries
        the same ones on its frozen base, and a new version sends only them."""
        self.logprob_chunk_rows = logprob_chunk_rows
        self.behaviour = behaviour  # learner.behaviour: "replay" (extra forwards) or "sampler" (its own forwards)
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.bundle = load_bundle(model_folder, dtype=resolve_dtype(dtype) if dtype else None, device=device,
                                  named=named_format, policy=policy)
        self.policy = self.bundle.policy
        self.sampler = ParallelSampler(self.policy, self.bundle.fmt, sampler_cfg)
        lora = adapters is not None and adapters.enabled
        if lora and not has_adapters(self.policy):
            add_adapters(self.policy, adapters)
        self.live = {name: t for name, t in self.policy.state_dict(keep_vars=True).items() if not lora or is_adapter(name)}
        self.version = 0
        self._received: set[str] = set()

    def ready(self) -> int:
        return self.version

    # -- weight sync -------------------------------------------------------------------------
    @torch.no_grad()
    def load_bucket(self, bucket: Sequence[TensorRun]) -> int:
        """Copy one bucket into the live tensors; returns the tensors copied."""
        items = decode_bucket(bucket)
        for name, src in items:
            live = self.live.get(name)
            if live is None:
                raise SyncError(f"weight sync sent {name!r}, which the rollout policy does not have")
            if tuple(src.shape) != tuple(live.shape):
                raise SyncError(f"weight sync sent {name!r} with shape {tuple(src.shape)}, the policy has {tuple(live.shape)}")
            live.data.copy_(src, non_blocking=False)
            self._received.add(name)
        return len(items)

    def finish_sync(self, version: int) -> int:
        missing = sorted(set(self.live) - self._received)
        self._received = set()
        if missing:
            raise SyncError(f"weight sync to version {version} left {len(missing)} tensors unsent, e.g. {missing[:3]}")
        self.version = version
        return version

    def check_sync_plan(self, plan: list[list[str]]) -> bool:
        """Before any broadcast: the plan must name exactly this policy's tensors (a mismatch would hang a collective)."""
        planned = [n for names in plan for n in names]
        missing, extra = sorted(set(self.live) - set(planned)), sorted(set(planned) - set(self.live))
        if missing or extra or len(planned) != len(set(planned)):
            raise SyncError(f"the learner's sync plan does not match the rollout policy: missing {missing[:3]}, extra {extra[:3]}")
        return True

    def join_sync_group(self, addr: str, port: int, rank: int, world: int, backend: str) -> bool:
        self.sync_group, self.sync_backend = collective.join_group(addr, port, rank, world, backend), backend
        return True

    def receive_weights(self, plan: list[list[str]], wire_dtype: str, version: int) -> int:
        """Collective transport: receive every bucket by broadcast, then move to ``version``."""
        collective.receive(self.sync_group, self.live, plan, self.sync_backend, resolve_dtype(wire_dtype))
        self.version = version
        return version

    def weights_hash(self) -> str:
        """The hash of the whole sampling model, frozen base included (same definition as the learner's)."""
        return weights_hash((name, t.detach()) for name, t in named_weights(self.policy))

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int | None = None, plan: Plan | None = None) -> tuple[Trajectories, TokenLogProbs | None]:
        """Trajectories, and (with a plan) their behaviour log-probs under the weights that sampled them:
        the learner's estimator and distribution (the plan's scoring), so pi_old is exactly this policy version."""
        if version is not None and version != self.version:
            raise SyncError(f"asked to sample with policy version {version}, but this worker holds {self.version}")
        start = time.perf_counter()
        traj = self.sampler.sample(requests, group_size=group_size, snapshot_steps=snapshot_steps,
                                   record_policy=plan is not None and self.behaviour == "sampler")
        traj.policy_version = self.version
        old = None
        if plan is not None and self.behaviour == "sampler":
            old = from_sampler(traj, plan)  # None where the sampler's forwards do not give it: replayed below
        if plan is not None and old is None:
            with torch.inference_mode():
                old = behaviour_logprobs(self.policy, self.bundle.fmt, traj, plan, chunk_rows=self.logprob_chunk_rows)
        old = None if old is None else old.to("cpu")
        traj.compute_seconds = time.perf_counter() - start
        return traj.to("cpu"), old
