"""Held-out evaluation: sample held-out prompts with fixed seeds, hand the samples to judges.

Every request has its own seed (``requests_for``), so two policies are compared on the same noise
and a before/after difference is paired sample by sample. A sampled batch becomes ``Sample``s
(``batch_samples``): the final text, the output image as it is saved (8-bit), the input image, and
the snapshots the reward reads. Judges (``reward.judges``: the run's reward, CLIP, a VLM, the
world's exact checks) score them. ``pararl eval`` writes the samples to disk and judges them from
there (``cluster.eval_command``); ``evaluate`` judges them in memory, for a policy that lives in this
process (the benches). Both build samples here, so both judge the same thing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from cluster.eval_sampling import LocalSampling
from pararl.bundle import Codecs
from pararl.data import CodeCache, Record, load_image
from pararl.progress import progress as progress_bar
from pararl.seeds import derive
from pararl.tasks import TASKS
from pararl.types import GenerationRequest, PromptFacts, Trajectories
from reward.judges import Judge, Judgment, Sample
from reward.scorer import requests_from
from rollout.config import SamplerConfig


@dataclass
class EvalResult:
    """Per sample (record index, sample index): its task and every judge's judgment, in the same order."""

    keys: list[tuple[int, int]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    judgments: dict[str, list[Judgment]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.keys)


def requests_for(records: Sequence[Record], codecs: Codecs, cache: CodeCache, seed: int) -> list[GenerationRequest]:
    return [GenerationRequest(codecs.encode_text(r.prompt), cache.codes(r.input_image) if r.input_image else None,
                              seed=derive(seed, i), task=r.task) for i, r in enumerate(records)]


def facts_for(record: Record, request: GenerationRequest, codecs: Codecs) -> PromptFacts:
    ids = None if request.input_codes is None else codecs.fmt.span_ids(request.input_codes)
    return PromptFacts(record.task, record.prompt, record.answer, ids)


def family_chunks(records: Sequence[Record], requests: Sequence[GenerationRequest], size: int) -> list[list[int]]:
    """Batches of at most ``size`` prompts, each of one task family (one output layout), ordered by task and
    prompt length (editing prompts carry an image, generation prompts do not: less padding)."""
    chunks = []
    for family in sorted({TASKS[r.task].outputs for r in records}):
        order = sorted((i for i, r in enumerate(records) if TASKS[r.task].outputs == family),
                       key=lambda i: (records[i].task, len(requests[i].prompt_ids)))
        chunks += [order[i : i + size] for i in range(0, len(order), size)]
    return chunks


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (nan, nan for no values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, math.sqrt(var / n)


def sample_key(i: int, k: int) -> str:
    return f"{i:05d}-{k:02d}"


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images as an 8-bit PNG holds them: what a judge reads from disk, so in memory it reads the same."""
    return (images.clamp(0, 1) * 255).round() / 255


def batch_samples(codecs: Codecs, records: Sequence[Record], requests: Sequence[GenerationRequest], chunk: Sequence[int],
                  traj: Trajectories, tag: str = "") -> list[Sample]:
    """A sampled batch as judges read it, one sample per trajectory row (record ``chunk[prompt_index]``,
    sample ``member``)."""
    facts = [facts_for(records[i], requests[i], codecs) for i in chunk]
    scored = requests_from(traj, facts) if len(traj.snapshot_steps) else [None] * len(traj)
    images = as_saved(codecs.decode_images(traj.image_tokens)) if traj.layout.image_len else None
    size = codecs.image_tokenizer.image_size
    out = []
    for row in range(len(traj)):
        i, k = chunk[int(traj.prompt_index[row])], int(traj.member[row])
        rec = records[i]
        source = load_image(rec.input_image, size) if rec.input_image else None
        out.append(Sample(f"{tag}/{sample_key(i, k)}", rec.task, rec.prompt, codecs.decode_text(traj.text_tokens[row]),
                          None if images is None else images[row], source, rec.answer, scored[row]))
    return out


def judge_steps(judges: Sequence[Judge]) -> list[int]:
    """The denoising steps the judges read snapshots at (the reward judge's)."""
    return sorted({int(t) for j in judges for t in getattr(j, "steps", ())})


@torch.no_grad()
def evaluate(policy: torch.nn.Module, codecs: Codecs, sampler_cfg: SamplerConfig, records: Sequence[Record],
             cache: CodeCache, judges: Sequence[Judge], samples: int = 1, batch_prompts: int = 32, seed: int = 0,
             progress: bool = True) -> EvalResult:
    """Sample every record ``samples`` times in batches of ``batch_prompts`` prompts of one task family, and
    have every judge judge each batch."""
    requests = requests_for(records, codecs, cache, seed)
    start = time.perf_counter()
    chunks = family_chunks(records, requests, batch_prompts)
    result = EvalResult(judgments={j.name: [] for j in judges})
    batches = LocalSampling(policy, codecs.fmt, sampler_cfg).run([(c, [requests[i] for i in c]) for c in chunks],
                                                                samples, judge_steps(judges))
    for chunk, traj in progress_bar(batches, desc="evaluate", enabled=progress, unit="batch", total=len(chunks)):
        batch = batch_samples(codecs, records, requests, chunk, traj)
        result.keys += [(chunk[int(traj.prompt_index[r])], int(traj.member[r])) for r in range(len(traj))]
        result.tasks += [s.task for s in batch]
        for judge in judges:
            result.judgments[judge.name] += judge.judge(batch)
    result.seconds = time.perf_counter() - start
    return result
