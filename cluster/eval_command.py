"""``pararl eval``: sample held-out prompts K times per model, judge the outputs, compare paired, report.

Two models are sampled with the same per-prompt seeds (``cluster.evaluate.requests_for``), so the
difference of a score is paired sample by sample and its interval is that of the paired differences.
Everything lands in the output folder as it is made: a sample's image, snapshots and text (its JSON
written last, the mark that it is done), then each judge's judgment of it. An interrupted eval run
again with the same folder re-samples only the batches it had not finished and re-judges nothing.
At the end: ``eval.json``, ``report.html`` and an MLflow run.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cluster.eval_report import score_cells, write_report
from cluster.evaluate import batch_samples, family_chunks, mean_se, requests_for, sample_key
from cluster.run_config import RunConfig, load_run_config
from pararl.bundle import load_codecs
from pararl.data import CodeCache, Record, load_image, read_records
from pararl.errors import CheckpointError, ConfigError
from pararl.files import atomic_write
from pararl.progress import progress
from pararl.snapshots import snapshot_grid, to_pil
from pararl.tasks import TASKS
from pararl.types import Trajectories
from reward.judges import Judge, Judgment, RewardJudge, Sample, build_judge, check_judge_name, score_order
from reward.messages import ScoreRequest

log = logging.getLogger(__name__)
TAGS = ("model", "baseline")
CLIP_MODELS = ("open_clip", "hf_clip")


@dataclass
class EvalJob:
    cfg: RunConfig
    models: dict[str, str]  # tag -> model folder
    records: list[Record]
    judges: list[str]
    out: Path


def prepare(config: str, model: str, baseline: str | None, data: str | None, judges: Sequence[str], out: str | None,
            overrides: Sequence[str] = ()) -> EvalJob:
    """Everything checked before any model is loaded: the config, the folders, the dataset, the judges."""
    cfg = load_run_config(config, overrides)
    models = {"model": model} | ({"baseline": baseline} if baseline else {})
    for tag, folder in models.items():
        if not (Path(folder) / "config.json").is_file():
            raise CheckpointError(f"--{tag} {folder}: not a model folder (no config.json)")
    source = data or cfg.data.eval
    if not source:
        raise ConfigError("no held-out prompts: give --data FILE or set data.eval in the config")
    records = read_records(source)[: cfg.evaluation.prompts]
    names = list(judges) or ["clip"]
    for name in names:
        judge_kwargs(cfg, name)  # an unknown judge, or clip without a CLIP model, is refused here
    return EvalJob(cfg, models, records, names, Path(out or Path(cfg.run_dir) / "eval"))


def settings_of(job: EvalJob) -> dict[str, Any]:
    """What the samples on disk depend on: the prompts, the seeds, the sampler, each model folder. Not
    the number of samples: sample k of a prompt has its own seed (the prompt's and k's), whatever K is,
    so K may grow on a folder and only the new samples are drawn."""
    records = hashlib.sha256(json.dumps([asdict(r) for r in job.records], sort_keys=True).encode()).hexdigest()[:16]
    ev = job.cfg.evaluation
    return {"records": records, "seed": ev.seed, "sampler": asdict(job.cfg.sampler),
            "format": str(job.cfg.model_format.named()),
            "models": {tag: str(Path(folder).resolve()) for tag, folder in job.models.items()}}


def claim_folder(job: EvalJob) -> None:
    """Resume only what these settings made: a folder holding another eval's samples (other prompts,
    seeds, sampler settings or model under the same tag) is refused, never mixed in."""
    path, ours = job.out / "settings.json", json.loads(json.dumps(settings_of(job), default=str))
    if path.is_file():
        theirs = json.loads(path.read_text())
        differ = sorted(k for k in ours if k != "models" and theirs.get(k) != ours[k])
        differ += [f"--{tag}" for tag, f in ours["models"].items() if theirs.get("models", {}).get(tag, f) != f]
        if differ:
            raise ConfigError(f"{job.out} holds an eval made with other settings ({', '.join(differ)}); "
                              "give another --out, or remove the folder")
        ours["models"] = {**theirs.get("models", {}), **ours["models"]}
    atomic_write(path, json.dumps(ours, indent=1))


def judge_kwargs(cfg: RunConfig, name: str) -> dict[str, Any]:
    """A judge's settings from ``evaluation.judges.NAME``; the clip judge defaults to the run's CLIP reward."""
    check_judge_name(name)
    kwargs = dict(cfg.evaluation.judges.get(name) or {})
    if name == "reward":
        RewardJudge.steps_for(cfg.reward, cfg.sampler.steps)  # a reward that cannot score these steps is refused here
        return {}
    if name == "clip" and not kwargs:
        clip = next((m for m in cfg.reward.models.values() if m.name in CLIP_MODELS), None)
        if clip is None:
            raise ConfigError("judge clip: the config has no open_clip / hf_clip reward model; name one in "
                              "evaluation.judges.clip (reward_model: open_clip, plus its settings)")
        kwargs = {"reward_model": clip.name, **dict(clip.kwargs)}
    return kwargs


def recorded_steps(cfg: RunConfig) -> tuple[list[int], list[int]]:
    """(the steps pictured in the report, every step recorded): the pictured ones and the reward judge's,
    recorded whichever judges run now, so a judge added on a later call needs no new samples."""
    n = max(1, min(cfg.evaluation.snapshots, cfg.sampler.steps))
    grid = sorted({round(x) for x in np.linspace(0, cfg.sampler.steps - 1, n)})
    try:
        reward = RewardJudge.steps_for(cfg.reward, cfg.sampler.steps)
    except ConfigError:  # a reward config that cannot score these steps: the reward judge will say so
        reward = []
    return grid, sorted(set(grid) | set(reward))


def sample_model(job: EvalJob, tag: str, show: bool = True) -> None:
    """Sample every record ``samples`` times with fixed seeds, writing each finished batch's outputs."""
    from cluster.eval_sampling import sampling

    claim_folder(job)
    cfg, folder = job.cfg, job.out / "samples" / tag
    k_samples = cfg.evaluation.samples
    todo_records = [i for i in range(len(job.records))
                    if not all((folder / f"{sample_key(i, k)}.json").is_file() for k in range(k_samples))]
    if not todo_records:
        return
    codecs = load_codecs(job.models[tag], cfg.model_format.named())
    requests = requests_for(job.records, codecs, CodeCache(job.out / "codes", codecs.image_tokenizer), cfg.evaluation.seed)
    grid, steps = recorded_steps(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [c for c in family_chunks(job.records, requests, cfg.evaluation.batch_prompts) if set(c) & set(todo_records)]
    where = sampling(job.models[tag], cfg)
    try:
        batches = where.run([(c, [requests[i] for i in c]) for c in chunks], k_samples, steps)
        for chunk, traj in progress(batches, desc=f"sample {tag}", enabled=show, unit="batch", total=len(chunks)):
            write_batch(folder, codecs, batch_samples(codecs, job.records, requests, chunk, traj, tag), traj, grid)
    finally:
        where.close()


def at_steps(traj: Trajectories, steps: Sequence[int]) -> Trajectories:
    """The trajectories with only the snapshots of ``steps``."""
    have = traj.snapshot_steps.tolist()
    idx = [have.index(t) for t in steps]
    return replace(traj, snapshot_steps=traj.snapshot_steps[idx], snapshot_tokens=traj.snapshot_tokens[:, idx],
                   snapshot_x0=traj.snapshot_x0[:, idx])


def write_batch(folder: Path, codecs, samples: Sequence[Sample], traj: Trajectories, grid: Sequence[int]) -> None:
    """Each sample's output image, snapshot grid and recorded snapshots, then the JSON that marks it done.
    A sample already done is kept as it is (a record sampled again for a sample it lacked): its
    judgments were made of it."""
    pictured = at_steps(traj, grid)
    for row, sample in enumerate(samples):
        key = sample.key.split("/")[-1]
        if (folder / f"{key}.json").is_file():
            continue
        if sample.image is not None:
            to_pil(sample.image, size=sample.image.shape[-1]).save(folder / f"{key}.png")
        snapshot_grid(pictured, codecs.fmt, codecs.image_tokenizer, codecs.decode_text, rows=(row,)).save(
            folder / f"{key}-snapshots.png")
        if sample.request is not None:
            req = sample.request
            buffer = io.BytesIO()
            torch.save({f.name: getattr(req, f.name) for f in fields(req)}, buffer)
            atomic_write(folder / f"{key}-snapshots.pt", buffer.getvalue())
        i, k = (int(x) for x in key.split("-"))
        atomic_write(folder / f"{key}.json", json.dumps({"record": i, "sample": k, "text": sample.text,
                                                         "image": sample.image is not None}))


def load_sample(job: EvalJob, tag: str, i: int, k: int, size: tuple[int, int]) -> Sample:
    folder, key = job.out / "samples" / tag, sample_key(i, k)
    meta = json.loads((folder / f"{key}.json").read_text())
    rec = job.records[i]
    image = load_image(folder / f"{key}.png", size) if meta["image"] else None
    source = load_image(rec.input_image, size) if rec.input_image else None
    snaps = folder / f"{key}-snapshots.pt"
    request = ScoreRequest(**torch.load(snaps, weights_only=True)) if snaps.is_file() else None
    return Sample(f"{tag}/{key}", rec.task, rec.prompt, meta["text"], image, source, rec.answer, request)


def make_judge(job: EvalJob, tag: str, name: str) -> Judge:
    """A judge as the config sets it; the reward judge scores with the run's reward config and the
    model's codecs (a local scorer), the vlm judge's request cache travels with the eval folder."""
    kwargs = judge_kwargs(job.cfg, name)
    if name == "vlm" and kwargs.get("cache_dir") is None:
        kwargs["cache_dir"] = str(job.out / "judge-cache")
    if name == "reward":
        from reward.pool.client import RewardClient
        from reward.scorer import SemanticScorer

        codecs = load_codecs(job.models[tag], job.cfg.model_format.named())
        kwargs = {"client": RewardClient(job.cfg.reward, scorer=SemanticScorer(codecs, job.cfg.reward)),
                  "steps": job.cfg.sampler.steps}
    return build_judge(name, kwargs)


def judge_model(job: EvalJob, tag: str, name: str, show: bool = True, batch: int = 32) -> dict[str, Judgment]:
    """Every sample's judgment by ``name``, from disk where it was judged before."""
    folder = job.out / "judgments" / name.replace(":", "_") / tag
    folder.mkdir(parents=True, exist_ok=True)
    keys = [(i, k) for i in range(len(job.records)) for k in range(job.cfg.evaluation.samples)]
    todo = [(i, k) for i, k in keys if not (folder / f"{sample_key(i, k)}.json").is_file()]
    if todo:
        judge = make_judge(job, tag, name)
        size = load_codecs(job.models[tag], job.cfg.model_format.named()).image_tokenizer.image_size
        for start in progress(range(0, len(todo), batch), desc=f"judge {name} {tag}", enabled=show, unit="batch"):
            part = todo[start : start + batch]
            verdicts = judge.judge([load_sample(job, tag, i, k, size) for i, k in part])
            for (i, k), verdict in zip(part, verdicts):
                atomic_write(folder / f"{sample_key(i, k)}.json", json.dumps(verdict))
    return {sample_key(i, k): json.loads((folder / f"{sample_key(i, k)}.json").read_text()) for i, k in keys}


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131,
       20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """Student's t 0.975 quantile (the next smaller tabulated df: the interval errs wide), 1.96 beyond."""
    if df > 120:
        return 1.96
    return T95[max(d for d in T95 if d <= df)]


def paired(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float]:
    """Mean of the paired differences a - b over samples both scored, with its 95% t interval."""
    diffs = [a[key] - b[key] for key in a if a[key] is not None and b.get(key) is not None]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": diffs[0] if diffs else math.nan, "lo": math.nan, "hi": math.nan}
    mean, se = mean_se(diffs)
    half = t95(n - 1) * se
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def summarise(judgments: dict[str, dict[str, dict[str, Judgment]]]) -> dict[str, Any]:
    """judge -> tag -> sample -> judgment  to  'judge/score' -> per model {mean, se, n, missing} and the paired diff."""
    scores: dict[str, Any] = {}
    for name, by_tag in judgments.items():
        given = {score for samples in by_tag.values() for v in samples.values() for score in v}
        for score in score_order(sorted(given)):
            per = {tag: {key: v.get(score) for key, v in samples.items() if score in v} for tag, samples in by_tag.items()}
            if not any(per.values()):
                continue
            row: dict[str, Any] = {}
            for tag, values in per.items():
                got = [v for v in values.values() if v is not None]
                mean, se = mean_se(got)
                row[tag] = {"mean": mean, "se": se, "n": len(got), "missing": len(values) - len(got)}
            if "baseline" in per:
                row["difference"] = paired(per["model"], per["baseline"])
            scores[f"{name}/{score}"] = row
    return scores


def table(scores: dict[str, Any]) -> str:
    lines = [f"{'score':<34}{'model':>20}{'baseline':>20}{'difference [95% CI]':>32}"]
    for key, row in scores.items():
        model, baseline, diff = score_cells(row)
        lines.append(f"{key:<34}{model:>20}{baseline:>20}{diff:>32}")
    return "\n".join(lines)


def tasks_of(records: Sequence[Record]) -> dict[str, int]:
    return {t: sum(r.task == t for r in records) for t in TASKS.names() if any(r.task == t for r in records)}


def copy_inputs(job: EvalJob) -> dict[int, Path]:
    """The records' input images, copied into the folder so the report moves with it."""
    import shutil

    folder = job.out / "inputs"
    out = {}
    for i, rec in enumerate(job.records):
        if rec.input_image:
            folder.mkdir(parents=True, exist_ok=True)
            out[i] = folder / f"{i:05d}{Path(rec.input_image).suffix or '.png'}"
            if not out[i].is_file():
                shutil.copyfile(rec.input_image, out[i])
    return out


def track(job: EvalJob, result: dict[str, Any], files: Sequence[Path]) -> None:
    """One MLflow run per eval: the settings, every mean and difference, the report and its images."""
    from cluster.tracking import Tracker

    tracker = Tracker(job.out, f"{job.cfg.tracking.experiment}-eval", job.out.name, job.cfg.tracking.tracking_uri)
    tracker.log_config({"models": job.models, "judges": job.judges, "samples": job.cfg.evaluation.samples,
                        "records": len(job.records), "seed": job.cfg.evaluation.seed})
    metrics = {}
    for key, row in result["scores"].items():
        for tag in TAGS:
            if tag in row and not math.isnan(row[tag]["mean"]):
                metrics[f"{key}/{tag}"] = row[tag]["mean"]
        if "difference" in row and not math.isnan(row["difference"]["mean"]):
            metrics[f"{key}/difference"] = row["difference"]["mean"]
    tracker.log_metrics(metrics, step=0)
    for path in files:
        tracker.log_file(path)
    for folder in ("samples", "inputs"):
        if (job.out / folder).is_dir():
            tracker.log_file(job.out / folder, folder)
    tracker.finish()


def run_eval(job: EvalJob, show: bool = True) -> dict[str, Any]:
    for tag in job.models:
        sample_model(job, tag, show)
    judgments = {name: {tag: judge_model(job, tag, name, show) for tag in job.models} for name in job.judges}
    scores = summarise(judgments)
    result = {"models": job.models, "records": len(job.records), "tasks": tasks_of(job.records),
              "samples": job.cfg.evaluation.samples, "seed": job.cfg.evaluation.seed, "judges": job.judges,
              "scores": scores}
    eval_json = atomic_write(job.out / "eval.json", json.dumps(result, indent=1))
    report = write_report(job.out, job.records, job.cfg.evaluation.samples, job.models, judgments, scores, copy_inputs(job))
    track(job, result, [eval_json, report])
    print(table(scores))
    print(f"eval.json: {eval_json}\nreport: {report}")
    return result


def eval_main(args) -> int:
    overrides = list(args.overrides) + ([f"evaluation.samples={args.samples}"] if args.samples else [])
    job = prepare(args.config, args.model, args.baseline, args.data, args.judge, args.out, overrides)
    run_eval(job)
    return 0
