"""Learner ranks as Ray actors, and the small driver-side handle of the group.

Each actor is one torch.distributed rank with its own DeepSpeed engine; the ranks find each other
through MASTER_ADDR/MASTER_PORT chosen by the driver (loopback and a free port when every rank runs
on the driver's node, rank 0's node address and a port free there otherwise). Construction is in
two phases, placement first and then the group, so a rank that fails to start raises its error in
the driver instead of leaving the others waiting in ``init_process_group``.

What crosses the actor boundary is a ``TrainBatch`` shard (tensors), metrics (floats), buckets of
CPU tensors and hashes: never a model.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from learner.batch import TrainBatch
from learner.checkpoint import RunState
from learner.config import LearnerConfig, validate
from pararl.formats import ParallelFormat


class LearnerWorker:
    """The body of one rank (``LearnerActor`` is this class as a Ray actor)."""

    def __init__(self, cfg: LearnerConfig, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = validate(cfg), rank, world
        self.learner = None
        # DeepSpeed chooses its accelerator once, at import: fix it before anything imports deepspeed.
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and bool(ray.get_gpu_ids()))
        os.environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"

    def node_address(self) -> tuple[str, int]:
        from learner.engine import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, policy_path: str, fmt: ParallelFormat, addr: str, port: int, reference_path: str | None) -> bool:
        from learner.trainer import Learner

        local_rank = 0 if ray.get_gpu_ids() else None  # Ray shows each actor only its own GPU
        self.learner = Learner(self.cfg, policy_path, fmt, rank=self.rank, world=self.world, port=port, addr=addr,
                               reference_path=reference_path, local_rank=local_rank)
        return True

    def train(self, shard: TrainBatch) -> dict:
        return self.learner.train_batch(shard)

    def save_checkpoint(self, state: dict, folder: str | None = None) -> str:
        return str(self.learner.save_checkpoint(RunState(**state), folder))

    def load_checkpoint(self, path: str | None = None) -> dict:
        return asdict(self.learner.load_checkpoint(path))

    def weight_buckets(self, bucket_bytes: int) -> list | None:
        """All ranks iterate (a collective under ZeRO-3); rank 0 returns the buckets."""
        buckets = [b for b in self.learner.weight_buckets(bucket_bytes)]
        return buckets if self.rank == 0 else None

    def weights_hash(self) -> str:
        return self.learner.weights_hash()

    def stream_weights(self, bucket_bytes: int):
        """Rank 0's weights for sync, one bucket per yielded object (numpy: zero-copy in the object store),
        as runs of tensors that are contiguous in the learner's memory (``rollout.worker.encode_run``).

        A Ray streaming generator: rollout workers start loading the first bucket while later ones are
        still being gathered. Every other rank runs ``drain_weights`` at the same time (ZeRO-3 gathers
        are collective).
        """
        from learner.weights import contiguous_runs, run_span
        from rollout.worker import encode_run

        for bucket in self.learner.weight_buckets(bucket_bytes):
            # tensors that sit back to back travel as one array: one copy into the store per run
            yield [encode_run([(n, tuple(t.shape)) for n, t in run], run_span(run)) for run in contiguous_runs(bucket)]

    def drain_weights(self, bucket_bytes: int) -> int:
        return sum(1 for _ in self.learner.weight_buckets(bucket_bytes))

    def join_sync_group(self, addr: str, port: int, world: int, backend: str) -> bool:
        """Rank 0 joins the weight-sync group with the rollout workers (rank 0 of that group)."""
        from cluster.collective import join_group

        self.sync_group, self.sync_backend = join_group(addr, port, 0, world, backend), backend
        return True

    def sync_plan(self, bucket_bytes: int) -> list[list[str]]:
        from cluster.collective import bucket_plan

        return bucket_plan(self.learner.engine.module, bucket_bytes)

    def send_weights(self, bucket_bytes: int, wire_dtype: str) -> int:
        import torch

        from cluster.collective import send

        return send(self.sync_group, self.learner.weight_buckets(bucket_bytes), self.sync_backend, getattr(torch, wire_dtype))


LearnerActor = ray.remote(LearnerWorker)


class LearnerGroup:
    """N learner ranks on Ray: ``train`` splits a batch into N equal shards and returns rank 0's (global) metrics."""

    def __init__(self, cfg: LearnerConfig, policy_path: str | Path, fmt: ParallelFormat, world: int = 1,
                 reference_path: str | Path | None = None, num_cpus: float = 1, num_gpus: float | None = None,
                 actor_options: dict[str, Any] | None = None, timeout_s: float = 600) -> None:
        validate(cfg)
        self.world, self.timeout = world, timeout_s
        gpus = num_gpus if num_gpus is not None else (1 if cfg.device == "cuda" else 0)
        options = {"num_cpus": num_cpus, "num_gpus": gpus, **(actor_options or {})}
        self.actors = [LearnerActor.options(**options).remote(cfg, rank, world) for rank in range(world)]
        addresses = self._get([a.node_address.remote() for a in self.actors])
        ips = {ip for ip, _ in addresses}
        if ips == {ray.util.get_node_ip_address()}:
            from learner.engine import free_port

            addr, port = "127.0.0.1", free_port()
        else:
            addr, port = addresses[0]
        ref = None if reference_path is None else str(reference_path)
        self._get([a.setup.remote(str(policy_path), fmt, addr, port, ref) for a in self.actors])

    def _get(self, refs):
        return ray.get(refs, timeout=self.timeout)

    def train(self, batch: TrainBatch) -> dict:
        batch.validate()
        shards = [batch.shard(rank, self.world) for rank in range(self.world)]
        return self._get([a.train.remote(s) for a, s in zip(self.actors, shards)])[0]

    def save_checkpoint(self, state: RunState, folder: str | None = None) -> str:
        return self._get([a.save_checkpoint.remote(asdict(state), folder) for a in self.actors])[0]

    def load_checkpoint(self, path: str | None = None) -> RunState:
        return RunState(**self._get([a.load_checkpoint.remote(path) for a in self.actors])[0])

    def weight_buckets(self, bucket_bytes: int = 256 << 20) -> list:
        return self._get([a.weight_buckets.remote(bucket_bytes) for a in self.actors])[0]

    def weights_hashes(self) -> list[str]:
        """Every rank's hash of its full weights (equal when the data-parallel ranks agree)."""
        return self._get([a.weights_hash.remote() for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
