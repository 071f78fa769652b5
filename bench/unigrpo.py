"""UniGRPO on the world: each task's held-out score before and after, per seed and over seeds.

Reads the finished runs of ``make train ARGS="--config configs/unigrpo-world.yaml seed=N run_dir=..."``
and evaluates each run's warm-up policy and its exported ParaRL policy on ALL the world's held-out
prompts, ``--samples`` times each with the same seeds (a paired difference), with the run's own
config: exact alignment and prompt following for drawing and editing, ``t2i_follows`` (the image obeys
the prompt) for text-to-image, ``understand_correct`` and ``reason_correct`` (the answer is the
reference) for the questions. The run's own summary used the first ``train.eval_prompts`` prompts;
this is more samples per task, and so smaller standard errors, for seconds of sampling.
Run (alone on the machine): ``.venv/bin/python bench/unigrpo.py runs/unigrpo-world runs/unigrpo-seed1 ...
[--samples 4]``. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK_SCORES = ("aligned", "follows", "t2i_follows", "understand_correct", "reason_correct", "reward")


def evaluate_run(run_dir: Path, samples: int) -> dict:
    """Both policies on every held-out prompt, as the run's own evaluation does (``pararl eval``'s path),
    into ``run_dir/eval-all``."""
    from cluster.run_config import load_run_config
    from pararl.data import read_records
    from shapeworld.default_run import eval_job, held_out

    cfg = load_run_config(run_dir / "config.yaml")
    prompts = len(read_records(cfg.data.eval))
    job = eval_job(cfg, str(Path(cfg.data.eval).parent / "world.json"), samples, prompts, run_dir / "eval-all")
    before, _ = held_out(job, "baseline")
    job.models["model"] = str(run_dir / "final-policy")
    after, _ = held_out(job, "model")
    return {"seed": cfg.seed, "run_dir": str(run_dir), "prompts": prompts, "samples": samples,
            "before": before, "after": after}


def table(runs: list[dict]) -> str:
    seeds = " | ".join(f"seed {r['seed']}: before -> after" for r in runs)
    lines = [f"| score | {seeds} | mean change | std over seeds | change / std |",
             "| --- |" + " --- |" * (len(runs) + 3)]
    for key in TASK_SCORES:
        if not all(key in r["before"] for r in runs):
            continue
        cells = [f"{r['before'][key]:.3f} -> {r['after'][key]:.3f} (± {r['after'].get(key + '_se', float('nan')):.3f})"
                 for r in runs]
        changes = [r["after"][key] - r["before"][key] for r in runs]
        mean = statistics.mean(changes)
        std = statistics.stdev(changes) if len(changes) > 1 else float("nan")
        ratio = mean / std if std and std == std else float("nan")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {mean:+.3f} | {std:.3f} | {ratio:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    runs = [evaluate_run(r, args.samples) for r in args.runs]
    print(table(runs))
    print(json.dumps({"runs": runs}, default=str))


if __name__ == "__main__":
    main()
