"""Cluster configuration: where Ray runs and how the actor groups are placed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: a local Ray started in-process; "auto" or an address joins a cluster
    num_cpus: Optional[int] = None  # local Ray only (logical CPUs; None: the machine's)
    num_gpus: Optional[int] = None  # local Ray only
    rollout_workers: int = 2
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0
    rollout_threads: Optional[int] = None  # torch threads per rollout worker (None: its CPUs, at least 1)
    rollout_logprob_chunk_rows: Optional[int] = None  # rows per forward of the behaviour log-probs (None: one forward)
    learner_ranks: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    placement_timeout_s: float = 60.0  # an unsatisfiable placement fails after this, naming what is missing
    call_timeout_s: float = 1800.0  # every remote call has a timeout
    max_restarts: int = 3  # restarts of a failed rollout worker
    mode: str = "sync"  # "sync" or "off_policy" (rollout of step k+1 overlaps learning of step k)
    sync_transport: str = "object_store"  # object_store | collective (nccl on GPU, gloo on CPU)
    sync_bucket_mb: int = 32  # smaller buckets pipeline the export with the workers' loads (bench/sync.py)


def check_cluster_config(cfg: ClusterConfig) -> None:
    """Refuse values that would only fail once actors are running."""
    from pararl.errors import ConfigError

    if cfg.mode not in ("sync", "off_policy"):
        raise ConfigError(f"cluster.mode={cfg.mode!r} is not one of: sync, off_policy")
    if cfg.sync_transport not in ("object_store", "collective"):
        raise ConfigError(f"cluster.sync_transport={cfg.sync_transport!r} is not one of: collective, object_store")
    if cfg.rollout_workers < 1 or cfg.learner_ranks < 1:
        raise ConfigError("cluster.rollout_workers and cluster.learner_ranks must be >= 1")
    for name in ("rollout_cpus", "learner_cpus", "rollout_gpus", "learner_gpus"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"cluster.{name} must be >= 0")
