"""Which likelihood plan learns more: the default run's held-out exact-alignment gain per arm, over seeds.

Each arm is ``make train`` (configs/default.yaml, each seed's cached preparation) with the arm's
overrides: ``reward_steps`` scores the likelihood at the reward's sampled steps (two of eight);
``all_m4`` every step, in windows of 4 steps per forward (the same two forwards per trajectory, so
the same learner cost); ``all_m2`` every step in windows of 2 (twice the forwards); ``cfg``,
``cfg_tis`` and ``cfg_sampled`` are ``all_m4`` with guidance on in the rollouts (see ``CFG``);
``cache_r4`` is ``all_m4`` with the prompt cache refreshed every 4 steps. A finished arm's
``results.json`` is read, not rerun, so the bench continues where it stopped. ParaRL wall seconds and
learner compute seconds (MLflow) are printed beside each gain: arms compare at the same number of
ParaRL steps, and the columns say whether that was the same wall-clock.
Run (alone on the machine): ``.venv/bin/python bench/learning.py [--seeds 0 1 2] [--arms reward_steps all_m4]
[--out runs/learning] [key=value ...]``. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

ARMS = {
    "reward_steps": ["learner.coverage=reward_steps"],
    "all_m4": ["learner.coverage=all", "learner.merge_steps=4"],
    "all_m2": ["learner.coverage=all", "learner.merge_steps=2"],
}
# CFG on in the rollouts (and so in the held-out evaluation, which samples as the run does): pi_old is the
# unguided policy (cfg: no correction; cfg_tis: truncated importance weights pi_old / sampled), or the
# learner scores under the guidance itself (cfg_sampled: the unconditional rows replayed, twice the rows).
CFG = ["sampler.cfg_image=2.0", "sampler.cfg_text=1.0", *ARMS["all_m4"]]
ARMS.update({"cfg": CFG, "cfg_tis": [*CFG, "learner.correction=tis"], "cfg_sampled": [*CFG, "learner.scoring=sampled"]})
# The approximate prompt cache in the rollouts (and the evaluation), refreshed every 4 steps.
ARMS["cache_r4"] = ["sampler.prompt_cache_refresh=4", *ARMS["all_m4"]]


def timings(run_dir: Path, run_id: str) -> tuple[float, float]:
    """(wall seconds of the ParaRL steps, learner compute seconds) of a run, from its MLflow record."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    wall, learner = (sum(m.value for m in client.get_metric_history(run_id, key)) for key in ("time.step", "compute.learner"))
    return wall, learner


def run_arm(arm: str, seed: int, out: Path, extra: list[str], cache: str) -> dict:
    """One arm on one seed; a run folder that already holds a finished default run is read, not rerun
    (so ``make train ARGS="seed=N run_dir=runs/learning/reward_steps-seedN"`` is that arm's run)."""
    from shapeworld.default_run import default_run

    run_dir = out / f"{arm}-seed{seed}"
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
    else:
        results = default_run(overrides=[f"seed={seed}", f"run_dir={run_dir}", *ARMS[arm], *extra], cache_dir=cache)
    wall, learner = timings(run_dir, results["run_id"])
    return {"arm": arm, "seed": seed, "wall_s": wall, "learner_s": learner,
            "before": results["before"]["aligned"], "after": results["after"]["aligned"],
            "gain": results["after"]["aligned"] - results["before"]["aligned"],
            "reward_gain": results["after"]["reward"] - results["before"]["reward"]}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        gains = [r["gain"] for r in mine]
        learner = statistics.mean(r["learner_s"] for r in mine)
        out.append({"arm": arm, "seeds": [r["seed"] for r in mine], "gains": gains, "gain": statistics.mean(gains),
                    "std": statistics.stdev(gains) if len(gains) > 1 else None,
                    "reward_gain": statistics.mean(r["reward_gain"] for r in mine),
                    "wall_s": statistics.mean(r["wall_s"] for r in mine), "learner_s": learner,
                    "gain_per_learner_min": statistics.mean(gains) / learner * 60})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["reward_steps", "all_m4"], choices=sorted(ARMS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "learning"))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "pararl-default"))
    parser.add_argument("overrides", nargs="*", help="run config overrides for every arm (key=value)")
    args = parser.parse_args()
    rows = [run_arm(arm, seed, Path(args.out), args.overrides, args.cache) for seed in args.seeds for arm in args.arms]
    table = summarise(rows)
    print(f"{'arm':>13} {'gain':>7} {'std':>6} {'per seed':>24} {'reward':>7} {'wall s':>7} {'learner s':>9} {'gain/learner-min':>16}")
    for t in table:
        per_seed = " ".join(f"{g:+.3f}" for g in t["gains"])
        std = float("nan") if t["std"] is None else t["std"]
        print(f"{t['arm']:>13} {t['gain']:>+7.3f} {std:>6.3f} {per_seed:>24} {t['reward_gain']:>+7.3f} "
              f"{t['wall_s']:>7.0f} {t['learner_s']:>9.0f} {t['gain_per_learner_min']:>16.4f}")
    print(json.dumps({"arms": table, "runs": rows}))


if __name__ == "__main__":
    main()
