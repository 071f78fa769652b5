"""Learner ranks as Ray actors, and the small driver-side handle of the group.

Each actor is one torch.distributed rank with its own DeepSpeed engine (``learner.rank``); the ranks
find each other through MASTER_ADDR/MASTER_PORT chosen here (loopback and a free port when every rank
runs on the driver's node, rank 0's node address and a port free there otherwise). Construction is
in two phases, placement first and then the group, so a rank that fails to start raises its error in
the driver instead of leaving the others waiting in ``init_process_group``.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from learner.batch import TrainBatch
from learner.checkpoint import RunState
from learner.config import LearnerConfig, validate
from learner.engine import free_port
from learner.rank import LearnerRank
from pararl.formats import ParallelFormat


@ray.remote
class LearnerActor(LearnerRank):
    """A rank that knows what Ray gave it: its GPU and its node's address."""

    def __init__(self, cfg: LearnerConfig, rank: int, world: int) -> None:
        super().__init__(cfg, rank, world, has_gpu=bool(ray.get_gpu_ids()))

    def node_address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), self.free_port()


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
