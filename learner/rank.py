"""The body of one learner rank: a ``Learner`` plus the calls the driver and weight sync make on it.

No Ray here: ``cluster.learner_group`` runs this class as one Ray actor per rank and hands it what
only Ray knows (whether it was given a GPU). What crosses the actor boundary is a ``TrainBatch``
shard (tensors), metrics (floats), buckets of CPU tensors and hashes: never a model.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Iterator

from learner.batch import TrainBatch
from learner.checkpoint import RunState
from learner.config import LearnerConfig, validate
from pararl.devices import resolve_dtype
from pararl.formats import ParallelFormat
from pararl.net import free_port
from pararl.sync import collective
from pararl.sync.buckets import bucket_plan, full_numel, named_weights
from pararl.sync.wire import TensorRun, encode_bucket


class LearnerRank:
    def __init__(self, cfg: LearnerConfig, rank: int, world: int, has_gpu: bool = False) -> None:
        self.cfg, self.rank, self.world, self.has_gpu = validate(cfg), rank, world, has_gpu
        self.learner = None
        # DeepSpeed chooses its accelerator once, at import: fix it before anything imports deepspeed.
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and has_gpu)
        os.environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"

    def free_port(self, host: str = "127.0.0.1") -> int:
        return free_port(host)

    def setup(self, policy_path: str, fmt: ParallelFormat, addr: str, port: int, reference_path: str | None) -> bool:
        from learner.trainer import Learner  # after DS_ACCELERATOR is set (it imports deepspeed)

        local_rank = 0 if self.has_gpu else None  # Ray shows each actor only its own GPU
        self.learner = Learner(self.cfg, policy_path, fmt, rank=self.rank, world=self.world, port=port, addr=addr,
                               reference_path=reference_path, local_rank=local_rank)
        return True

    def train(self, shard: TrainBatch) -> dict:
        return self.learner.train_batch(shard)

    def save_checkpoint(self, state: dict, folder: str | None = None, files: dict[str, bytes] | None = None) -> str:
        return str(self.learner.save_checkpoint(RunState(**state), folder, files if self.rank == 0 else None))

    def load_checkpoint(self, path: str | None = None) -> dict:
        return asdict(self.learner.load_checkpoint(path))

    def weight_buckets(self, bucket_bytes: int) -> list | None:
        """All ranks iterate (a collective under ZeRO-3); rank 0 returns the buckets."""
        buckets = [b for b in self.learner.weight_buckets(bucket_bytes)]
        return buckets if self.rank == 0 else None

    def weights_hash(self) -> str:
        return self.learner.weights_hash()

    def sync_bytes(self) -> int:
        """The bytes one new policy version sends (under LoRA: the adapters')."""
        named = named_weights(self.learner.engine.module, self.learner.synced)
        return sum(full_numel(t) * t.element_size() for _, t in named)

    # -- weight sync: the sender's side of pararl.sync ---------------------------------------
    def stream_weights(self, bucket_bytes: int) -> Iterator[list[TensorRun]]:
        """Rank 0's weights, one bucket per yielded object, as runs of tensors that are contiguous in the
        learner's memory. Run as a Ray streaming generator, rollout workers start loading the first
        bucket while later ones are still gathered; every other rank runs ``drain_weights`` at the same
        time (ZeRO-3 gathers are collective)."""
        for bucket in self.learner.weight_buckets(bucket_bytes):
            yield encode_bucket(bucket)

    def drain_weights(self, bucket_bytes: int) -> int:
        return sum(1 for _ in self.learner.weight_buckets(bucket_bytes))

    def join_sync_group(self, addr: str, port: int, world: int, backend: str) -> bool:
        """Rank 0 joins the weight-sync group with the rollout workers (rank 0 of that group)."""
        self.sync_group, self.sync_backend = collective.join_group(addr, port, 0, world, backend), backend
        return True

    def sync_plan(self, bucket_bytes: int) -> list[list[str]]:
        return bucket_plan(self.learner.engine.module, bucket_bytes, only=self.learner.synced)

    def send_weights(self, bucket_bytes: int, wire_dtype: str) -> int:
        return collective.send(self.sync_group, self.learner.weight_buckets(bucket_bytes), self.sync_backend,
                               resolve_dtype(wire_dtype))
