"""System overhead of the ParaRL loop: wall seconds per step against the compute on its critical path.

Runs the same config in several modes: ``cluster.max_staleness`` k = 0, 1 and 2, and colocated
(``cluster.colocate``, k = 0) with one and with two ranks, and reads the per-step figures
every component measured where it ran (MLflow): the slowest rollout worker's sampling, the reward
batches, the learner rank's forward/backward. With k = 0 the critical path is rollout + reward +
learner; with k >= 1 the next rollout is queued before this step's reward and update, so it is
max(rollout, reward + learner). The warm-up steps (k + 1 of them: until the queue is full) are left
out. Last line: one JSON object, ``overhead`` = the synchronous fraction.
Run: ``.venv/bin/python bench/e2e.py [CONFIG] [key=value ...]`` (default: ``runs/default/config.yaml``,
the resolved config that ``make train`` writes, its paths pointing into the cache it built).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0",
                   "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def histories(db: Path, run_id: str, keys: list[str]) -> dict[str, list[float]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


MODES = {"k0": [], "k1": ["cluster.max_staleness=1"], "k2": ["cluster.max_staleness=2"],
         # colocated: the learner ranks sample too (one rollout worker per rank); two ranks take the
         # default's optimizer step (64 trajectories) as two halves
         "colocated1": ["cluster.colocate=true", "cluster.learner_ranks=1", "cluster.rollout_workers=1"],
         "colocated2": ["cluster.colocate=true", "cluster.learner_ranks=2", "cluster.rollout_workers=2",
                        "learner.micro_batch_size=32"]}


def measure(config: str, overrides: list[str], mode: str, steps: int) -> dict:
    from cluster.run_config import load_run_config
    from cluster.train import train

    run_dir = Path(tempfile.mkdtemp(prefix="pararl-e2e-")) / mode  # every mode in its own fresh folder
    overrides = [*overrides, *MODES[mode]]
    k = load_run_config(config, overrides).cluster.max_staleness
    out = train(config, [*overrides, f"run_dir={run_dir}", f"learner.checkpoint.folder={run_dir / 'checkpoints'}",
                         f"train.steps={steps}", "train.checkpoint_every=0", "tracking.snapshot_every=0"])
    keys = ["time.step", "compute.rollout", "compute.reward", "compute.learner", "rollout.staleness_max"]
    h = {key: v[min(k + 1, steps - 1):] for key, v in histories(run_dir / "mlflow.db", out["run_id"], keys).items()}
    parts = list(zip(h["compute.rollout"], h["compute.reward"], h["compute.learner"]))
    critical = [r + w + ln if k == 0 else max(r, w + ln) for r, w, ln in parts]
    wall = statistics.mean(h["time.step"])
    crit = statistics.mean(critical)
    return {"mode": mode, "max_staleness": k, "steps_timed": len(critical), "wall_s": wall, "critical_s": crit,
            "overhead": wall / crit - 1, "rollout_s": statistics.mean(h["compute.rollout"]),
            "reward_s": statistics.mean(h["compute.reward"]), "learner_s": statistics.mean(h["compute.learner"]),
            "staleness_max": max(h["rollout.staleness_max"])}


def main() -> None:
    args = sys.argv[1:]
    config = args[0] if args and "=" not in args[0] else str(ROOT / "runs" / "default" / "config.yaml")
    if not Path(config).is_file():
        raise SystemExit(f"no run config at {config}: run `make train` first (it writes runs/default/config.yaml), "
                         "or give a config path")
    overrides = [a for a in args if "=" in a]
    steps = int(os.environ.get("PARARL_E2E_STEPS", "8"))  # a test runs it shorter
    modes = os.environ.get("PARARL_E2E_MODES", ",".join(MODES)).split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"PARARL_E2E_MODES: unknown {unknown}; known: {', '.join(MODES)}")
    rows = [measure(config, overrides, mode, steps) for mode in modes]
    print(f"{'mode':>10} {'k':>2} {'wall s/step':>12} {'critical s':>11} {'overhead':>9} {'rollout':>8} {'reward':>7} {'learner':>8} "
          f"{'staleness':>9}")
    for r in rows:
        print(f"{r['mode']:>10} {r['max_staleness']:>2} {r['wall_s']:>12.3f} {r['critical_s']:>11.3f} {r['overhead']:>8.1%} "
              f"{r['rollout_s']:>8.3f} {r['reward_s']:>7.3f} {r['learner_s']:>8.3f} {r['staleness_max']:>9.0f}")
    sync = rows[0]
    print(json.dumps({"overhead": sync["overhead"], "ratio": sync["overhead"],
                      "speedup": {r["mode"]: sync["wall_s"] / r["wall_s"] for r in rows}, "modes": rows}))


if __name__ == "__main__":
    main()
