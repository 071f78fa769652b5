"""Held-out evaluation of a policy on the generated world: reward, exact alignment, prompt following.

Every held-out request is sampled (``samples`` times, with fixed per-request seeds so two policies
are compared on the same noise: the before/after difference is paired), scored by the reward at
fixed evenly spaced steps, and checked exactly: does the final text name the objects the final
image shows (``WorldSpec.aligned``), and does the image obey the instruction (``follows``, a guard
against a policy that buys alignment by ignoring the prompt). All sampling is batched.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from pararl.bundle import Codecs
from pararl.config import SamplerConfig
from pararl.data import CodeCache, Record
from pararl.types import GenerationRequest, Trajectories
from pararl.world.scene import WorldSpec
from pararl.world.tasks import PromptError, follows
from reward.client import RewardClient
from reward.config import RewardConfig
from reward.scorer import SemanticScorer
from reward.semantic import choose_steps
from rollout.sampler import ParallelSampler


@dataclass
class EvalResult:
    n: int
    reward: float  # mean trajectory reward (R averaged over the evaluation's sampled steps)
    reward_se: float
    aligned: float  # exact alignment rate of the final text and image
    aligned_se: float
    agreement: float  # soft per-object agreement, mean
    follows: float  # share of final images that obey the instruction
    follows_se: float
    steps: list[int]
    seconds: float
    per_sample: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "per_sample"}


def requests_for(records: Sequence[Record], codecs: Codecs, cache: CodeCache, seed: int) -> list[GenerationRequest]:
    return [GenerationRequest(codecs.encode_text(r.prompt), cache.codes(r.input_image) if r.input_image else None,
                              seed=seed * 1_000_003 + i) for i, r in enumerate(records)]


def check_outputs(spec: WorldSpec, codecs: Codecs, traj: Trajectories, records: Sequence[Record],
                  input_codes: Sequence[torch.Tensor | None]) -> dict[str, list[float]]:
    """Per trajectory: exact alignment, soft agreement, and prompt following of the final outputs."""
    fmt = codecs.fmt
    codes = fmt.image_codes(traj.image_tokens.cpu())
    out: dict[str, list[float]] = {"aligned": [], "agreement": [], "follows": []}
    for row in range(len(traj)):
        rec = records[int(traj.prompt_index[row])]
        text = codecs.decode_text(traj.text_tokens[row].cpu())
        out["aligned"].append(float(spec.aligned(text, codes[row])))
        out["agreement"].append(spec.agreement(text, codes[row]))
        parsed = spec.parse_image(codes[row])
        inp = input_codes[int(traj.prompt_index[row])]
        try:
            ok = not parsed.garbled and follows(spec, rec.prompt, spec.parse_image(inp).objects if inp is not None else None,
                                                parsed.objects)
        except PromptError:
            ok = False
        out["follows"].append(float(ok))
    return out


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return mean, math.sqrt(var / n)


@torch.no_grad()
def evaluate(policy: torch.nn.Module, codecs: Codecs, sampler_cfg: SamplerConfig, reward: RewardClient | SemanticScorer,
             records: Sequence[Record], spec: WorldSpec, cache: CodeCache, reward_cfg: RewardConfig | None = None,
             samples: int = 1, batch_prompts: int = 32, seed: int = 0, progress: bool = True) -> EvalResult:
    """Sample every record ``samples`` times in batches of ``batch_prompts`` prompts and score them.

    ``reward`` is a ``RewardClient`` (the Serve pool or a local scorer) or a bare ``SemanticScorer``
    (wrapped with ``reward_cfg``). The reward is taken at ``sampled_steps`` evenly spaced steps ending
    at the last one, the same for every policy, so evaluations compare.
    """
    if isinstance(reward, SemanticScorer):
        reward = RewardClient(reward_cfg or reward.cfg, scorer=reward)
    cfg = reward.cfg
    steps = choose_steps(sampler_cfg.steps, cfg.sampled_steps, True, "uniform", random.Random(0), cfg.first_step)
    sampler = ParallelSampler(policy, codecs.fmt, sampler_cfg)
    requests = requests_for(records, codecs, cache, seed)
    inputs = [r.input_codes for r in requests]
    start = time.perf_counter()
    per: dict[str, list[float]] = {"reward": [], "aligned": [], "agreement": [], "follows": []}
    # Batches of one task each: editing prompts carry an image, generation prompts do not (less padding).
    order = sorted(range(len(records)), key=lambda i: (records[i].task, len(requests[i].prompt_ids)))
    chunks = [order[i : i + batch_prompts] for i in range(0, len(order), batch_prompts)]
    for chunk in tqdm(chunks, desc="evaluate", disable=not progress, unit="batch"):
        traj = sampler.sample([requests[i] for i in chunk], group_size=samples, snapshot_steps=steps)
        scored = reward.score(traj)
        checks = check_outputs(spec, codecs, traj, [records[i] for i in chunk], [inputs[i] for i in chunk])
        kept = scored.kept.tolist()
        per["reward"] += [float(v) for v, k in zip(scored.rewards.tolist(), kept) if k]
        for key, values in checks.items():
            per[key] += values
    reward_mean, reward_se = _mean_se(per["reward"]) if per["reward"] else (float("nan"), float("nan"))
    aligned, aligned_se = _mean_se(per["aligned"])
    fol, fol_se = _mean_se(per["follows"])
    return EvalResult(
        n=len(per["aligned"]), reward=reward_mean, reward_se=reward_se, aligned=aligned, aligned_se=aligned_se,
        agreement=sum(per["agreement"]) / len(per["agreement"]), follows=fol, follows_se=fol_se, steps=steps,
        seconds=time.perf_counter() - start, per_sample=per,
    )
