"""Cluster configuration: where Ray runs and how the actor groups are placed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from pararl.config import check_custom_resources
from pararl.errors import ConfigError

LOST_WORKER_POLICIES = ("restart", "drop")


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
    # custom Ray resources each rollout worker's bundle asks for, e.g. {rollout_node: 1}: a worker then
    # runs only on nodes started with them (`ray start --resources='{"rollout_node": 4}'`)
    rollout_resources: Dict[str, float] = field(default_factory=dict)
    learner_ranks: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    learner_resources: Dict[str, float] = field(default_factory=dict)  # the same, per learner rank
    placement_timeout_s: float = 60.0  # an unsatisfiable placement fails after this, naming what is missing
    call_timeout_s: float = 1800.0  # every remote call has a timeout
    max_restarts: int = 3  # restarts of a failed rollout worker
    # a rollout worker that died (its node, say): "restart" waits for Ray to restart it where resources
    # allow and fails the step if it cannot within call_timeout_s; "drop" waits restart_wait_s, then the
    # run goes on with the workers left (its share of the batch is sampled by them)
    lost_worker: str = "restart"
    restart_wait_s: float = 60.0
    # k: rollout may run up to k policy versions ahead of the learner (0: synchronous; 1: step k+1 is
    # sampled while step k is learned). A trajectory more than k versions old is never trained on.
    max_staleness: int = 0
    mode: Optional[str] = None  # the former name of max_staleness: "sync" (0) or "off_policy" (1)
    sync_transport: str = "object_store"  # object_store | collective (nccl on GPU, gloo on CPU)
    # Rollout and training on the same devices and in the same processes: each learner rank also samples
    # (cluster.rollout_workers = learner_ranks; each takes learner_cpus/gpus/resources), its sampler
    # reads the learner's own weights (a new version costs nothing to send), and under a GPU the
    # optimizer state steps aside to host memory while it samples (colocate_offload).
    colocate: bool = False
    colocate_offload: bool = True
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
    if cfg.mode is not None:
        staleness = {"sync": 0, "off_policy": 1}.get(cfg.mode)
        if staleness is None:
            raise ConfigError(f"cluster.mode={cfg.mode!r} is not one of: sync, off_policy (or set cluster.max_staleness)")
        if cfg.max_staleness not in (0, staleness):
            raise ConfigError(f"cluster.mode={cfg.mode} means max_staleness={staleness}, but cluster.max_staleness="
                              f"{cfg.max_staleness}: set only max_staleness")
        cfg.max_staleness, cfg.mode = staleness, None
    if cfg.address and cfg.address.startswith("ray://"):
        raise ConfigError(f"cluster.address={cfg.address}: Ray Client is not supported (the weight sync streams "
                          "through Ray generators, which Ray Client lacks); run the driver on a node of the cluster "
                          "(cluster.address=auto or HEAD_IP:6379), e.g. as a Ray job: "
                          "ray job submit --address http://HEAD_IP:8265 -- pararl train CONFIG")
    check_colocated(cfg)
    if cfg.max_staleness < 0:
        raise ConfigError(f"cluster.max_staleness={cfg.max_staleness} must be >= 0")
    if cfg.lost_worker not in LOST_WORKER_POLICIES:
        raise ConfigError(f"cluster.lost_worker={cfg.lost_worker!r} is not one of: {', '.join(LOST_WORKER_POLICIES)}")
    if cfg.restart_wait_s < 0:
        raise ConfigError(f"cluster.restart_wait_s={cfg.restart_wait_s} must be >= 0")
    for key in ("rollout_resources", "learner_resources"):
        check_custom_resources(getattr(cfg, key), f"cluster.{key}")
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
    shared = 0 < cfg.rollout_gpus < 1 or 0 < cfg.learner_gpus < 1
    if cfg.sync_transport == "collective" and cfg.rollout_gpus > 0 and shared and not cfg.colocate:
        raise ConfigError(f"cluster.sync_transport=collective with rollout_gpus={cfg.rollout_gpus} and learner_gpus="
                          f"{cfg.learner_gpus}: fractions let a rollout worker and a learner rank share a GPU, and NCCL "
                          "refuses two ranks of one group on the same device; use sync_transport=object_store, or whole GPUs")



def check_colocated(cfg: ClusterConfig) -> None:
    """Colocated, a rollout worker is a learner rank: the knobs that place or restart workers apart refuse."""
    if not cfg.colocate:
        return
    if cfg.rollout_workers != cfg.learner_ranks:
        raise ConfigError(f"cluster.colocate=true makes every learner rank a rollout worker: set cluster.rollout_workers="
                          f"{cfg.learner_ranks} (= learner_ranks), not {cfg.rollout_workers}")
    if cfg.sync_transport != "object_store":
        raise ConfigError(f"cluster.sync_transport={cfg.sync_transport} does not apply under cluster.colocate=true: "
                          "the sampler reads the learner's weights in its own process")
    if cfg.lost_worker != "restart":
        raise ConfigError("cluster.lost_worker=drop does not apply under cluster.colocate=true: a lost colocated "
                          "worker is a lost learner rank, which stops the run (resume continues it)")
    if cfg.rollout_resources:
        raise ConfigError("cluster.rollout_resources does not apply under cluster.colocate=true: the colocated ranks "
                          "ask for cluster.learner_resources")
