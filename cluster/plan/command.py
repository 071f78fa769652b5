"""``pararl plan CONFIG``: each actor's GPU memory measured at the config's real shapes on fake tensors,
beside ``cluster.memory``'s estimate, whether it fits its GPU share, and (``--flops``) the FLOPs of a
trajectory and the GPU-hours of 100 steps. The model folder's ``config.json`` is all it reads of the
model; its tokenizer and image tokenizer config when present. Exit code 2 when an actor does not fit.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

GiB = float(1 << 30)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="config overrides as dotted key=value (model=FOLDER: a folder "
                                                     "with the model's config.json is enough)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--flops", action="store_true", help="also count FLOPs per trajectory and GPU-hours")
    parser.add_argument("--mfu", type=float, default=0.35, help="model-FLOPs utilisation for the GPU-hours (default 0.35)")
    parser.add_argument("--json", help="write every figure to this file")


def build_context(cfg: Any) -> tuple[Any, Path]:
    """The plan's context from the config and its model folder (config.json read, no weights)."""
    import torch  # noqa: F401 - before the plan's modules

    from cluster.memory import prompts_per_worker
    from cluster.plan.actors import Context
    from cluster.plan.fake import HostRealMode
    from cluster.plan.work import plan_format, requests
    from pararl.errors import ConfigError
    from pararl.models import read_config
    from reward.semantic import run_steps

    if not cfg.model:
        raise ConfigError("config key 'model' is not set: pararl plan needs the model's config.json (model=FOLDER)")
    folder = Path(cfg.model)
    config = read_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    fmt, how = plan_format(cfg.sampler.preset, raw, folder)
    reward_steps = run_steps(cfg.reward, cfg.sampler.steps, random.Random(cfg.seed))  # the steps a run's first iteration scores
    ctx = Context(cfg, config, fmt, HostRealMode(), reward_steps, requests(fmt, max(prompts_per_worker(cfg), 1)))
    print(f"pararl plan: {cfg.name}, {how}")
    return ctx, folder


def run_plan(cfg: Any, gpu_gib: float) -> dict[str, Any]:
    """Every actor's plan; the trajectories and measurements the FLOP count reuses."""
    from cluster.memory import estimate_run
    from cluster.plan.actors import colocated, learner_rank, rollout_worker, train_batch
    from cluster.plan.reward import reward_replica
    from cluster.plan.work import trajectories

    ctx, folder = build_context(cfg)
    c = cfg.cluster
    lay_len = len(ctx.fmt.output_ids(cfg.sampler.text_len)[0])
    estimates, _, _ = estimate_run(cfg, ctx.config, lay_len, ctx.fmt.image_span_len, text_vocab=ctx.fmt.text_vocab_size,
                                   codebook=ctx.fmt.codebook_size)
    by_name = {e.actor: e for e in estimates}
    prompts = len(ctx.requests)
    tr = trajectories(ctx.fmt, cfg.sampler, ctx.requests, cfg.data.group_size, ctx.reward_steps)
    batch = train_batch(ctx, tr)
    train_est = by_name.get("learner rank") or by_name["colocated rank, training"]
    roll_est = by_name.get("rollout worker") or by_name["colocated rank, sampling"]
    learner, train = learner_rank(ctx, batch, train_est, c.learner_gpus)
    roll = rollout_worker(ctx, tr, prompts, roll_est, c.rollout_gpus)
    reward, reward_flops = reward_replica(ctx, folder, by_name["reward replica"], cfg.reward.gpus_per_replica)
    actors = colocated(ctx, learner, roll, estimates, c.learner_gpus) if c.colocate else [learner, roll]
    actors.append(reward)
    return {"ctx": ctx, "actors": actors, "trajectories": tr, "batch": batch, "train": train,
            "reward_flops": reward_flops, "gpu_gib": gpu_gib}


def fits(actor: Any, gpu_gib: float) -> tuple[bool, str]:
    """Whether the actor fits its share of one GPU (as ``pararl doctor`` reads a fractional share), and the line."""
    if actor.share <= 0:
        return True, "runs on CPU"
    room = gpu_gib * min(1.0, actor.share)
    need = actor.total / GiB
    if need > room:
        share = min(1.0, actor.share)
        return False, f"{actor.actor} does not fit: needs {need:.1f} GiB, its {share:g} GPU has {room:.1f} GiB, {need - room:.1f} GiB short"
    return True, f"{actor.actor} fits: {need:.1f} of {room:.1f} GiB"


def table(actors: list[Any], gpu_gib: float) -> str:
    """The per-actor table: measured and analytic parts (GiB), the plan's total, cluster.memory's estimate."""
    lines = ["| actor | measured on fake tensors (GiB) | from the estimate (GiB) | plan | estimate | fits |",
             "| --- | --- | --- | --- | --- | --- |"]
    for a in actors:
        meas = ", ".join(f"{k} {v / GiB:.1f}" for k, v in a.measured.items())
        ana = ", ".join(f"{k} {v / GiB:.1f}" for k, v in a.analytic.items())
        ok, _ = fits(a, gpu_gib)
        lines.append(f"| {a.actor} | {meas} | {ana} | **{a.total / GiB:.1f}** | {a.estimate / GiB:.1f} | "
                     f"{'yes' if ok else 'NO'} ({a.share:g} of {gpu_gib:g} GiB) |")
    return "\n".join(lines)


def queue_line(cfg: Any, result: dict[str, Any]) -> str:
    """What a checkpoint keeps per rollout queued ahead (``cluster.ahead``), at the config's shapes."""
    import torch

    from cluster.ahead import Rollout, queued_bytes
    from cluster.plan.actors import iteration
    from pararl.logprobs import TokenLogProbs

    tr = result["trajectories"]
    n = tr.layout.output.stop - tr.layout.output.start
    old = TokenLogProbs(torch.zeros(len(tr), n), torch.zeros(len(tr), n, dtype=torch.bool), torch.zeros(len(tr), n))
    per = queued_bytes(Rollout(tr, old, iteration(result["ctx"], tr.steps), 0.0, [])) / len(tr)
    step = per * cfg.data.prompts_per_step * cfg.data.group_size
    return (f"a checkpoint keeps each rollout queued ahead (cluster.max_staleness {cfg.cluster.max_staleness}): "
            f"{step / 2**20:.1f} MiB a step ({per / 2**10:.0f} KiB a trajectory)")


def coverage_name(lc: Any) -> str:
    if lc.logprob_estimator == "random_mask":
        return "random mask"
    return "reward_steps" if lc.coverage == "reward_steps" else "all, merge_steps 4"


def flops_report(cfg: Any, f: Any, mfu: float) -> list[str]:
    from cluster.plan.flops import gpu_hours

    per_step = cfg.data.prompts_per_step * cfg.data.group_size
    mine = coverage_name(cfg.learner)
    lines = [f"FLOPs per trajectory (TFLOP): rollout {f.rollout / 1e12:.1f} (steps: "
             + ", ".join(f"{n} {k}" for k, n in f.steps.items()) + f"), released generator {f.released / 1e12:.1f} "
             f"(pararl's rollout is {f.rollout / f.released:.2f}x of it), reward {f.reward / 1e12:.3f}"]
    lines.append("learner per coverage: " + ", ".join(f"{k} {v / 1e12:.1f}" + (" (this config)" if k == mine else "")
                                                     for k, v in f.learner.items()))
    total = f.total(mine) * per_step
    shares = {"rollout": f.rollout, "learner": f.learner[mine], "reward": f.reward}
    lines.append(f"one step ({per_step} trajectories): {total / 1e15:.1f} PFLOP; "
                 + ", ".join(f"{k} {100 * v / f.total(mine):.1f}%" for k, v in shares.items()))
    for gpu in ("H100", "H200"):
        lines.append(f"100 steps on {gpu} at {mfu:.0%} MFU: {gpu_hours(total, 100, mfu, gpu):.0f} GPU-hours")
    return lines


def plan_main(args: argparse.Namespace) -> int:
    from cluster.run_config import load_run_config

    start = time.perf_counter()
    cfg = load_run_config(args.config, args.overrides)
    result = run_plan(cfg, args.gpu_memory_gb)
    print(table(result["actors"], args.gpu_memory_gb))
    problems = 0
    for a in result["actors"]:
        ok, line = fits(a, args.gpu_memory_gb)
        problems += not ok
        print(("ok       " if ok else "PROBLEM  ") + line)
        for what in a.unmeasured:
            print(f"note     {a.actor}: not measured: {what}")
    print("note     ZeRO's partitions of weights, gradients and optimizer state, and the CUDA slack, are the "
          "estimate's (analytic); everything else was measured")
    print(f"note     {queue_line(cfg, result)}")
    out: dict[str, Any] = {"config": cfg.name, "actors": [vars(a) for a in result["actors"]]}
    if args.flops:
        from cluster.plan.flops import trajectory_flops

        f = trajectory_flops(result["ctx"], result["trajectories"], result["batch"], result["train"].flops,
                             result["reward_flops"])
        for line in flops_report(cfg, f, args.mfu):
            print(line)
        out["flops"] = {"rollout": f.rollout, "released": f.released, "learner": f.learner, "reward": f.reward, "steps": f.steps}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"pararl plan: {'ready' if not problems else f'{problems} actor(s) do not fit'} ({time.perf_counter() - start:.0f} s)")
    return 2 if problems else 0
