"""Weight sync from learner rank 0 to every rollout worker, with a policy version.

The lifecycle, once: (1) every learner rank iterates its weights in buckets (a collective under
ZeRO-3), rank 0 yields each bucket into Ray's object store (put once); (2) each rollout worker gets
every bucket (shared memory on one node, no per-worker copy by the learner) and copies it into its
live model; (3) each worker confirms the whole set arrived and moves to the new version. The bucket
references of the latest version are kept, so a restarted worker can be brought up to date.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import ray


@dataclass
class PublishedWeights:
    version: int
    buckets: list = field(default_factory=list)  # ObjectRefs, one per bucket
    seconds: float = 0.0


class WeightSync:
    def __init__(self, bucket_bytes: int, timeout_s: float) -> None:
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.latest: PublishedWeights | None = None

    def broadcast(self, learner_actors: Sequence, workers: Sequence, version: int) -> PublishedWeights:
        """Publish version ``version`` from the learner ranks and load it into ``workers``."""
        start = time.perf_counter()
        stream = learner_actors[0].stream_weights.options(num_returns="streaming").remote(self.bucket_bytes)
        drains = [a.drain_weights.remote(self.bucket_bytes) for a in learner_actors[1:]]
        refs, loads = [], []
        for ref in stream:  # load each bucket as soon as it exists
            refs.append(ref)
            loads += [w.load_bucket.remote(ref) for w in workers]
        done = [w.finish_sync.remote(version) for w in workers]
        ray.get(loads + done + drains, timeout=self.timeout_s)
        self.latest = PublishedWeights(version, refs, time.perf_counter() - start)
        return self.latest

    def catch_up(self, worker) -> None:
        """Bring one (restarted) worker to the latest published version before it samples again."""
        if self.latest is None:
            return
        loads = [worker.load_bucket.remote(ref) for ref in self.latest.buckets]
        ray.get(loads + [worker.finish_sync.remote(self.latest.version)], timeout=self.timeout_s)
