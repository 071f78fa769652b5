"""Single-process pilot of the whole ParaRL loop on the generated world (no Ray).

Per seed: prepare the world, the SFT warm-up and the CLIP reward (cached), evaluate the warm-up on
held-out prompts, run ParaRL for ``--steps`` iterations and evaluate again. One iteration: B training
prompts x G trajectories from the parallel sampler with snapshots at s sampled steps (random per
iteration, the last always included), the in-process semantic reward (``RewardClient`` with a local
``SemanticScorer``), group advantages, behaviour log-probs with the same ``TracePlan`` on the sampling
model, one ``Learner.train_batch`` (DeepSpeed, one rank), and the new weights copied into the
sampling model. Logged per iteration: reward, the share of R_t clipped at 0 and at 1, the share of
groups with equal rewards (zero advantage), the batch's exact alignment rate, KL and timing.

The figure that matters: after - before of the held-out exact alignment rate and mean reward, over
seeds; the criterion is mean(diff) > 2 std(diff). Last line: one JSON object.
Run: ``.venv/bin/python bench/pilot.py --seeds 0 1 2 [--steps 150] [--cache .cache/pilot]``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cluster.evaluate import batch_samples, evaluate, requests_for
from learner.advantages import compute_advantages
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.trainer import Learner
from pararl.bundle import load_bundle
from pararl.data import CodeCache, read_records
from pararl.logprobs import trajectory_logprobs
from pararl.plans import TracePlan
from reward.config import RewardConfig, RewardModelConfig
from reward.judges import RewardJudge
from reward.pool.client import RewardClient
from reward.scorer import SemanticScorer
from reward.semantic import choose_steps
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from shapeworld import load_world_config
from shapeworld.judge import WorldJudge, world_figures
from shapeworld.prepare import default_config, prepare_default


def reward_config(paths: dict, sampled_steps: int, first_step: float) -> RewardConfig:
    return RewardConfig(models={paths["reward_label"]: RewardModelConfig(name="open_clip", kwargs=dict(paths["clip_kwargs"]))},
                        stats_file=paths["reward_stats"], sampled_steps=sampled_steps, include_final=True,
                        step_sampling="random", first_step=first_step, max_batch_size=256)


def run_seed(args, seed: int) -> dict:
    timings = {}
    start = time.perf_counter()
    cache_dir = Path(args.cache) / f"seed{seed}"
    paths = prepare_default(cache_dir, seed=seed, cfg=prepare_config(args, seed))
    timings["prepare"] = time.perf_counter() - start
    spec = load_world_config(Path(paths["world"]).parent).spec
    bundle = load_bundle(paths["model"])
    fmt = bundle.fmt
    cache = CodeCache(paths["codes"], bundle.image_tokenizer)
    train_records, eval_records = read_records(paths["train"]), read_records(paths["eval"])
    rcfg = reward_config(paths, args.sampled_steps, args.first_step)
    client = RewardClient(rcfg, scorer=SemanticScorer(bundle, rcfg))
    scfg = SamplerConfig(steps=args.sampler_steps, text_len=paths["text_len"], text_temperature=args.text_temperature,
                         image_temperature=args.image_temperature, image_noise=args.image_noise, cfg_image=0.0, cfg_text=0.0)

    world = WorldJudge(spec)

    def held_out(tag: str) -> dict:
        t = time.perf_counter()
        res = evaluate(bundle.policy, bundle, scfg, eval_records, cache, [RewardJudge(client, scfg.steps), world],
                       samples=args.eval_samples, batch_prompts=args.eval_batch, seed=10_000 + seed, progress=False)
        c = world_figures(res.tasks, res.judgments)
        timings[f"eval_{tag}"] = time.perf_counter() - t
        print(f"[seed {seed}] {tag}: reward {c['reward']:.4f} ± {c['reward_se']:.4f}  aligned {c['aligned']:.3f} ± "
              f"{c['aligned_se']:.3f}  agreement {c['agreement']:.3f}  follows {c['follows']:.3f}  ({res.n} samples, "
              f"{res.seconds:.1f}s)", flush=True)
        return c

    before = held_out("before")
    lcfg = LearnerConfig(lr=args.lr, beta=args.beta, kl_estimator="k3", kl_reference="reference", zero_stage=args.zero_stage,
                         micro_batch_size=args.micro_batch, grad_accumulation=(args.B * args.G) // args.micro_batch,
                         updates_per_batch=args.updates, eps_low=args.eps, eps_high=args.eps, device="cpu",
                         advantage=args.advantage, seed=seed, aggregation=args.aggregation)
    learner = Learner(lcfg, paths["model"], fmt)
    rng = random.Random(seed)
    train_requests = requests_for(train_records, bundle, cache, seed)
    sampler = ParallelSampler(bundle.policy, fmt, scfg)  # samples with the live weights copied in each iteration
    log = []
    t_rl = time.perf_counter()
    for it in range(args.steps):
        t0 = time.perf_counter()
        idx = rng.sample(range(len(train_records)), args.B)
        reqs = [replace(train_requests[i], seed=rng.getrandbits(31)) for i in idx]
        steps = choose_steps(scfg.steps, args.sampled_steps, True, "random", rng, args.first_step)
        traj = sampler.sample(reqs, group_size=args.G, snapshot_steps=steps)
        t1 = time.perf_counter()
        scored = client.score(traj)
        t2 = time.perf_counter()
        if scored.dropped:
            raise RuntimeError(f"non-finite rewards: {scored.problems[:2]}")
        adv = compute_advantages(scored.rewards, traj.prompt_index, lcfg.advantage, lcfg.advantage_eps)
        plan = TracePlan(tuple(steps))
        with torch.inference_mode():
            old = trajectory_logprobs(bundle.policy, fmt, traj, plan)
        old = type(old)(old.logp.clone(), old.mask.clone(), old.weight.clone())
        t3 = time.perf_counter()
        metrics = learner.train_batch(TrainBatch.from_trajectories(traj, adv.values, plan, old))
        bundle.policy.load_state_dict(learner.module.state_dict())
        t4 = time.perf_counter()
        drawn = batch_samples(bundle, [train_records[i] for i in idx], reqs, list(range(len(idx))), traj)
        checks = world_figures([s.task for s in drawn], {"world": world.judge(drawn)})
        m = scored.metrics()
        label = paths["reward_label"]
        row = {"it": it, "reward": m["reward/mean"], "clip0": m[f"reward/{label}/clipped_at_0"],
               "clip1": m[f"reward/{label}/clipped_at_1"], "const_groups": adv.constant_groups / adv.groups,
               "aligned": checks["aligned"], "follows": checks["follows"],
               "kl": metrics["kl"], "clipfrac": metrics.get("clip_fraction", float("nan")),
               "t_sample": t1 - t0, "t_reward": t2 - t1, "t_logp": t3 - t2, "t_learn": t4 - t3}
        log.append(row)
        if it % args.print_every == 0 or it == args.steps - 1:
            print(f"[seed {seed}] it {it:4d} R {row['reward']:.3f} clip0 {row['clip0']:.2f} clip1 {row['clip1']:.2f} "
                  f"const {row['const_groups']:.2f} aligned {row['aligned']:.2f} follows {row['follows']:.2f} "
                  f"kl {row['kl']:.4f} | sample {row['t_sample']:.2f}s reward {row['t_reward']:.2f}s "
                  f"logp {row['t_logp']:.2f}s learn {row['t_learn']:.2f}s", flush=True)
    timings["rl"] = time.perf_counter() - t_rl
    after = held_out("after")
    return {"seed": seed, "before": before, "after": after, "timings": timings,
            "prepare_built": paths["built"], "stages_seconds": {k: v.get("seconds") for k, v in paths["stages"].items()},
            "clip_check": paths["stages"]["clip"].get("heldout_one_attribute_changed"),
            "reward_stats": paths["stages"]["clip"].get("stats"),
            "log_tail": log[-5:], "log_mean_first10": _mean_rows(log[:10]), "log_mean_last10": _mean_rows(log[-10:])}


def _mean_rows(rows: list[dict]) -> dict:
    if not rows:
        return {}
    return {k: round(statistics.fmean(r[k] for r in rows), 4) for k in rows[0] if k != "it"}


def prepare_config(args, seed: int):
    cfg = default_config(seed)
    if args.sft_steps:
        cfg = replace(cfg, sft=replace(cfg.sft, steps=args.sft_steps))
    if args.clip_steps:
        cfg = replace(cfg, clip=replace(cfg.clip, steps=args.clip_steps))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default=".cache/pilot")
    p.add_argument("--steps", type=int, default=150, help="ParaRL iterations")
    p.add_argument("--B", type=int, default=8, help="prompts per iteration")
    p.add_argument("--G", type=int, default=8, help="trajectories per prompt (group size)")
    p.add_argument("--sampled-steps", type=int, default=2, help="s: snapshot steps scored per trajectory")
    p.add_argument("--first-step", type=float, default=0.75, help="earliest sampled step, as a share of the trajectory")
    p.add_argument("--sampler-steps", type=int, default=8)
    p.add_argument("--text-temperature", type=float, default=1.0)
    p.add_argument("--image-temperature", type=float, default=1.0)
    p.add_argument("--image-noise", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--updates", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--advantage", default="grpo")
    p.add_argument("--aggregation", default="token")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    p.add_argument("--eval-batch", type=int, default=64, help="held-out prompts per sampler call")
    p.add_argument("--sft-steps", type=int, default=0, help="override the warm-up's steps (0: default)")
    p.add_argument("--clip-steps", type=int, default=0, help="override the CLIP training steps (0: default)")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the full result JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.B * args.G) % args.micro_batch:
        raise SystemExit("--micro-batch must divide B x G")

    results = [run_seed(args, s) for s in args.seeds]
    print()
    print(f"{'seed':>4} {'reward before':>14} {'after':>8} {'aligned before':>15} {'after':>7} {'follows b/a':>12} "
          f"{'prepare s':>10} {'RL s':>7} {'eval s':>7}")
    for r in results:
        b, a, t = r["before"], r["after"], r["timings"]
        print(f"{r['seed']:>4} {b['reward']:>14.4f} {a['reward']:>8.4f} {b['aligned']:>15.3f} {a['aligned']:>7.3f} "
              f"{b['follows']:>5.3f}/{a['follows']:<6.3f} {t['prepare']:>10.1f} {t['rl']:>7.1f} "
              f"{t['eval_before'] + t['eval_after']:>7.1f}")
    summary = {}
    for key in ("reward", "aligned", "follows"):
        diffs = [r["after"][key] - r["before"][key] for r in results]
        mean = statistics.fmean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        summary[key] = {"before": [r["before"][key] for r in results], "after": [r["after"][key] for r in results],
                        "diff_mean": mean, "diff_std": std, "passes": bool(len(diffs) > 1 and mean > 2 * std)}
        print(f"{key:>8}: after - before = {mean:+.4f} (std over seeds {std:.4f}): "
              f"{'PASS' if summary[key]['passes'] else 'fail'} (mean > 2 std)")
    out = {"args": vars(args), "results": results, "summary": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({"reward_diff": summary["reward"]["diff_mean"], "reward_diff_std": summary["reward"]["diff_std"],
                      "aligned_diff": summary["aligned"]["diff_mean"], "aligned_diff_std": summary["aligned"]["diff_std"],
                      "ratio": summary["aligned"]["diff_mean"] / summary["aligned"]["diff_std"]
                      if summary["aligned"]["diff_std"] else float("nan"),
                      "passes": summary["reward"]["passes"] and summary["aligned"]["passes"]}))


if __name__ == "__main__":
    main()
