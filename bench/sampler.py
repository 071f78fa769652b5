"""Sampler speed: the batched parallel sampler against its own forward passes, and against one-at-a-time.

For two model sizes (about 20M and 1M parameters), with B x G = 16 trajectories and CFG on:
- floor: the same model's forward passes alone (the same rows the sampler forwards at each step: CFG
  rows included, and for ``--preset mmada-parallel-a`` the two unconditional rows of every image
  update in their own forward; same steps, threads and inference mode), median after a warm-up;
- sampler / floor: what the sampling logic adds on top of the forwards (target <= 1.15);
- loop / sampler: one trajectory at a time (how the released generator works) against the batch.
The last line is one JSON object; ``ratio`` is the larger sampler-over-floor ratio of the two models.
Run: ``.venv/bin/python bench/sampler.py [--repeats N] [--preset mmada-parallel-a]``.

``--heads``: the span heads against the full head, at LLaDA-8B's vocabulary (134,656 logits columns)
and the -A layout at 1024 image tokens (32 rows of 32 codes and a newline, 256 text positions, both
guidance terms on), the body scaled down to fit this machine: seconds per sampling step and the peak
resident memory of a process that only builds the model and samples, once per head.
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

from pararl.batching import build_batch
from pararl.formats import DimooFormat, world_format
from pararl.heads import FullHead, span_forward
from pararl.models import LLaDAConfig, build_policy
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler

FMT = world_format(text_vocab_size=200, codebook_size=32, image_tokens=64)
MODELS = {
    "20M": dict(d_model=512, n_heads=8, n_layers=6, mlp_hidden_size=1376),
    "1M": dict(d_model=128, n_heads=4, n_layers=5, mlp_hidden_size=344),
}
PROMPTS, GROUP = 4, 4
# The -A layout at the same small sizes (an 8x8 grid with a newline per row; template ids made up).
A_FMT = DimooFormat(name="bench-a", mask_id=1, pad_id=0, uncond_id=2, newline_id=3, boi_id=4, eoi_id=5,
                    answer_start_id=6, answer_end_ids=(7,), generate_prefix=(8, 9, 10), edit_prefix=(8, 11, 10),
                    prompt_suffix=(12,), text_vocab_size=200, image_offset=200, codebook_size=32, grid=(8, 8))


def median_time(fn, repeats: int) -> float:
    """Median wall seconds after a warm-up; on a GPU each call is waited for (kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, arch: dict, fmt, cfg: SamplerConfig, repeats: int, model=None) -> dict:
    """``model`` (optional): a policy already built, on its device and in its dtype (``arch`` is then unused)."""
    if model is None:
        config = LLaDAConfig(vocab_size=fmt.vocab_size, embedding_size=fmt.vocab_size, mask_token_id=fmt.mask_id,
                             rope_theta=10000.0, **arch)
        model = build_policy(config, seed=0)
    device = next(model.parameters()).device
    params = sum(p.numel() for p in model.parameters())
    edit = torch.arange(fmt.image_tokens) % fmt.codebook_size if isinstance(fmt, DimooFormat) else None
    requests = [GenerationRequest(list(range(20, 20 + 6 + 2 * i)), edit, seed=i) for i in range(PROMPTS)]
    sampler = ParallelSampler(model, fmt, cfg)
    g, plan = sampler.guidance, sampler.plan

    batch = build_batch(fmt, requests, cfg.text_len, released_rows=bool(g.after_text))
    rep = lambda t: t.repeat_interleave(GROUP, 0)  # noqa: E731
    rows = torch.cat([rep(batch.input_ids)] + [rep(batch.uncond_ids)] * g.with_cond).to(device)
    mask = rep(batch.attention_mask).repeat(1 + g.with_cond, 1).to(device)
    extra = torch.cat([rep((batch.uncond_ids, batch.uncond_image_ids)[i]) for i in g.after_text]).to(device) if g.after_text else None

    lay = batch.layout

    @torch.inference_mode()
    def forwards():  # the forwards the sampler makes, through the same span heads
        for s in range(cfg.steps):
            span_forward(model, fmt, lay, rows, mask)
            if extra is not None and plan.image_update[s]:
                span_forward(model, fmt, lay, extra, rep(batch.attention_mask).repeat(len(g.after_text), 1).to(device), ("image",))

    floor = median_time(forwards, repeats)
    batched = median_time(lambda: sampler.sample(requests, group_size=GROUP), repeats)

    def one_at_a_time():
        for r in requests:
            for m in range(GROUP):
                sampler.sample([GenerationRequest(r.prompt_ids, r.input_codes, seed=r.seed * 100 + m)], group_size=1)

    loop = median_time(one_at_a_time, max(1, repeats // 3))
    rows_per_step = rows.shape[0] + (0 if extra is None else extra.shape[0] * sum(plan.image_update) / cfg.steps)
    return {
        "model": name, "params": params, "rows": rows_per_step, "seq_len": rows.shape[1], "steps": cfg.steps,
        "floor_s": floor, "sampler_s": batched, "loop_s": loop,
        "sampler_over_floor": batched / floor, "speedup_vs_loop": loop / batched,
    }


def bench_config(preset: str | None, steps: int) -> tuple:
    if preset == "mmada-parallel-a":  # both CFG terms on: 3 rows per trajectory at image updates
        return A_FMT, SamplerConfig(preset=preset, steps=steps, text_len=32, image_start=steps // 4,
                                    image_steps=steps // 2, cfg_prompt=2.5, cfg_image=4.0, text_temperature=1.0)
    return FMT, SamplerConfig(steps=steps, text_len=32, cfg_image=2.0, text_temperature=1.0)


HEAD_FMT = DimooFormat(name="bench-a-8b-vocab", mask_id=1, pad_id=0, uncond_id=2, newline_id=3, boi_id=4, eoi_id=5,
                       answer_start_id=6, answer_end_ids=(7,), generate_prefix=(8, 9, 10), edit_prefix=(8, 11, 10),
                       prompt_suffix=(12,), text_vocab_size=126356, image_offset=126356, codebook_size=8192,
                       grid=(32, 32))


def head_child(head: str, repeats: int) -> dict:
    """One process, one head: seconds per step and peak RSS (so the other head's buffers never count)."""
    import resource

    config = LLaDAConfig(vocab_size=HEAD_FMT.vocab_size, embedding_size=134656, mask_token_id=HEAD_FMT.mask_id,
                         rope_theta=10000.0, d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128)
    model = build_policy(config, seed=0)
    policy = model if head == "spans" else FullHead(model)
    cfg = SamplerConfig(preset="mmada-parallel-a", steps=4, text_len=256, image_start=2, image_steps=2, cfg_prompt=2.5,
                        cfg_image=4.0, text_temperature=1.0)
    requests = [GenerationRequest(list(range(20, 60)), torch.arange(1024) % 8192, seed=0)]
    sampler = ParallelSampler(policy, HEAD_FMT, cfg)
    seconds = median_time(lambda: sampler.sample(requests, group_size=2), repeats) / cfg.steps
    tr = sampler.sample(requests, group_size=2)
    return {"head": head, "step_s": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seq_len": tr.layout.length, "tokens_sum": int(tr.tokens.sum())}


def bench_heads(repeats: int) -> None:
    import subprocess

    rows = []
    for head in ("full", "spans"):
        out = subprocess.run([sys.executable, __file__, "--head-child", head, "--repeats", str(repeats)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full, spans = rows
    assert full["tokens_sum"] == spans["tokens_sum"], "the two heads sampled different tokens"
    print(f"vocabulary 134,656, -A layout at 1024 image tokens, {full['seq_len']} tokens, 2 trajectories, both CFG terms")
    print(f"{'head':>6} {'s/step':>8} {'peak RSS GiB':>13}")
    for r in rows:
        print(f"{r['head']:>6} {r['step_s']:>8.3f} {r['peak_rss_gib']:>13.2f}")
    print(json.dumps({"heads": rows, "speedup": full["step_s"] / spans["step_s"],
                      "rss_saved_gib": full["peak_rss_gib"] - spans["peak_rss_gib"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--preset", default=None, choices=[None, "mmada-parallel-a"])
    parser.add_argument("--heads", action="store_true", help="span heads against the full head at the 8B vocabulary")
    parser.add_argument("--head-child", choices=["full", "spans"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.head_child:
        print(json.dumps(head_child(args.head_child, args.repeats)))
        return
    if args.heads:
        bench_heads(args.repeats)
        return
    fmt, cfg = bench_config(args.preset, args.steps)
    results = [bench_model(name, arch, fmt, cfg, args.repeats) for name, arch in MODELS.items()]
    print(f"threads={torch.get_num_threads()}  trajectories={PROMPTS * GROUP} (B={PROMPTS} x G={GROUP}), "
          f"preset={args.preset or 'pararl'}, CFG rows included (mean rows per step)")
    print(f"{'model':>6} {'params':>10} {'rows x len':>11} {'floor s':>9} {'sampler s':>10} {'ratio':>7} {'loop s':>8} {'speed-up':>9}")
    for r in results:
        print(f"{r['model']:>6} {r['params']:>10,} {r['rows']:>4.0f} x {r['seq_len']:<4} {r['floor_s']:>9.3f} "
              f"{r['sampler_s']:>10.3f} {r['sampler_over_floor']:>7.3f} {r['loop_s']:>8.3f} {r['speedup_vs_loop']:>8.2f}x")
    print(json.dumps({
        "ratio": max(r["sampler_over_floor"] for r in results),
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "models": results,
    }))


if __name__ == "__main__":
    main()
