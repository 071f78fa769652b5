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
    learner_ranks: int = 1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    placement_timeout_s: float = 60.0  # an unsatisfiable placement fails after this, naming what is missing
    call_timeout_s: float = 1800.0  # every remote call has a timeout
    max_restarts: int = 3  # restarts of a failed rollout worker
    mode: str = "sync"  # "sync" or "off_policy" (rollout of step k+1 overlaps learning of step k)
    sync_bucket_mb: int = 64  # smaller buckets pipeline the export with the workers' loads
