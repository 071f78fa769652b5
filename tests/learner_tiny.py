"""Shared by the learner tests: a tiny policy folder and a real sampled batch with advantages and a plan."""
from __future__ import annotations

from pathlib import Path

import torch

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from pararl.logprobs import trajectory_logprobs
from pararl.models import build_policy, load_policy
from pararl.plans import TracePlan
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.tiny import tiny_config, tiny_format

FMT = tiny_format()
STEPS = 4


def policy_folder(root: Path, seed: int = 0) -> Path:
    folder = root / f"policy-{seed}"
    if not folder.exists():
        build_policy(tiny_config(FMT), seed=seed).save_pretrained(folder)
    return folder


def sampled_batch(folder: Path, prompts: int = 4, group: int = 2, plan: TracePlan | None = None,
                  behaviour: bool = True, seed: int = 0, sampler: SamplerConfig | None = None) -> TrainBatch:
    """Trajectories from the real sampler (by default temperature 1, no CFG), random advantages, pi_old from the policy."""
    policy = load_policy(folder)
    cfg = sampler or SamplerConfig(steps=STEPS, text_len=8, text_temperature=1.0, image_temperature=1.0, cfg_image=0,
                                   cfg_text=0)
    requests = [GenerationRequest([10 + i, 11 + i, 12][: 2 + i % 2], seed=seed * 100 + i) for i in range(prompts)]
    tr = ParallelSampler(policy, FMT, cfg).sample(requests, group_size=group)
    gen = torch.Generator().manual_seed(seed)
    advantages = torch.randn(len(tr), generator=gen)
    plan = plan or TracePlan((0, 2), merge=2)
    old = None
    if behaviour:
        with torch.inference_mode():
            old = trajectory_logprobs(policy, FMT, tr, plan)
        old = old.to("cpu")
        old = type(old)(old.logp.clone(), old.mask.clone(), old.weight.clone())
    return TrainBatch.from_trajectories(tr, advantages, plan, old)


def learner_config(**overrides) -> LearnerConfig:
    fields = dict(lr=1e-2, zero_stage=2, micro_batch_size=4, grad_accumulation=2, updates_per_batch=2,
                  beta=0.05, grad_clip=1.0, device="cpu")
    fields.update(overrides)
    return LearnerConfig(**fields)
