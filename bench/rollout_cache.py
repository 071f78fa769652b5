"""The approximate prompt cache on the default world: rollout speed, held-out quality and log-prob gap per r.

For each refresh interval r (``sampler.prompt_cache_refresh``; 1 is exact): seconds per sampling step
of one training batch (prompts_per_step x group_size trajectories, the run's sampler; every r warmed
up, then timed round-robin, median of ``--repeats``), the held-out exact alignment and mean reward of the run's final policy (the run's
evaluation prompts x ``--samples``, the same seeds for every r: paired against r = 1), and the gap
between what was drawn and an exact replay of the same distribution (mean |log p| per token, text and
image apart: what the learner's mismatch metrics see). Run after ``make train`` (alone on the
machine): ``.venv/bin/python bench/rollout_cache.py [--run runs/default] [--refresh 1 2 4 8]``.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def paired(values: list[float], base: list[float]) -> tuple[float, float]:
    """Mean difference to the exact sampler on the same prompts and seeds, and its standard error."""
    d = [a - b for a, b in zip(values, base)]
    mean = statistics.mean(d)
    return mean, statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")


def step_seconds(samplers: dict, requests, group: int, steps: int, repeats: int) -> dict:
    """Median seconds per sampling step of each sampler, warmed up first and timed round-robin, so a slow
    moment of the machine falls on every r alike."""
    for sampler in samplers.values():
        sampler.sample(requests, group_size=group)
    times: dict = {r: [] for r in samplers}
    for _ in range(repeats):
        for r, sampler in samplers.items():
            t = time.perf_counter()
            sampler.sample(requests, group_size=group)
            times[r].append((time.perf_counter() - t) / steps)
    return {r: statistics.median(v) for r, v in times.items()}


def quality(sampler, cfg, bundle, records, train_requests, spec, args) -> dict:
    """Held-out alignment and reward, and the gap between what was drawn and an exact replay of it."""
    from cluster.evaluate import evaluate
    from learner.mismatch import gap_metrics, gap_sums
    from pararl.data import CodeCache
    from pararl.logprobs import trajectory_logprobs
    from pararl.plans import TracePlan
    from reward.judges import RewardJudge
    from reward.pool.client import RewardClient
    from reward.scorer import SemanticScorer
    from rollout.config import scoring_of
    from shapeworld.judge import WorldJudge, world_figures

    scfg = sampler.cfg
    traj = sampler.sample(train_requests, group_size=cfg.data.group_size)
    with torch.no_grad():
        exact = trajectory_logprobs(bundle.policy, bundle.fmt, traj, TracePlan(tuple(range(scfg.steps)), scoring=scoring_of(scfg)))
    gap = gap_metrics(gap_sums(exact.logp, traj.sampled_logp, exact.mask, traj.layout, cap=2.0))
    reward = RewardJudge(RewardClient(cfg.reward, scorer=SemanticScorer(bundle, cfg.reward)), scfg.steps)
    ev = evaluate(bundle.policy, bundle, scfg, records, CodeCache(cfg.data.cache_dir, bundle.image_tokenizer),
                  [reward, WorldJudge(spec)], samples=args.samples, seed=cfg.seed, progress=False)
    figures = world_figures(ev.tasks, ev.judgments)
    aligned = [j["output_alignment"] for j in ev.judgments["world"] if "output_alignment" in j]
    rewards = [j["reward"] for j in ev.judgments["reward"] if j["reward"] is not None]
    return {"r": scfg.prompt_cache_refresh, "aligned": figures["aligned"], "reward": figures["reward"],
            "text_gap": gap["mismatch/text_gap"], "image_gap": gap["mismatch/image_gap"],
            "per_sample": {"aligned": aligned, "reward": rewards}}


def main() -> None:
    from cluster.evaluate import requests_for
    from cluster.run_config import load_run_config
    from pararl.bundle import load_bundle
    from pararl.data import CodeCache, read_records
    from shapeworld.dataset import WorldConfig
    from shapeworld.prepare import torch_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "default"))
    parser.add_argument("--refresh", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "results.json").is_file():
        raise SystemExit(f"{run} holds no finished default run (results.json): run `make train` first")
    cfg = load_run_config(run / "config.yaml")
    bundle = load_bundle(run / "final-policy")
    spec = WorldConfig.from_dict(json.loads((Path(cfg.model) / "world.json").read_text())).spec
    records = read_records(cfg.data.eval)[: cfg.train.eval_prompts]
    cache = CodeCache(cfg.data.cache_dir, bundle.image_tokenizer)
    train_requests = requests_for(read_records(cfg.data.train)[: cfg.data.prompts_per_step], bundle, cache, cfg.seed)
    from rollout.config import resolve_sampler
    from rollout.sampler import ParallelSampler

    samplers = {r: ParallelSampler(bundle.policy, bundle.fmt, resolve_sampler(replace(cfg.sampler, prompt_cache_refresh=r)))
                for r in args.refresh}
    with torch_threads(args.threads):
        seconds = step_seconds(samplers, train_requests, cfg.data.group_size, cfg.sampler.steps, args.repeats)
        rows = [{**quality(samplers[r], cfg, bundle, records, train_requests, spec, args), "step_s": seconds[r]}
                for r in args.refresh]
    base = rows[0]
    print(f"{'r':>3} {'s/step':>8} {'speed-up':>8} {'aligned':>8} {'vs r=1':>15} {'reward':>7} {'vs r=1':>15} "
          f"{'text gap':>9} {'image gap':>9}")
    for row in rows:
        (da, sa), (dr, sr) = (paired(row["per_sample"][k], base["per_sample"][k]) for k in ("aligned", "reward"))
        row.update(speedup=base["step_s"] / row["step_s"], aligned_diff=da, aligned_diff_se=sa, reward_diff=dr,
                   reward_diff_se=sr)
        print(f"{row['r']:>3} {row['step_s']:>8.4f} {row['speedup']:>7.2f}x {row['aligned']:>8.3f} {da:>+8.3f} ± {sa:.3f} "
              f"{row['reward']:>7.3f} {dr:>+8.3f} ± {sr:.3f} {row['text_gap']:>9.4f} {row['image_gap']:>9.4f}")
    print(json.dumps([{k: v for k, v in row.items() if k != "per_sample"} for row in rows]))


if __name__ == "__main__":
    main()
