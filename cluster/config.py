"""Cluster configuration: where Ray runs and how the actor groups are placed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: a local Ray started in-process; "auto" or an address joins a cluster
    num_cpus: Optional[int] = None  # local Ray only (logical CPUs; None: the machine's)
    num_gpus: Optional[int] = None  # local Ray only
    dashboard: bool = False  # local Ray only: Ray's dashboard (`ray list actors`, the web UI on 127.0.0.1:8265)
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
    # per bucket: one put and one load call per worker. bench/sync.py, 365 MiB policy: 32 MiB 0.12-0.17 s,
    # 128 MiB 0.11 s, 256 MiB 0.08 s, 512 MiB 0.07 s (median). Under ZeRO-3 a bucket is gathered whole.
    sync_bucket_mb: float = 256.0
    # local Ray's shared-memory object store (None: Ray's default, 30% of RAM). Weight sync puts a
    # policy copy there every step; with preallocation its pages are faulted in once at start-up, not on
    # a put (measured on a 365 MiB policy: puts of 0.03 s, against 0.1-0.7 s when pages are fresh).
    # Size it to a few policy copies; on a cluster these are `ray start` options.
    object_store_mb: Optional[int] = None
    preallocate_object_store: bool = False


def sync_bucket_bytes(cfg: ClusterConfig) -> int:
    return int(cfg.sync_bucket_mb * 2**20)


def check_cluster_config(cfg: ClusterConfig) -> None:
    """Refuse values that would only fail once actors are running."""
    from pararl.errors import ConfigError

    if cfg.mode not in ("sync", "off_policy"):
        raise ConfigError(f"cluster.mode={cfg.mode!r} is not one of: sync, off_policy")
    if cfg.sync_transport not in ("object_store", "collective"):
        raise ConfigError(f"cluster.sync_transport={cfg.sync_transport!r} is not one of: collective, object_store")
    if cfg.rollout_workers < 1 or cfg.learner_ranks < 1:
        raise ConfigError("cluster.rollout_workers and cluster.learner_ranks must be >= 1")
    if cfg.address and cfg.dashboard:
        raise ConfigError("cluster.dashboard applies to a local Ray only; a running cluster has its own "
                          "(`ray start --include-dashboard`)")
    if cfg.address and (cfg.object_store_mb is not None or cfg.preallocate_object_store):
        raise ConfigError("cluster.object_store_mb and cluster.preallocate_object_store apply to a local Ray only; "
                          "on a running cluster pass --object-store-memory to `ray start` and set "
                          "RAY_preallocate_plasma_memory=1 there")
    if cfg.sync_bucket_mb <= 0:
        raise ConfigError(f"cluster.sync_bucket_mb={cfg.sync_bucket_mb} must be positive")
    if cfg.object_store_mb is not None and cfg.object_store_mb < 80:
        raise ConfigError(f"cluster.object_store_mb={cfg.object_store_mb} is below Ray's minimum of 80 MiB")
    for name in ("rollout_cpus", "learner_cpus", "rollout_gpus", "learner_gpus"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"cluster.{name} must be >= 0")
