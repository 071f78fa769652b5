"""Weight sync from learner rank 0 to every rollout worker, with a policy version.

The lifecycle, written once for every transport: ``connect`` (once, and again after a worker
restarts), ``broadcast(version)`` (all ranks export their weights in buckets, a collective under
ZeRO-3; rank 0's buckets reach every worker, which copies them into its live model and moves to
``version``), and ``catch_up(worker)`` (a restarted worker gets the current version before it
samples). ``broadcast(version, wait=False)`` returns once the learner has handed its weights over:
the workers load them after the calls they already hold (rollouts queued ahead of the learner), and
``wait()`` collects the loads later. A worker that died meanwhile is the rollout group's to restart
and catch up; a learner rank that died is an error here. Transports are registered by name:

- ``object_store`` (default): rank 0 yields each bucket into Ray's object store (put once, numpy, so
  every worker on a node reads it from shared memory); workers load bucket by bucket as they appear.
  The latest version's bucket references are kept for catch-up.
- ``collective``: a broadcast in a process group of rank 0 and the workers, built from its own store
  (``pararl.sync.collective``); NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import ray

from cluster.actor_group import DEAD
from cluster.learner_group import learner_died
from pararl.registry import Registry

TRANSPORTS: Registry[Callable[..., "WeightSync"]] = Registry("weight-sync transport")
register_transport = TRANSPORTS.register


def build_weight_sync(name: str, **kwargs) -> "WeightSync":
    return TRANSPORTS.get(name, "cluster.sync_transport")(**kwargs)


@dataclass
class PublishedWeights:
    version: int
    buckets: list = field(default_factory=list)  # object store: ObjectRefs, one per bucket
    seconds: float = 0.0


class WeightSync:
    def __init__(self, bucket_bytes: int, timeout_s: float, wire_dtype: str = "float32", backend: str = "gloo") -> None:
        self.bucket_bytes, self.timeout_s, self.wire_dtype, self.backend = bucket_bytes, timeout_s, wire_dtype, backend
        self.latest: PublishedWeights | None = None
        self.learners: Sequence = ()
        self.workers: Sequence = ()
        self.in_flight: tuple[list, list] = ([], [])  # (learner-side, worker-side) calls of the last broadcast

    def connect(self, learner_actors: Sequence, workers: Sequence) -> None:
        self.learners, self.workers = list(learner_actors), list(workers)

    def broadcast(self, version: int, wait: bool = True) -> PublishedWeights:
        self.wait()
        start = time.perf_counter()
        try:
            learner_side, worker_side, buckets = self._send(version)
        except DEAD as err:
            raise learner_died("while sending weights", err) from err
        self.in_flight = (learner_side, worker_side)
        self.latest = PublishedWeights(version, buckets, time.perf_counter() - start)
        if wait:
            self.wait()
            self.latest.seconds = time.perf_counter() - start
        return self.latest

    def _send(self, version: int) -> tuple[list, list, list]:
        """Start the transfer of ``version``: its learner-side calls, its worker-side calls, and the
        bucket references a restarted worker catches up from (object store only)."""
        raise NotImplementedError

    def wait(self) -> None:
        """The last broadcast's calls done: a learner rank's failure raises, a dead worker's is left to
        the rollout group (it restarts the worker and calls ``catch_up``)."""
        learner_side, worker_side = self.in_flight
        self.in_flight = ([], [])
        try:
            ray.get(learner_side, timeout=self.timeout_s)
        except DEAD as err:
            raise learner_died("while sending weights", err) from err
        for ref in worker_side:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except DEAD:
                pass

    def catch_up(self, worker) -> None:
        raise NotImplementedError


@register_transport("object_store")
class ObjectStoreSync(WeightSync):
    def _send(self, version: int) -> tuple[list, list, list]:
        stream = self.learners[0].stream_weights.options(num_returns="streaming").remote(self.bucket_bytes)
        drains = [a.drain_weights.remote(self.bucket_bytes) for a in self.learners[1:]]
        refs, loads = [], []
        for ref in stream:  # load each bucket as soon as it exists
            refs.append(ref)
            loads += [w.load_bucket.remote(ref) for w in self.workers]
        return drains, loads + [w.finish_sync.remote(version) for w in self.workers], refs

    def catch_up(self, worker) -> None:
        if self.latest is None:  # nothing published yet: the worker's folder weights are version 0
            return
        loads = [worker.load_bucket.remote(ref) for ref in self.latest.buckets]
        ray.get(loads + [worker.finish_sync.remote(self.latest.version)], timeout=self.timeout_s)


@register_transport("collective")
class CollectiveSync(WeightSync):
    def connect(self, learner_actors: Sequence, workers: Sequence) -> None:
        super().connect(learner_actors, workers)
        self.plan = ray.get(self.learners[0].sync_plan.remote(self.bucket_bytes), timeout=self.timeout_s)
        ray.get([w.check_sync_plan.remote(self.plan) for w in self.workers], timeout=self.timeout_s)
        addr, port = ray.get(self.learners[0].node_address.remote(), timeout=self.timeout_s)
        world = 1 + len(self.workers)
        joins = [self.learners[0].join_sync_group.remote(addr, port, world, self.backend)]
        joins += [w.join_sync_group.remote(addr, port, i + 1, world, self.backend) for i, w in enumerate(self.workers)]
        ray.get(joins, timeout=self.timeout_s)

    def _send(self, version: int) -> tuple[list, list, list]:
        """The learner's send waits in the collective until every worker receives: with rollouts queued
        on the workers it waits for them (and the learner's next update queues behind it)."""
        calls = [self.learners[0].send_weights.remote(self.bucket_bytes, self.wire_dtype)]
        calls += [a.drain_weights.remote(self.bucket_bytes) for a in self.learners[1:]]
        return calls, [w.receive_weights.remote(self.plan, self.wire_dtype, version) for w in self.workers], []

    def catch_up(self, worker) -> None:
        """The restarted worker left the group with its old process: form the group anew, resend the version."""
        self.connect(self.learners, self.workers)
        if self.latest is not None:
            self.broadcast(self.latest.version)
