"""The rollout workers as one group: spread a batch over them, survive a worker's death, merge the parts.

A worker that dies while sampling is restarted by Ray (``max_restarts``); before it samples again it is
brought to the current weights, and its share of the batch is sent again. The step completes with
every trajectory, and the restart is counted.
"""
from __future__ import annotations

from typing import Any, Sequence

from ray.exceptions import GetTimeoutError

from cluster.actor_group import DEAD, ActorGroup
from cluster.config import ClusterConfig
from cluster.placement import Placement
from cluster.weight_sync import WeightSync
from pararl.errors import RunError
from pararl.logprobs import Plan, TokenLogProbs
from pararl.types import GenerationRequest, Trajectories, concat_trajectories
from rollout.config import SamplerConfig
from rollout.worker import RolloutWorker


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
                 named_format: dict[str, Any] | None = None, behaviour: str = "replay") -> None:
        self.cfg, self.sync, self.pad_id = cfg, sync, pad_id
        self.restarts = 0
        threads = cfg.rollout_threads or max(1, int(cfg.rollout_cpus))

        def options(i: int) -> dict[str, Any]:
            out: dict[str, Any] = {"num_cpus": cfg.rollout_cpus, "num_gpus": cfg.rollout_gpus,
                                   "max_restarts": cfg.max_restarts, "max_task_retries": 0}
            if placement is not None:
                out["scheduling_strategy"] = placement.strategy(placement.rollout_bundles[i])
            return out

        args = (model_folder, sampler, device, dtype, threads, cfg.rollout_logprob_chunk_rows, named_format, behaviour)
        self.group = ActorGroup(RolloutWorker, cfg.rollout_workers, lambda i: args, options, cfg.call_timeout_s)
        self.group.call("ready")

    @property
    def workers(self) -> list:
        return self.group.actors

    def _recover(self, index: int, err: Exception) -> None:
        """Wait for Ray's restart of worker ``index``, then give it the current weights."""
        self.restarts += 1
        if self.restarts > self.cfg.max_restarts * max(1, len(self.workers)):
            raise RolloutError(f"rollout worker {index} died again ({err}); restarts exhausted") from err
        try:
            self.group.wait_alive(index)
        except (*DEAD, GetTimeoutError) as again:
            raise RolloutError(f"rollout worker {index} did not come back after dying: {again}") from again
        self.sync.catch_up(self.workers[index])

    def sample(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int, plan: Plan | None = None) -> tuple[Trajectories, TokenLogProbs | None]:
        """Every trajectory of the batch, in request order, all made by policy ``version``."""
        chunks = split(requests, len(self.workers))
        pending = {i: self.workers[i].sample.remote(c, group_size, snapshot_steps, version, plan) for i, c in enumerate(chunks)}
        results: dict[int, tuple] = {}
        while pending:
            for i, ref in list(pending.items()):
                try:
                    results[i] = self.group.get(ref)
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
        old = TokenLogProbs.cat([p[1] for p in parts]) if plan is not None else None
        return traj, old

    def hashes(self) -> list[str]:
        return self.group.call("weights_hash")

    def shutdown(self) -> None:
        self.group.kill()
