"""Held-out evaluation of a policy: the reward with its standard error, plus a task's own checks.

Every held-out request is sampled (``samples`` times, with fixed per-request seeds so two policies
are compared on the same noise: the before/after difference is paired) and scored by the reward at
fixed evenly spaced steps. A task can add checks of the final outputs (the generated world's exact
alignment and prompt following: ``shapeworld.checks``); each is averaged with its standard error.
All sampling is batched.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from cluster.eval_sampling import LocalSampling
from pararl.bundle import Codecs
from pararl.data import CodeCache, Record
from pararl.progress import progress as progress_bar
from pararl.seeds import derive
from pararl.tasks import TASKS
from pararl.types import GenerationRequest, PromptFacts, Trajectories
from reward.config import RewardConfig
from reward.pool.client import RewardClient
from reward.scorer import SemanticScorer
from reward.semantic import choose_steps
from rollout.config import SamplerConfig

# (trajectories of a batch, their records, their requests) -> per-trajectory values of each named check
Checks = Callable[[Trajectories, Sequence[Record], Sequence[GenerationRequest]], dict[str, list[float]]]


@dataclass
class EvalResult:
    n: int
    reward: float  # mean trajectory reward (R averaged over the evaluation's sampled steps)
    reward_se: float
    steps: list[int]
    seconds: float
    checks: dict[str, float] = field(default_factory=dict)  # each task check's mean, and its standard error as NAME_se
    per_sample: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "reward": self.reward, "reward_se": self.reward_se, **self.checks,
                "steps": self.steps, "seconds": self.seconds}


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


@torch.no_grad()
def evaluate(policy: torch.nn.Module, codecs: Codecs, sampler_cfg: SamplerConfig, reward: RewardClient | SemanticScorer,
             records: Sequence[Record], cache: CodeCache, reward_cfg: RewardConfig | None = None, samples: int = 1,
             batch_prompts: int = 32, seed: int = 0, progress: bool = True, checks: Checks | None = None) -> EvalResult:
    """Sample every record ``samples`` times in batches of ``batch_prompts`` prompts and score them.

    ``reward`` is a ``RewardClient`` (the Serve pool or a local scorer) or a bare ``SemanticScorer``
    (wrapped with ``reward_cfg``). The reward is taken at ``sampled_steps`` evenly spaced steps ending
    at the last one, the same for every policy, so evaluations compare.
    """
    if isinstance(reward, SemanticScorer):
        reward = RewardClient(reward_cfg or reward.cfg, scorer=reward)
    cfg = reward.cfg
    steps = choose_steps(sampler_cfg.steps, cfg.sampled_steps, True, "uniform", random.Random(0), cfg.first_step)
    requests = requests_for(records, codecs, cache, seed)
    start = time.perf_counter()
    per: dict[str, list[float]] = {"reward": []}
    chunks = family_chunks(records, requests, batch_prompts)
    batches = LocalSampling(policy, codecs.fmt, sampler_cfg).run([(c, [requests[i] for i in c]) for c in chunks], samples, steps)
    for chunk, traj in progress_bar(batches, desc="evaluate", enabled=progress, unit="batch", total=len(chunks)):
        scored = reward.score(traj, [facts_for(records[i], requests[i], codecs) for i in chunk])
        per["reward"] += [float(v) for v, k in zip(scored.rewards.tolist(), scored.kept.tolist()) if k]
        if checks is not None:
            for key, values in checks(traj, [records[i] for i in chunk], [requests[i] for i in chunk]).items():
                per.setdefault(key, []).extend(values)
    reward_mean, reward_se = mean_se(per["reward"])
    summary: dict[str, float] = {}
    for key, values in per.items():
        if key != "reward":
            summary[key], summary[f"{key}_se"] = mean_se(values)
    return EvalResult(n=len(records) * samples, reward=reward_mean, reward_se=reward_se, steps=steps,
                      seconds=time.perf_counter() - start, checks=summary, per_sample=per)
