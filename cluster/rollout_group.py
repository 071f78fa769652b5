"""The rollout workers as one group: spread a batch over them, survive a worker's death, merge the parts.

A batch is submitted (every worker gets its chunk of whole prompts) and collected later, so the
driver can keep rollouts queued ahead of the learner (``cluster.max_staleness``); a worker runs its
calls in the order they were sent, weight loads included, so each queued rollout samples the
version that was current when it was submitted.

A worker that dies (its process, or its whole node) is restarted by Ray where resources allow
(``max_restarts``); before it samples again it is brought to the current weights, and its chunk is
sent again. Under ``cluster.lost_worker=drop`` a worker that is not back within ``restart_wait_s``
is left out, and the workers left sample its chunks. Either way the batch completes with every
trajectory; restarts and losses are counted. A chunk sampled again after a restart may come from a
newer policy version than the rest of its batch; every trajectory carries the version that made it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError

from cluster.actor_group import DEAD, ActorGroup
from cluster.config import ClusterConfig
from cluster.learner_group import learner_died
from cluster.placement import Placement
from cluster.weight_sync import WeightSync
from pararl.errors import RunError
from pararl.logprobs import TokenLogProbs
from pararl.lora import AdapterConfig
from pararl.plans import Plan
from pararl.types import GenerationRequest, Trajectories, concat_trajectories
from rollout.config import SamplerConfig
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


class RolloutError(RunError):
    """The batch cannot be sampled (a worker keeps dying, or does not answer in time)."""


def split(requests: Sequence[GenerationRequest], parts: int) -> list[list[GenerationRequest]]:
    """Contiguous, nearly equal chunks of whole prompts (a group never spans two workers)."""
    n = len(requests)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(requests[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


@dataclass
class SubmittedRollout:
    """A batch in flight: its chunks, which worker samples each (and that worker's incarnation), the
    policy version the workers hold for it."""

    chunks: list[list[GenerationRequest]]
    group_size: int
    snapshot_steps: Sequence[int]
    plan: Plan | None
    version: int
    refs: dict[int, tuple[int, ray.ObjectRef]] = field(default_factory=dict)  # chunk -> (worker, reference)
    incarnation: dict[int, int] = field(default_factory=dict)  # chunk -> its worker's restarts at sending
    submitted_at: float = field(default_factory=time.perf_counter)


class RolloutGroup:
    def __init__(self, cfg: ClusterConfig, model_folder: str, sampler: SamplerConfig, placement: Placement | None,
                 sync: WeightSync, pad_id: int, dtype: str | None = None, device: str = "cpu",
                 named_format: dict[str, Any] | None = None, behaviour: str = "replay",
                 colocated: ActorGroup | None = None, adapters: AdapterConfig | None = None) -> None:
        """``colocated``: learner ranks that sample too (``cluster.colocated``); each attaches a sampler to
        its own policy instead of a worker being started."""
        self.cfg, self.sync, self.pad_id, self.placement = cfg, sync, pad_id, placement
        self.colocated = colocated is not None
        self.restarts = 0  # workers that died and came back
        self.lost = 0  # workers that died and were left out (lost_worker=drop)
        self.deaths = 0
        threads = cfg.rollout_threads or max(1, int(cfg.rollout_cpus))

        def options(i: int) -> dict[str, Any]:
            out: dict[str, Any] = {"num_cpus": cfg.rollout_cpus, "num_gpus": cfg.rollout_gpus,
                                   "max_restarts": cfg.max_restarts, "max_task_retries": 0,
                                   "resources": dict(cfg.rollout_resources)}
            if placement is not None:
                out["scheduling_strategy"] = placement.strategy(placement.rollout_bundles[i])
            return out

        if colocated is not None:
            threads = cfg.rollout_threads or max(1, int(cfg.learner_cpus))
            self.group = colocated
            self.group.call("attach_sampler", model_folder, sampler, threads, cfg.rollout_logprob_chunk_rows,
                            named_format, behaviour, cfg.colocate_offload)
        else:
            args = (model_folder, sampler, device, dtype, threads, cfg.rollout_logprob_chunk_rows, named_format, behaviour,
                    None, adapters)
            self.group = ActorGroup(RolloutWorker, cfg.rollout_workers, lambda i: args, options, cfg.call_timeout_s)
        self.alive = [True] * len(self.group)
        self.incarnation = [0] * len(self.group)
        self.group.call("ready")

    @property
    def workers(self) -> list:
        """The workers that take part (a dropped one no longer does)."""
        return [a for a, alive in zip(self.group.actors, self.alive) if alive]

    def _live(self) -> list[int]:
        return [i for i, alive in enumerate(self.alive) if alive]

    # -- losing a worker -------------------------------------------------------------------------
    def _recover(self, index: int, err: Exception) -> None:
        """Wait for Ray's restart of worker ``index`` and give it the current weights; or, under
        lost_worker=drop, leave it out once restart_wait_s has passed."""
        self.deaths += 1
        if self.deaths > self.cfg.max_restarts * len(self.group):
            raise RolloutError(f"rollout worker {index} died again ({err}); restarts exhausted") from err
        dropping = self.cfg.lost_worker == "drop"
        wait = self.cfg.restart_wait_s if dropping else self.cfg.call_timeout_s
        try:
            self.group.wait_alive(index, timeout_s=wait)
        except (*DEAD, GetTimeoutError) as again:
            if dropping and len(self._live()) > 1:
                self._drop(index, again)
                return
            hint = "" if dropping else "; cluster.lost_worker=drop goes on with the workers left"
            raise RolloutError(f"rollout worker {index} did not come back within {wait:g}s after dying "
                               f"(no node with room for it?): {again}{hint}") from again
        self.restarts += 1
        self.incarnation[index] += 1
        self.sync.catch_up(self.group.actors[index])

    def _drop(self, index: int, why: Exception) -> None:
        self.alive[index] = False
        self.lost += 1
        try:
            ray.kill(self.group.actors[index], no_restart=True)  # Ray stops waiting for room to restart it
        except ValueError:
            pass
        if self.placement is not None:
            self.placement.release(self.placement.rollout_bundles[index])  # and for room for its bundle
        self.sync.connect(self.sync.learners, self.workers)
        log.warning("rollout worker %d is gone (%s); going on with %d worker(s) (cluster.lost_worker=drop)",
                    index, str(why).strip().splitlines()[-1][:200], len(self.workers))

    def _after_death(self, worker: int, incarnation: int, err: Exception) -> int:
        """The worker that samples a chunk again whose worker died: the same one, restarted (once, however
        many chunks it held), or a live one if it was left out. A colocated worker is a learner rank: its
        death stops the run."""
        if self.colocated:
            raise learner_died("while sampling", err)
        if self.alive[worker] and self.incarnation[worker] == incarnation:
            self._recover(worker, err)
        if self.alive[worker]:
            return worker
        live = self._live()
        return live[worker % len(live)]

    # -- sampling --------------------------------------------------------------------------------
    def _send(self, pending: SubmittedRollout, chunk: int, worker: int, check_version: bool) -> None:
        actor = self.group.actors[worker]
        version = pending.version if check_version else None  # a restarted worker holds the newest weights
        ref = actor.sample.remote(pending.chunks[chunk], pending.group_size, pending.snapshot_steps, version, pending.plan)
        pending.refs[chunk] = (worker, ref)
        pending.incarnation[chunk] = self.incarnation[worker]

    def submit(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int, plan: Plan | None = None) -> SubmittedRollout:
        """Send a batch to the workers now (it queues behind what they already have); ``collect`` gets it.
        ``version``: the policy version the workers will hold when they reach it."""
        live = self._live()
        pending = SubmittedRollout(split(requests, len(live)), group_size, snapshot_steps, plan, version)
        for chunk, worker in enumerate(live[: len(pending.chunks)]):
            self._send(pending, chunk, worker, check_version=True)
        return pending

    def collect(self, pending: SubmittedRollout) -> tuple[Trajectories, TokenLogProbs | None]:
        """Every trajectory of the batch, in request order; a chunk whose worker died is sampled again."""
        results: dict[int, tuple] = {}
        while pending.refs:
            for chunk, (worker, ref) in list(pending.refs.items()):
                try:
                    results[chunk] = self.group.get(ref)
                    del pending.refs[chunk]
                except DEAD as err:
                    again = self._after_death(worker, pending.incarnation[chunk], err)
                    self._send(pending, chunk, again, check_version=False)
                except GetTimeoutError as err:
                    raise RolloutError(f"rollout worker {worker} gave no trajectories within {self.cfg.call_timeout_s:g}s") from err
        parts = [results[i] for i in range(len(pending.chunks))]
        for traj, _ in parts:
            if traj.policy_version < pending.version:
                raise RolloutError(f"trajectories from policy version {traj.policy_version}, expected {pending.version} or newer")
        traj = concat_trajectories([p[0] for p in parts], self.pad_id)
        old = TokenLogProbs.cat([p[1] for p in parts]) if pending.plan is not None else None
        return traj, old

    def sample(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int, plan: Plan | None = None) -> tuple[Trajectories, TokenLogProbs | None]:
        return self.collect(self.submit(requests, group_size, snapshot_steps, version, plan))

    def hashes(self) -> list[str]:
        return self.group.get([a.weights_hash.remote() for a in self.workers])

    def shutdown(self) -> None:
        if not self.colocated:  # colocated actors are the learner group's
            self.group.kill()
