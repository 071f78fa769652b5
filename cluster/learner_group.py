"""Learner ranks as Ray actors, and the small driver-side handle of the group.

Each actor is one torch.distributed rank with its own DeepSpeed engine (``learner.rank``); the ranks
find each other through MASTER_ADDR/MASTER_PORT chosen here: rank 0's node address as Ray knows it
(loopback in a local Ray kept on loopback) and a port free there, never the driver's node. Construction is
in two phases, placement first and then the group, so a rank that fails to start raises its error in
the driver instead of leaving the others waiting in ``init_process_group``.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from cluster.actor_group import DEAD, ActorGroup
from learner.batch import TrainBatch
from learner.checkpoint import RunState
from learner.config import LearnerConfig, validate
from learner.rank import LearnerRank
from pararl.errors import RunError
from pararl.formats import ParallelFormat


class LearnerActorBody(LearnerRank):
    """A rank that knows what Ray gave it: its GPU and its node's address."""

    def __init__(self, cfg: LearnerConfig, rank: int, world: int) -> None:
        super().__init__(cfg, rank, world, has_gpu=bool(ray.get_gpu_ids()))

    def node_address(self) -> tuple[str, int]:
        """This node's address and a port free on it: rank 0's are the group's rendezvous."""
        ip = ray.util.get_node_ip_address()
        return ip, self.free_port(ip)


LearnerActor = ray.remote(LearnerActorBody)


class LearnerDied(RunError):
    """A learner rank died: the run stops; the last checkpoint is intact and resume=true continues it."""


def learner_died(doing: str, err: Exception) -> LearnerDied:
    why = str(err).strip().splitlines()[-1].split(" Some common causes include")[0]  # Ray's advice list aside
    return LearnerDied(f"a learner rank died {doing} ({why}). The last checkpoint is intact; "
                       "rerun with train.resume=true to continue from it")


def wait_all(refs: list, timeout_s: float) -> list:
    """The results of ``refs``, raising the first failure as soon as it happens (``ray.get`` on the list
    would wait, in list order, for a rank that hangs in a collective whose peer is gone)."""
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise GetTimeoutError(f"{len(pending)} learner rank(s) gave no answer within {timeout_s:g}s")
        ray.get(ready)
    return ray.get(refs)


def first_dead(refs: list, grace_s: float = 10.0) -> Exception | None:
    """The error of a rank among ``refs`` that died (given ``grace_s`` to show it), or None."""
    deadline = time.monotonic() + grace_s
    for ref in refs:
        try:
            ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except DEAD as err:
            return err
        except Exception:  # noqa: BLE001 - that rank's own failure, or still waiting: not a death
            continue
    return None


class LearnerGroup:
    """N learner ranks on Ray: ``train`` splits a batch into N equal shards and returns rank 0's (global)
    metrics. Every call on the ranks goes through ``_get``, so a dead rank, in training or while it
    writes a checkpoint, is one ``LearnerDied`` naming what it was doing."""

    def __init__(self, cfg: LearnerConfig, policy_path: str | Path, fmt: ParallelFormat, world: int = 1,
                 reference_path: str | Path | None = None, num_cpus: float = 1, num_gpus: float | None = None,
                 actor_options: Callable[[int], dict[str, Any]] | None = None, timeout_s: float = 600,
                 actor_class: Any = LearnerActor) -> None:
        """``actor_options(rank)``: that rank's extra Ray options (its placement bundle, its custom resources);
        ``actor_class``: a ``LearnerActorBody`` that does more (``cluster.colocated``: it samples too)."""
        validate(cfg)
        self.world = world
        gpus = num_gpus if num_gpus is not None else (1 if cfg.device == "cuda" else 0)

        def options(rank: int) -> dict[str, Any]:
            return {"num_cpus": num_cpus, "num_gpus": gpus, **(actor_options(rank) if actor_options else {})}

        self.group = ActorGroup(actor_class, world, lambda rank: (cfg, rank, world), options, timeout_s)
        addr, port = self._get(self.group.submit("node_address"), "starting")[0]
        ref = None if reference_path is None else str(reference_path)
        self._get(self.group.submit("setup", str(policy_path), fmt, addr, port, ref), "starting")

    @property
    def actors(self) -> list:
        return self.group.actors

    def _get(self, refs: list, doing: str) -> list:
        """Every rank's answer. A rank that dies fails the call at once, even while the others still wait
        for it inside a collective (or fail there because it went away): that is one ``LearnerDied``."""
        try:
            return wait_all(refs, self.group.timeout_s)
        except DEAD as err:
            raise learner_died(doing, err) from err
        except RayTaskError as err:  # a rank's own error: was it only that a peer rank died?
            dead = first_dead(refs)
            if dead is not None:
                raise learner_died(doing, dead) from err
            raise

    def train_async(self, batch: TrainBatch) -> list:
        """Start one update on every rank (its shard of ``batch``); ``result`` collects it."""
        batch.validate()
        return self.group.submit_each("train", [(batch.shard(rank, self.world),) for rank in range(self.world)])

    def result(self, refs: list, doing: str = "during an update") -> dict:
        return self._get(refs, doing)[0]

    def train(self, batch: TrainBatch) -> dict:
        return self.result(self.train_async(batch))

    def save_checkpoint(self, state: RunState, folder: str | None = None, files: dict[str, bytes] | None = None) -> str:
        """``files``: kept with the checkpoint (rank 0 writes them into the folder before it is sealed)."""
        sent = ray.put(files) if files else None  # once, not once per rank
        return self._get(self.group.submit("save_checkpoint", asdict(state), folder, sent), "while writing a checkpoint")[0]

    def load_checkpoint(self, path: str | None = None) -> RunState:
        return RunState(**self._get(self.group.submit("load_checkpoint", path), "while loading a checkpoint")[0])

    def weight_buckets(self, bucket_bytes: int = 256 << 20) -> list:
        return self._get(self.group.submit("weight_buckets", bucket_bytes), "while exporting weights")[0]

    def weights_hashes(self) -> list[str]:
        """Every rank's hash of its full weights (equal when the data-parallel ranks agree)."""
        return self._get(self.group.submit("weights_hash"), "while hashing its weights")

    def sync_bytes(self) -> int:
        """What one new policy version sends from rank 0 to each rollout worker."""
        return self._get([self.actors[0].sync_bytes.remote()], "while counting its weights")[0]

    def shutdown(self) -> None:
        self.group.kill()
