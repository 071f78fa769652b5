"""The GPU paths, run for real: one prepared command for the few minutes a GPU machine is lent.

Every GPU path of the system is code selected by config (bf16 sampling and training, CUDA placement,
the GPU->CPU copy of the weights a sync sends, memory per actor); this script runs each of them once
on one GPU, at the size of a small real model, so the minutes go to measuring, not to debugging:

- ``sampler``: a random LLaDA-architecture model of about 1B parameters with the -A layout (1024 image
  tokens, 256 text positions, a short prompt, both guidance terms on) in bf16; the batched sampler at
  B x G = 16 against one trajectory at a time, and against its own forwards alone (the floor);
- ``parity``: a tiny model greedy-sampled in fp32 on the CPU and in fp32 / bf16 on the GPU (share of
  equal tokens), and its learner log-probs on the GPU in bf16 against the CPU in fp32 (the gaps);
- ``learner``: one ZeRO-0 rank in bf16, trace replay at 3 sampled steps, forward + backward + step:
  seconds and model FLOP utilisation against the GPU's dense bf16 peak (a table by device name);
- ``memory``: peak GPU memory of a rollout step and of a learner step against ``cluster/memory.py``;
- ``e2e``: 5 ParaRL steps on a local Ray, one rollout worker and one learner rank sharing the GPU
  (half a GPU each), weight sync included: seconds per step and the split by stage.

A part that fails is reported and the others still run. A table, then one JSON line with every figure.

On a GPU machine, from the repository root: ``python3 bench/gpu_check.py``. Packages the machine
lacks are installed first from ``.gpu-wheels/`` (made here by ``bench/gpu_wheels.py``: such machines
reach no package registry). ``--dry-run``: every part at toy sizes on the CPU, in fp32 where the GPU
run uses bf16 (the suite runs it, so the script cannot rot).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Ray's workers
from gpu_setup import (  # noqa: E402 -- after the path and environment above
    DRY,
    GPU,
    PROMPT,
    TINY,
    ensure_packages,
    requests,
    sampler_config,
    train_flops,
    wheel_files,  # noqa: F401 -- part of this script's interface (tests/test_gpu_check.py)
    write_checkpoint,
)

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

# dense bf16 tensor-core peaks (TFLOP/s), by a piece of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0,
             "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Check:
    """The parts' shared state: the device, the dtype, the big model's folder, the figures so far."""

    def __init__(self, dry: bool, work: Path) -> None:
        import torch

        self.dry, self.work, self.size = dry, work, DRY if dry else GPU
        self.gpu = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.gpu else "cpu"
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        self.figures: dict[str, dict] = {}
        self.errors: dict[str, str] = {}
        self._folder: Path | None = None
        self._batch = None
        self.peaks: dict[str, int] = {}  # measured peak GPU bytes, by step
        self.learner_config = None  # the learner part's, for the memory prediction

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = write_checkpoint(self.work / "policy", self.size)
        return self._folder

    def bundle(self, folder: Path | None = None, device: str | None = None, dtype=None):
        from pararl.bundle import load_bundle

        return load_bundle(folder or self.folder, dtype=dtype or self.dtype, device=device or self.device)

    def batch(self):
        """B x G trajectories of the big model at temperature 1 with their behaviour log-probs at 3 sampled
        steps (a rollout worker's step), sampled once; its peak GPU memory is the rollout step's."""
        if self._batch is None:
            import torch

            from learner.batch import TrainBatch
            from pararl.logprobs import trajectory_logprobs
            from pararl.plans import sample_trace_plan
            from rollout.sampler import ParallelSampler

            bundle = self.bundle()
            if self.gpu:
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                tr = ParallelSampler(bundle.policy, bundle.fmt, sampler_config(self.size)).sample(
                    requests(bundle, self.size), group_size=self.size.group)
                plan = sample_trace_plan(self.size.steps, 3, seed=0)
                old = trajectory_logprobs(bundle.policy, bundle.fmt, tr, plan)
            if self.gpu:
                self.peaks["rollout"] = torch.cuda.max_memory_allocated()
            advantages = torch.randn(len(tr), generator=torch.Generator().manual_seed(0))
            old = type(old)(old.logp.clone().cpu(), old.mask.clone().cpu(), old.weight.clone().cpu())
            self._batch = bundle.fmt, TrainBatch.from_trajectories(tr.to("cpu"), advantages, plan, old=old)
            del bundle
        return self._batch

    def run(self, name: str, part) -> None:
        start = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            self.figures[name] = part(self)
        except Exception as exc:  # noqa: BLE001 -- one part's failure is a finding; the others still run
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        self.figures.setdefault(name, {})["wall_s"] = round(time.perf_counter() - start, 2)
        if self.gpu:
            import torch

            torch.cuda.empty_cache()


def env_part(c: Check) -> dict:
    import torch

    name = torch.cuda.get_device_name() if c.gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "peak_bf16_tflops": peak,
            "dtype": str(c.dtype).removeprefix("torch."),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c.gpu else None}


def sampler_part(c: Check) -> dict:
    """bench/sampler.py's measurement (floor, batched, one at a time) on the big model, on the device."""
    from sampler import bench_model

    bundle = c.bundle()
    row = bench_model("1B" if c.gpu else "toy", {}, bundle.fmt, sampler_config(c.size), c.size.repeats, model=bundle.policy)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def parity_part(c: Check) -> dict:
    """Greedy tokens and learner log-probs of one tiny model on the CPU in fp32 against the device."""
    import torch

    from learner.batch import TrainBatch
    from pararl.logprobs import trajectory_logprobs
    from pararl.plans import sample_trace_plan
    from rollout.sampler import ParallelSampler

    folder = write_checkpoint(c.work / "tiny", TINY, seed=1)
    cfg = sampler_config(TINY, temperature=0.0)
    plan = sample_trace_plan(TINY.steps, 3, seed=0)
    ref = c.bundle(folder, "cpu", torch.float32)
    reqs = requests(ref, TINY)
    with torch.inference_mode():
        base = ParallelSampler(ref.policy, ref.fmt, cfg).sample(reqs, group_size=TINY.group)
        batch = TrainBatch.from_trajectories(base, torch.zeros(len(base)), plan)
        base_lp = trajectory_logprobs(ref.policy, ref.fmt, batch, plan)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        other = c.bundle(folder, c.device, dtype)
        tag = f"{c.device}_{str(dtype).removeprefix('torch.')}"
        with torch.inference_mode():
            tr = ParallelSampler(other.policy, other.fmt, cfg).sample(reqs, group_size=TINY.group)
            lp = trajectory_logprobs(other.policy, other.fmt, batch.to(c.device), plan)
        out[f"equal_tokens_{tag}"] = round((tr.tokens.cpu() == base.tokens).float().mean().item(), 4)
        gap = (lp.logp.float().cpu() - base_lp.logp)[base_lp.mask]
        out[f"logp_gap_max_{tag}"] = round(gap.abs().max().item(), 5)
        out[f"logp_gap_mean_{tag}"] = round(gap.abs().mean().item(), 5)
    return out


def learner_part(c: Check) -> dict:
    """One ZeRO-0 rank in the check's precision; the median of a few updates after a warm-up."""
    import statistics

    import torch

    from learner.config import LearnerConfig
    from learner.trainer import Learner
    from pararl.models.config import parameter_count

    fmt, batch = c.batch()
    mb = max(1, len(batch) // 4)
    cfg = LearnerConfig(lr=1e-6, zero_stage=0, precision="bf16" if c.gpu else "fp32", device=c.device, micro_batch_size=mb,
                        grad_accumulation=len(batch) // mb, updates_per_batch=1, beta=0.0)
    learner = Learner(cfg, c.folder, fmt)
    learner.train_batch(batch)  # warm-up
    sync()
    if c.gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(c.size.repeats):
        start = time.perf_counter()
        learner.train_batch(batch)
        sync()
        times.append(time.perf_counter() - start)
    if c.gpu:
        c.peaks["learner"] = torch.cuda.max_memory_allocated()
    seconds = statistics.median(times)
    config = learner.module.config
    flops = train_flops(config, batch)
    peak = env_part(c)["peak_bf16_tflops"]
    c.learner_config = cfg
    del learner
    return {"params": parameter_count(config), "trajectories": len(batch), "windows": len(batch.plan.steps),
            "seq_len": batch.tokens.shape[1], "step_s": round(seconds, 4), "tflops": float(f"{flops / seconds / 1e12:.4g}"),
            "mfu": round(flops / seconds / 1e12 / peak, 4) if peak and c.gpu else None}


def memory_part(c: Check) -> dict:
    """``cluster/memory.py``'s prediction for the shapes the rollout and learner steps ran, against the
    peaks they measured (CUDA's context and slack are not in the allocator's peak: left out of both)."""
    from cluster.memory import CUDA_SLACK, GiB, Shapes, forward_rows, learner_rank, rollout_worker
    from learner.config import LearnerConfig
    from pararl.models.loading import read_config

    fmt, batch = c.batch()
    config = read_config(c.folder)
    lay = batch.layout
    shapes = Shapes.of(config, batch.tokens.shape[1], lay.text.stop - lay.text.start, lay.image.stop - lay.image.start,
                       text_vocab=config.vocab_size, codebook=fmt.codebook_size)
    windows = len(batch.plan.steps)
    roll = rollout_worker(shapes, len(batch), forward_rows(sampler_config(c.size)), windows, wbytes=2 if c.gpu else 4)
    lc = c.learner_config or LearnerConfig(zero_stage=0, precision="bf16" if c.gpu else "fp32", micro_batch_size=max(1, len(batch) // 4),
                                           beta=0.0)
    learn = learner_rank(shapes, lc, 1, windows)
    out = {}
    for step, estimate in (("rollout", roll), ("learner", learn)):
        predicted = (estimate.total - CUDA_SLACK) / GiB
        out[f"{step}_predicted_gib"] = round(predicted, 2)
        measured = c.peaks.get(step)
        out[f"{step}_measured_gib"] = None if measured is None else round(measured / GiB, 2)
        out[f"{step}_measured_over_predicted"] = None if measured is None else round(measured / GiB / predicted, 3)
    return out


def e2e_config(c: Check) -> Path:
    """A ParaRL run on the check's model: a tiny CLIP reward with its stats, one rollout worker and one
    learner rank on half a GPU each (on the CPU in the dry run), weights synced every step."""
    import torch
    import yaml

    from pararl.bundle import load_codecs
    from reward.base import build_reward_model
    from reward.stats import compute_stats, save_stats
    from reward.testing import tiny_clip

    work = c.work / "e2e"
    work.mkdir(exist_ok=True)
    prompts = [PROMPT, "a red square in the top left", "make the circle blue", "add a green triangle"]
    (work / "train.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    clip = tiny_clip(work)
    codecs = load_codecs(c.folder)
    codes = torch.randint(0, codecs.fmt.codebook_size, (8, c.size.grid ** 2), generator=torch.Generator().manual_seed(0))
    stats = compute_stats(build_reward_model("open_clip", clip), [(codecs.image_tokenizer.decode(codes), prompts * 2)])
    save_stats(work / "reward_stats.json", {"clip": stats})
    sampler = {k: v for k, v in vars(sampler_config(c.size)).items() if v is not None}
    half = 0.5 if c.gpu else 0.0
    config = {
        "name": "gpu-check", "run_dir": str(work / "run"), "model": str(c.folder), "seed": 0,
        "data": {"train": str(work / "train.jsonl"), "prompts_per_step": c.size.prompts, "group_size": c.size.group},
        "sampler": sampler,
        "reward": {"models": {"clip": {"name": "open_clip", "kwargs": clip}}, "stats_file": str(work / "reward_stats.json"),
                   "sampled_steps": 3, "replicas": 1, "cpus_per_replica": 0.25},
        "learner": {"lr": 1e-6, "micro_batch_size": max(1, c.size.prompts * c.size.group // 4), "updates_per_batch": 1,
                    "beta": 0.04, "zero_stage": 0, "precision": "bf16" if c.gpu else "fp32"},
        "cluster": {"num_gpus": 1 if c.gpu else 0, "num_cpus": 8 if c.gpu else 2, "rollout_workers": 1,
                    "rollout_cpus": 0.25, "learner_cpus": 0.25, "rollout_gpus": half, "learner_gpus": half,
                    "placement_timeout_s": 60, "call_timeout_s": 600},
        "tracking": {"snapshot_every": 0},
        "train": {"steps": c.size.e2e_steps, "checkpoint_every": 0},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def e2e_part(c: Check) -> dict:
    """Seconds per step after the first (start-up, compilation) and the stage split, read from MLflow."""
    import statistics

    from e2e import histories

    from cluster.train import train

    path = e2e_config(c)
    out = train(path, [])
    keys = ["time.step", "compute.rollout", "compute.reward", "compute.learner", "time.sync", "time.rollout",
            "time.reward", "time.learner"]
    h = histories(path.parent / "run" / "mlflow.db", out["run_id"], keys)
    steady = {k: v[1:] or v for k, v in h.items() if v}
    return {"steps": len(h["time.step"]), **{f"{k.replace('.', '_')}_s": round(statistics.mean(v), 4) for k, v in steady.items()}}


PARTS = {"env": env_part, "sampler": sampler_part, "parity": parity_part, "learner": learner_part, "memory": memory_part,
         "e2e": e2e_part}


def table(figures: dict[str, dict], errors: dict[str, str]) -> str:
    lines = []
    for name, row in figures.items():
        status = f"FAILED ({errors[name]})" if name in errors else "ok"
        lines.append(f"{name:<8} {status}")
        lines += [f"    {k:<34} {v}" for k, v in row.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy sizes on the CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help="a comma-separated subset of: " + ", ".join(PARTS))
    args = parser.parse_args(argv)
    names = args.parts.split(",")
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}")
    missing = ensure_packages()
    if missing:
        print(f"missing packages: {', '.join(missing)} (the parts that need them will fail)", flush=True)
    with tempfile.TemporaryDirectory(prefix="pararl-gpu-check-") as work:
        check = Check(args.dry_run, Path(work))
        if not check.gpu and not args.dry_run:
            print("no GPU visible: the figures below are the CPU's (use --dry-run for the toy sizes)", flush=True)
        for name in names:
            check.run(name, PARTS[name])
    print(table(check.figures, check.errors))
    print(json.dumps({"dry_run": args.dry_run, "missing_packages": missing, "errors": check.errors, **check.figures}))
    return 1 if check.errors else 0


if __name__ == "__main__":
    sys.exit(main())
