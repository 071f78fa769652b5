"""A fault soak: a ParaRL run on a real three-node Ray cluster, faults injected at seeded random moments,
and the run checked against an uninterrupted run of the same config.

The cluster is ``cluster.testing.three_nodes``: a head and two worker nodes, each in its own network namespace,
so a node can die for real. The faults, spread evenly over the kinds:

- ``worker``: a rollout worker SIGKILLed while it samples (Ray titles its process
  ``ray::RolloutWorker.sample`` then); Ray restarts it and its chunk is sampled again;
- ``replica``: a reward replica SIGKILLed; Serve replaces it and its requests are sent again;
- ``driver``: SIGTERM to the run's whole process group, as a scheduler sends it (exit 143), then resumed;
- ``learner``: a learner rank SIGKILLed; the run stops with one line (exit 2), then resumed;
- ``node``: w1 (a rollout worker and a reward replica) lost while its worker samples; a new node takes
  its address a few seconds later.

Invariants, checked on the finished run: every data position trained once (each step's first data
position is where the step before ended), no trajectory scored twice or left unscored (the client
refuses either; each step's scored count equals its trajectories), every MLflow step logged once,
and the final weights and every logged metric but the clocks and fault counters equal to the
uninterrupted run's. ``--staleness K`` runs both at ``cluster.max_staleness=K``: there a worker that
restarts samples its chunk again with newer weights, which is correct but not bitwise the
uninterrupted run, so a soak at K >= 1 that should end equal leaves out ``worker`` and ``node``
(``--kinds driver,learner,replica``).

Run as root (network namespaces; iproute2): ``.venv/bin/python bench/soak.py [--steps 60] [--faults 20]
[--seed 0] [--staleness K] [--kinds worker,replica,driver,learner,node] [--workdir DIR]``. Prints a
table of faults (injected, survived, recovery seconds, trajectories lost) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"HTTP_PROXY": "http://127.0.0.1:9", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

KINDS = ("worker", "replica", "driver", "learner", "node")
TITLE = {"worker": "ray::RolloutWorker.sample", "replica": "ray::ServeReplica", "learner": "ray::LearnerActorBody"}
STOP_CODE = {"driver": 143, "learner": 2}  # the exit code of a fault that stops the run
# Ray's or Serve's own counts of what the faults did: the only metrics allowed to differ from a run without faults
FAULT_COUNTERS = ("rollout.restarts", "rollout.workers_lost", "rollout.workers", "reward.retries",
                  "reward.replicas_seen", "reward.replica_losses", "cluster.nodes_lost",
                  "reward.mean_batch_size")  # how Serve's batches formed: when requests arrived
RUN = ("sampler.steps=8", "data.prompts_per_step=8", "tracking.snapshot_every=0", "train.checkpoint_every=1",
       "cluster.max_restarts=20")


class SoakError(RuntimeError):
    pass


@dataclass
class Fault:
    step: int  # injected once the run has logged this many steps ...
    kind: str
    delay_s: float  # ... and this long after
    injected_at: float = 0.0  # seconds into the soak
    recovery_s: float | None = None  # injection -> the next step logged by the run that goes on
    lost: int = 0  # trajectories missing or unscored from the steps up to the next fault
    note: str = ""


def schedule(seed: int, steps: int, faults: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """``faults`` faults at distinct steps in [1, steps - 2], the kinds in equal shares, in seeded order."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise SoakError(f"fault kinds {unknown or 'none'}: choose from {', '.join(KINDS)}")
    if faults > steps - 2:
        raise SoakError(f"{faults} faults need at least {faults + 2} steps (got {steps})")
    rng = random.Random(seed)
    order = [kinds[i % len(kinds)] for i in range(faults)]
    rng.shuffle(order)
    at = sorted(rng.sample(range(1, steps - 1), faults))
    return [Fault(step, kind, round(rng.uniform(0.0, 1.0), 2)) for step, kind in zip(at, order)]


def logged_steps(run_dir: Path) -> int:
    from cluster.testing.three_nodes import latest

    return latest(run_dir)[0]


class Soak:
    """One run under faults: starts ``pararl train`` on the cluster's head, injects, resumes."""

    def __init__(self, cluster, config: Path, run_dir: Path, steps: int, seed: int, *overrides: str) -> None:
        self.cluster, self.config, self.run_dir = cluster, config, run_dir
        self.args = (f"train.steps={steps}", *RUN, *overrides)
        self.output = run_dir.with_suffix(".log")
        self.rng = random.Random(seed)
        self.start_time = time.monotonic()
        self.proc = None

    def start(self, resume: bool = False) -> None:
        from cluster.testing.three_nodes import start_training

        self.proc = start_training(self.cluster, self.config, self.run_dir, self.output, *self.args,
                                   *(["train.resume=true"] if resume else []))

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])

    def wait_logged(self, n: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while logged_steps(self.run_dir) < n:
            if self.proc.poll() is not None:
                raise SoakError(f"the run exited {self.proc.returncode} before logging step {n}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise SoakError(f"the run logged no step {n} within {timeout_s:g}s:\n{self.tail()}")
            time.sleep(0.1)

    def wait_process(self, title: str, node: str | None = None, timeout_s: float = 120) -> int:
        """A process titled ``title`` (on ``node``), chosen at random when there are several."""
        deadline = time.monotonic() + timeout_s
        while not (pids := self.cluster.processes(title, node)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SoakError(f"no process titled {title!r} on {node or 'any node'}:\n{self.tail()}")
            time.sleep(0.05)
        return self.rng.choice(sorted(pids))

    def inject(self, fault: Fault) -> None:
        """The fault, then until the run that goes on logs its next step (a stopped run resumed first).
        The victim is found first (a worker only while it samples), so the clock starts at the kill."""
        self.wait_logged(fault.step)
        time.sleep(fault.delay_s)
        if fault.kind in TITLE:
            victim = self.wait_process(TITLE[fault.kind])
        elif fault.kind == "node":
            self.wait_process(TITLE["worker"], node="w1")
        t0, logged = time.monotonic(), logged_steps(self.run_dir)
        fault.injected_at = round(t0 - self.start_time, 1)
        if fault.kind == "driver":
            os.killpg(self.proc.pid, signal.SIGTERM)
        elif fault.kind == "node":
            self.cluster.kill("w1")
        else:
            os.kill(victim, signal.SIGKILL)
        if fault.kind in STOP_CODE:
            self._resume_after(fault)
            logged = logged_steps(self.run_dir)  # the stopped run may have logged its last step meanwhile
        elif fault.kind == "node":
            time.sleep(5)  # the machine is replaced: a new node at w1's address
            self.cluster.restart("w1")
        self.wait_logged(logged + 1)
        fault.recovery_s = round(time.monotonic() - t0, 1)

    def _resume_after(self, fault: Fault) -> None:
        try:
            code = self.proc.wait(timeout=600)
        except subprocess.TimeoutExpired as err:
            raise SoakError(f"the run did not stop within 600 s of a {fault.kind} fault:\n{self.tail()}") from err
        said = [line for line in self.tail(200).splitlines() if line.startswith("pararl train: error:")]
        if code != STOP_CODE[fault.kind]:
            raise SoakError(f"a {fault.kind} fault ended the run with exit {code}, not {STOP_CODE[fault.kind]}:\n{self.tail()}")
        fault.note = said[-1][len("pararl train: error: "):][:80] if said and fault.kind == "learner" else f"exit {code}"
        self.start(resume=True)

    def run(self, faults: list[Fault]) -> float:
        """The whole run, every fault injected; its wall seconds."""
        self.start()
        for fault in faults:
            self.inject(fault)
        try:
            code = self.proc.wait(timeout=1800)
        except subprocess.TimeoutExpired as err:
            raise SoakError(f"the run did not finish:\n{self.tail()}") from err
        if code != 0:
            raise SoakError(f"the run exited {code} after its last fault:\n{self.tail()}")
        return time.monotonic() - self.start_time


# -- what the finished run holds ---------------------------------------------------------------------
def final_hash(run_dir: Path) -> str:
    """The policy's weights in the run's last checkpoint (``pararl.sync``'s per-tensor hash)."""
    import torch

    from learner.checkpoint import latest_checkpoint
    from pararl.sync.buckets import weights_hash

    saved = latest_checkpoint(run_dir / "checkpoints")
    states = torch.load(saved / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return weights_hash(states["module"].items())


def histories(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """The run's status and every metric's (step, value) history, duplicates kept."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("pararl").experiment_id])
    if len(runs) != 1:
        raise SoakError(f"{len(runs)} MLflow runs in {run_dir}, expected the one run resumed in place")
    keys = runs[0].data.metrics
    return runs[0].info.status, {k: sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, k))
                                 for k in keys}


def check(status: str, mine: dict, theirs: dict, steps: int, per_step: int, weights_equal: bool) -> dict[str, object]:
    """The invariants, each as a list of what breaks it (empty: it holds): ``mine`` and ``theirs`` are the
    faulted and the uninterrupted run's histories."""
    from cluster.driver import timing_metric

    every = list(range(steps))
    values = lambda key: [v for _, v in mine.get(key, [])]  # noqa: E731
    positions = values("data.position")
    prompts = values("data.prompts")
    broken = {
        "status": [] if status == "FINISHED" else [status],
        # each key at the steps the uninterrupted run logs it (R_t of a denoising step only where it was sampled), once
        "logged_once": sorted(k for k in mine.keys() | theirs.keys() if [s for s, _ in mine.get(k, [])] !=
                              [s for s, _ in theirs.get(k, [])] or len({s for s, _ in mine[k]}) != len(mine[k]))
                       + ([] if [s for s, _ in mine.get("reward.mean", [])] == every else ["reward.mean"]),
        "positions_once": [s for s in every if s >= len(positions) or positions[s] != sum(prompts[:s])],
        "scored_once": [s for s, (n, t) in enumerate(zip(values("reward.scored"), values("rollout.trajectories")))
                        if n != t or t != per_step],
        "dropped": [s for s, d in enumerate(values("reward.dropped")) if d],
        "metrics_equal": sorted(k for k in mine.keys() | theirs.keys()
                                if not timing_metric(k) and k not in FAULT_COUNTERS and mine.get(k) != theirs.get(k)),
        "weights_equal": [] if weights_equal else ["final weights differ"],
    }
    return broken


def lost_per_fault(mine: dict, faults: list[Fault], steps: int, per_step: int) -> None:
    """Trajectories missing or unscored in the steps from each fault to the next (``mine``: the run's histories)."""
    got = dict(mine.get("rollout.trajectories", []))
    dropped = dict(mine.get("reward.dropped", []))
    for fault, upto in zip(faults, [f.step for f in faults[1:]] + [steps]):
        fault.lost = int(sum(per_step - got.get(s, 0) + dropped.get(s, 0) for s in range(fault.step, upto)))


def table(faults: list[Fault]) -> str:
    rows = ["| fault | injected | survived | recovery s (median) | recovery s (max) | trajectories lost |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        if not mine:
            continue
        rec = [f.recovery_s for f in mine if f.recovery_s is not None]
        rows.append(f"| {kind} | {len(mine)} | {len(rec)} | {statistics.median(rec):.1f} | {max(rec):.1f} | "
                    f"{sum(f.lost for f in mine)} |")
    return "\n".join(rows)


def soak(cluster, config: Path, workdir: Path, steps: int, faults: list[Fault], seed: int = 0,
         staleness: int = 0) -> dict[str, object]:
    """An uninterrupted run, then the same run under ``faults``; what held and what did not."""
    baseline, k = workdir / "uninterrupted", f"cluster.max_staleness={staleness}"
    t0 = time.monotonic()
    Soak(cluster, config, baseline, steps, seed, k).run([])
    baseline_s = time.monotonic() - t0
    run_dir = workdir / "faulted"
    wall = Soak(cluster, config, run_dir, steps, seed, k).run(faults)
    (status, mine), (_, theirs) = histories(run_dir), histories(baseline)
    per_step = int(dict(theirs["rollout.trajectories"])[0])
    broken = check(status, mine, theirs, steps, per_step, final_hash(run_dir) == final_hash(baseline))
    lost_per_fault(mine, faults, steps, per_step)
    return {"steps": steps, "staleness": staleness, "faults": len(faults), "survived": sum(f.recovery_s is not None for f in faults),
            "lost": sum(f.lost for f in faults), "broken": {k: v for k, v in broken.items() if v},
            "wall_s": round(wall, 1), "uninterrupted_wall_s": round(baseline_s, 1), "faults_injected": [asdict(f) for f in faults]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--staleness", type=int, default=0, help="cluster.max_staleness of both runs")
    parser.add_argument("--kinds", default=",".join(KINDS), help="the fault kinds to inject, comma-separated")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from cluster.testing.three_nodes import placed_run, three_nodes

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pararl-soak-"))
    try:
        faults = schedule(args.seed, args.steps, args.faults, tuple(args.kinds.split(",")))
    except SoakError as err:
        raise SystemExit(f"bench/soak.py: {err}") from None
    cluster = three_nodes(workdir / "cluster").start()
    try:
        report = soak(cluster, placed_run(cluster, workdir / "config"), workdir, args.steps, faults, args.seed,
                      args.staleness)
    finally:
        cluster.stop()
    for f in faults:
        print(f"step {f.step:3d}  {f.kind:8s} at {f.injected_at:7.1f}s  recovered in {f.recovery_s}s  lost {f.lost}  {f.note}")
    print(table(faults))
    print("invariants:", "all hold" if not report["broken"] else json.dumps(report["broken"]))
    print(json.dumps({k: v for k, v in report.items() if k != "faults_injected"}))


if __name__ == "__main__":
    main()
