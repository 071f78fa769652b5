"""Start or join Ray, and place the actor groups; a placement that cannot be met fails with its reason.

Ray would otherwise wait forever for resources that will never come; we compare what the config asks
for with what the cluster has first, then bound the wait for the placement group itself.
"""
from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ClusterConfig
from pararl.errors import PararlError
from reward.config import RewardConfig

log = logging.getLogger(__name__)


class PlacementError(PararlError):
    """The cluster cannot host what the config asks for; the message names the shortfall."""


ORPHAN_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def reap_orphaned_agents() -> list[int]:
    """Kill this user's Ray agents whose local session is gone: a driver killed with SIGKILL takes its
    raylet with it, but these two are reparented to init and live on. A live session's agents have
    their raylet as parent and are never touched. Returns the pids killed."""
    import psutil

    killed = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "uids"]):
        try:
            cmd = proc.info["cmdline"] or [""]
            if cmd[0].startswith(ORPHAN_AGENTS) and proc.info["ppid"] == 1 and proc.info["uids"].real == os.getuid():
                proc.kill()
                killed.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    psutil.wait_procs([psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)], timeout=10)
    return killed


def start_ray(cfg: ClusterConfig) -> None:
    """Local in-process Ray by default; ``cluster.address`` joins a running cluster."""
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        reaped = reap_orphaned_agents()
        if reaped:
            log.warning("removed %d Ray agent process(es) left by a local run that was killed: pids %s", len(reaped), reaped)
        store = None if cfg.object_store_mb is None else cfg.object_store_mb << 20
        system = {"preallocate_plasma_memory": True} if cfg.preallocate_object_store else None
        with stop_signals_held():
            ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=cfg.dashboard, log_to_driver=True,
                     object_store_memory=store, _system_config=system)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Ray's local processes (GCS, raylet, agents) start in the driver's process group, so a stop signal
    sent to the group as schedulers send it (Slurm, systemd, ``timeout``, ``kill -- -PGID``) killed
    them while the driver was finishing its step and writing its checkpoint. Started with SIGTERM
    blocked (a blocked mask is inherited across exec; Ray blocks SIGINT there already), they outlive
    the driver's last step; ``ray.shutdown`` still stops them (after its one-second grace, with
    SIGKILL)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def stage_needs(cfg: ClusterConfig, reward: RewardConfig | None = None) -> dict[str, tuple[int, dict[str, float]]]:
    """Per stage: how many actors, and what each asks of Ray (CPUs, GPUs, custom resources)."""
    def ask(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {"CPU": cpus, "GPU": gpus, **custom}

    learner = ask(cfg.learner_cpus, cfg.learner_gpus, cfg.learner_resources)
    if cfg.colocate:  # each learner rank is a rollout worker too: one actor, one bundle
        out = {"colocated ranks": (cfg.learner_ranks, learner)}
    else:
        out = {"rollout workers": (cfg.rollout_workers, ask(cfg.rollout_cpus, cfg.rollout_gpus, cfg.rollout_resources)),
               "learner ranks": (cfg.learner_ranks, learner)}
    if reward is not None:
        out["reward replicas"] = (reward.replicas, ask(reward.cpus_per_replica, reward.gpus_per_replica,
                                                        reward.resources_per_replica))
    return out


def required(cfg: ClusterConfig, reward: RewardConfig | None = None) -> dict[str, float]:
    """What the whole run asks of the cluster, resource by resource."""
    total: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    for count, each in stage_needs(cfg, reward).values():
        for name, amount in each.items():
            total[name] = total.get(name, 0.0) + count * amount
    return total


def check_resources(need: dict[str, float], have: dict[str, float]) -> None:
    short = [f"{need[k]:g} {k if k in ('CPU', 'GPU') else repr(k)}s (the cluster has {have.get(k, 0):g})"
             for k in need if need[k] > have.get(k, 0) + 1e-9]
    if short:
        raise PlacementError("the config needs " + " and ".join(short) +
                             ": lower cluster.rollout_*/learner_* or reward.replicas, or add nodes that have them")


@dataclass
class Placement:
    """One single-bundle placement group per rollout worker and per learner rank, all reserved before
    any actor starts. Single bundles, so the bundle of a dropped worker whose node is gone can be given
    up alone; inside a larger group it could not, and Ray would go on trying to place it."""

    groups: list[PlacementGroup]
    rollout_bundles: list[int]
    learner_bundles: list[int]

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.groups[bundle], placement_group_bundle_index=0)

    def release(self, bundle: int) -> None:
        remove_placement_group(self.groups[bundle])

    def remove(self) -> None:
        for group in self.groups:
            remove_placement_group(group)

    def nodes(self) -> dict[str, list[str]]:
        """The address of the node each rollout and learner bundle is on now, from Ray's control store."""
        from ray.util import placement_group_table

        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}

        def where(bundles: list[int]) -> list[str]:
            on = [placement_group_table(self.groups[b]).get("bundles_to_node_id", {}).get(0, "") for b in bundles]
            return [address.get(node, "unplaced") for node in on]

        return {"rollout_workers": where(self.rollout_bundles), "learner_ranks": where(self.learner_bundles)}


def place(cfg: ClusterConfig, reward: RewardConfig | None = None) -> Placement:
    """A bundle per rollout worker and per learner rank (one per colocated rank; reward replicas are Serve's), all reserved
    before any actor starts. A stage's custom resources go into its bundles, so Ray puts each bundle
    on a node that has them."""
    check_resources(required(cfg, reward), ray.cluster_resources())
    bundles = []
    for count, each in stage_needs(cfg).values():
        bundles += [{k: v for k, v in each.items() if v or k == "CPU"}] * count
    groups = [placement_group([b]) for b in bundles]
    try:
        ray.get([g.ready() for g in groups], timeout=cfg.placement_timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        for group in groups:
            remove_placement_group(group)
        raise PlacementError(
            f"placement of {len(bundles)} bundles {bundles} not ready after {cfg.placement_timeout_s:g}s: "
            f"the cluster has {ray.available_resources()} available"
        ) from err
    if cfg.colocate:
        return Placement(groups, list(range(cfg.learner_ranks)), list(range(cfg.learner_ranks)))
    w = cfg.rollout_workers
    return Placement(groups, list(range(w)), list(range(w, w + cfg.learner_ranks)))
