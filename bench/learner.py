"""Learner speed: one update (optimizer step) with trace replay at s sampled steps against all steps.

Trace replay runs one policy row per (trajectory, scored window), so an update at s of S steps
should cost about s / S of an update at every step; what it costs beyond that is the fixed part
(optimizer step, gathers, the loss). Same sampled batch (16 trajectories from the real sampler,
temperature 1, no CFG), same ~1M-parameter policy, a real DeepSpeed engine (ZeRO-2, fp32, one
rank on gloo), beta = 0 so only the policy's forward and backward are timed; the median of a few
updates after a warm-up. The last line is one JSON object; ``ratio`` is time(s steps) / time(all
steps) and ``expected`` is s / S.
Run: ``.venv/bin/python bench/learner.py [--sampled 3] [--steps 16] [--repeats 3]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.trainer import Learner
from pararl.formats import world_format
from pararl.logprobs import trajectory_logprobs
from pararl.models import LLaDAConfig, build_policy
from pararl.plans import TracePlan, sample_trace_plan
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler

FMT = world_format(text_vocab_size=200, codebook_size=32, image_tokens=64)
ARCH = dict(d_model=128, n_heads=4, n_layers=5, mlp_hidden_size=344)
PROMPTS, GROUP = 4, 4


def make_batch(folder: Path, steps: int) -> TrainBatch:
    policy = build_policy(LLaDAConfig(vocab_size=FMT.vocab_size, embedding_size=FMT.vocab_size, mask_token_id=FMT.mask_id,
                                      rope_theta=10000.0, **ARCH), seed=0)
    policy.save_pretrained(folder)
    cfg = SamplerConfig(steps=steps, text_len=32, text_temperature=1.0, image_temperature=1.0, cfg_image=0, cfg_text=0)
    requests = [GenerationRequest(list(range(10, 16 + 2 * i)), seed=i) for i in range(PROMPTS)]
    tr = ParallelSampler(policy, FMT, cfg).sample(requests, group_size=GROUP)
    advantages = torch.randn(len(tr), generator=torch.Generator().manual_seed(0))
    return TrainBatch.from_trajectories(tr, advantages, TracePlan((0,)))


def with_plan(batch: TrainBatch, folder: Path, plan: TracePlan) -> TrainBatch:
    """The batch under ``plan``, with behaviour log-probs computed like a rollout worker does."""
    from pararl.models import load_policy

    with torch.inference_mode():
        old = trajectory_logprobs(load_policy(folder), FMT, batch, plan)
    old = type(old)(old.logp.clone(), old.mask.clone(), old.weight.clone())
    return replace(batch, plan=plan, old=old)


def time_update(learner: Learner, batch: TrainBatch, repeats: int) -> float:
    learner.train_batch(batch)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        learner.train_batch(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="denoising steps of the sampled trajectories")
    parser.add_argument("--sampled", type=int, default=3, help="steps scored per update (the paper's s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp()) / "policy"
    batch = make_batch(folder, args.steps)
    cfg = LearnerConfig(lr=1e-5, zero_stage=2, micro_batch_size=len(batch), grad_accumulation=1, updates_per_batch=1,
                        beta=0.0, device="cpu")
    learner = Learner(cfg, folder, FMT)
    params = sum(p.numel() for p in learner.module.parameters())
    settings = [
        (f"{args.sampled} sampled steps", sample_trace_plan(args.steps, args.sampled, seed=0)),
        ("all steps", sample_trace_plan(args.steps, 0)),
        ("all steps, merge 2", sample_trace_plan(args.steps, 0, merge=2)),
    ]
    rows = []
    for name, plan in settings:
        b = with_plan(batch, folder, plan)
        seconds = time_update(learner, b, args.repeats)
        windows = len(plan.steps)
        rows.append(dict(setting=name, windows=windows, rows=windows * len(b), tokens=int(b.old.mask.sum()), seconds=seconds))

    print(f"learner update, trace replay: {params / 1e6:.2f}M-parameter policy, batch {len(batch)}, "
          f"sequence {batch.layout.length}, {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<22}{'windows':>8}{'rows':>7}{'tokens':>8}{'s/update':>10}{'vs all':>8}")
    t_all = rows[1]["seconds"]
    for r in rows:
        print(f"{r['setting']:<22}{r['windows']:>8}{r['rows']:>7}{r['tokens']:>8}{r['seconds']:>10.3f}{r['seconds'] / t_all:>8.3f}")
    print(json.dumps({
        "params": params, "batch": len(batch), "steps": args.steps, "sampled": args.sampled,
        "seconds_sampled": round(rows[0]["seconds"], 4), "seconds_all": round(t_all, 4),
        "seconds_merge2": round(rows[2]["seconds"], 4),
        "ratio": round(rows[0]["seconds"] / t_all, 4), "expected": round(args.sampled / args.steps, 4),
    }))


if __name__ == "__main__":
    main()
