"""The rollout workers as one group: spread a batch over them, survive a worker's death, merge the parts.

A worker that dies while sampling is restarted by Ray (``max_restarts``); before it samples again it is
brought to the current weights, and its share of the batch is sent again. The step completes with
every trajectory, and the restart is counted.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from cluster.config import ClusterConfig
from cluster.placement import Placement
from cluster.weight_sync import WeightSync
from rollout.config import SamplerConfig
from pararl.types import GenerationRequest, Trajectories, concat_trajectories
from rollout.worker import RolloutWorker
from pararl.errors import RunError

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class RolloutError(RunError):
    """The batch cannot be sampled (a worker keeps dying, or does not answer in time)."""


def split(requests: Sequence[GenerationRequest], parts: int) -> list[list[GenerationRequest]]:
    """Contiguous, nearly equal chunks of whole prompts (a group never spans two workers)."""
    n = len(requests)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(requests[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


class RolloutGroup:
    def __init__(self, cfg: ClusterConfig, model_folder: str, sampler: SamplerConfig, placement: Placement | None,
                 sync: WeightSync, pad_id: int, dtype: str | None = None, device: str = "cpu",
                 named_format: dict[str, Any] | None = None) -> None:
        self.cfg, self.sync, self.pad_id = cfg, sync, pad_id
        self.restarts = 0
        remote = ray.remote(RolloutWorker)
        threads = cfg.rollout_threads or max(1, int(cfg.rollout_cpus))
        self.workers = []
        for i in range(cfg.rollout_workers):
            options: dict[str, Any] = {"num_cpus": cfg.rollout_cpus, "num_gpus": cfg.rollout_gpus,
                                       "max_restarts": cfg.max_restarts, "max_task_retries": 0}
            if placement is not None:
                options["scheduling_strategy"] = placement.strategy(placement.rollout_bundles[i])
            self.workers.append(remote.options(**options).remote(model_folder, sampler, device, dtype, threads,
                                                                 cfg.rollout_logprob_chunk_rows, named_format))
        ray.get([w.ready.remote() for w in self.workers], timeout=cfg.call_timeout_s)

    def _recover(self, index: int, err: Exception) -> None:
        """Wait for Ray's restart of worker ``index``, then give it the current weights."""
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts * max(1, len(self.workers)):
            raise RolloutError(f"rollout worker {index} died again ({err}); restarts exhausted") from err
        deadline = time.monotonic() + self.cfg.call_timeout_s
        while True:
            try:
                ray.get(self.workers[index].ready.remote(), timeout=30)
                break
            except DEAD as again:
                if time.monotonic() > deadline:
                    raise RolloutError(f"rollout worker {index} did not come back after dying: {again}") from again
                time.sleep(0.5)
        self.sync.catch_up(self.workers[index])

    def sample(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int, plan: Any = None) -> tuple[Trajectories, Any]:
        """Every trajectory of the batch, in request order, all made by policy ``version``."""
        chunks = split(requests, len(self.workers))
        pending = {i: self.workers[i].sample.remote(c, group_size, snapshot_steps, version, plan) for i, c in enumerate(chunks)}
        results: dict[int, tuple] = {}
        while pending:
            for i, ref in list(pending.items()):
                try:
                    results[i] = ray.get(ref, timeout=self.cfg.call_timeout_s)
                    del pending[i]
                except DEAD as err:
                    self._recover(i, err)
                    pending[i] = self.workers[i].sample.remote(chunks[i], group_size, snapshot_steps, version, plan)
                except GetTimeoutError as err:
                    raise RolloutError(f"rollout worker {i} gave no trajectories within {self.cfg.call_timeout_s:g}s") from err
        parts = [results[i] for i in range(len(chunks))]
        for traj, _ in parts:
            if traj.policy_version != version:
                raise RolloutError(f"trajectories from policy version {traj.policy_version}, expected {version}")
        traj = concat_trajectories([p[0] for p in parts], self.pad_id)
        old = None
        if plan is not None:
            from pararl.logprobs import TokenLogProbs

            old = TokenLogProbs.cat([p[1] for p in parts])
        return traj, old

    def hashes(self) -> list[str]:
        return ray.get([w.weights_hash.remote() for w in self.workers], timeout=self.cfg.call_timeout_s)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
