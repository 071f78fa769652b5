"""Sampler speed: the batched parallel sampler against its own forward passes, and against one-at-a-time.

For two model sizes (about 20M and 1M parameters), with B x G = 16 trajectories and CFG on:
- floor: the same model's forward passes alone (same batch incl. CFG rows, same steps, threads and
  inference mode), median after a warm-up;
- sampler / floor: what the sampling logic adds on top of the forwards (target <= 1.15);
- loop / sampler: one trajectory at a time (how the released generator works) against the batch.
The last line is one JSON object; ``ratio`` is the larger sampler-over-floor ratio of the two models.
Run: ``.venv/bin/python bench/sampler.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pararl.config import SamplerConfig  # noqa: E402
from pararl.formats import world_format  # noqa: E402
from pararl.models import LLaDAConfig, build_policy  # noqa: E402
from pararl.types import GenerationRequest  # noqa: E402
from rollout.batching import build_batch  # noqa: E402
from rollout.sampler import ParallelSampler  # noqa: E402

FMT = world_format(text_vocab_size=200, codebook_size=32, image_tokens=64)
MODELS = {
    "20M": dict(d_model=512, n_heads=8, n_layers=6, mlp_hidden_size=1376),
    "1M": dict(d_model=128, n_heads=4, n_layers=5, mlp_hidden_size=344),
}
PROMPTS, GROUP = 4, 4


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, arch: dict, cfg: SamplerConfig, repeats: int) -> dict:
    config = LLaDAConfig(vocab_size=FMT.vocab_size, embedding_size=FMT.vocab_size, mask_token_id=FMT.mask_id,
                         rope_theta=10000.0, **arch)
    model = build_policy(config, seed=0)
    params = sum(p.numel() for p in model.parameters())
    requests = [GenerationRequest(list(range(10, 10 + 6 + 2 * i)), seed=i) for i in range(PROMPTS)]
    sampler = ParallelSampler(model, FMT, cfg)

    batch = build_batch(FMT, requests, cfg.text_len)
    rows = torch.cat([batch.input_ids.repeat_interleave(GROUP, 0), batch.uncond_ids.repeat_interleave(GROUP, 0)])
    mask = batch.attention_mask.repeat_interleave(GROUP, 0).repeat(2, 1)

    @torch.inference_mode()
    def forwards():
        for _ in range(cfg.steps):
            model(rows, attention_mask=mask)

    floor = median_time(forwards, repeats)
    batched = median_time(lambda: sampler.sample(requests, group_size=GROUP), repeats)

    def one_at_a_time():
        for r in requests:
            for g in range(GROUP):
                sampler.sample([GenerationRequest(r.prompt_ids, seed=r.seed * 100 + g)], group_size=1)

    loop = median_time(one_at_a_time, max(1, repeats // 3))
    return {
        "model": name, "params": params, "rows": rows.shape[0], "seq_len": rows.shape[1], "steps": cfg.steps,
        "floor_s": floor, "sampler_s": batched, "loop_s": loop,
        "sampler_over_floor": batched / floor, "speedup_vs_loop": loop / batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    cfg = SamplerConfig(steps=args.steps, text_len=32, cfg_image=2.0, text_temperature=1.0)
    results = [bench_model(name, arch, cfg, args.repeats) for name, arch in MODELS.items()]
    print(f"threads={torch.get_num_threads()}  trajectories={PROMPTS * GROUP} (B={PROMPTS} x G={GROUP}), CFG rows included")
    print(f"{'model':>6} {'params':>10} {'rows x len':>11} {'floor s':>9} {'sampler s':>10} {'ratio':>7} {'loop s':>8} {'speed-up':>9}")
    for r in results:
        print(f"{r['model']:>6} {r['params']:>10,} {r['rows']:>4} x {r['seq_len']:<4} {r['floor_s']:>9.3f} "
              f"{r['sampler_s']:>10.3f} {r['sampler_over_floor']:>7.3f} {r['loop_s']:>8.3f} {r['speedup_vs_loop']:>8.2f}x")
    print(json.dumps({
        "ratio": max(r["sampler_over_floor"] for r in results),
        "threads": torch.get_num_threads(),
        "models": results,
    }))


if __name__ == "__main__":
    main()
