"""The reward computation itself, independent of how it is served.

Rollout workers send token ids: per trajectory, x̂0's image span and the revealed text span at each
sampled step. The scorer decodes them (image tokenizer, text tokenizer), scores every snapshot of a
whole batch of trajectories with each reward model in one call, and applies ParaRL's formula.
Ray Serve replicas wrap it; a single-process run can call it directly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from pararl.bundle import Codecs
from pararl.types import Trajectories
from reward.base import RewardModel, build_reward_model
from reward.config import RewardConfig, check_reward_config
from reward.semantic import combine, standardise, trajectory_reward
from reward.stats import load_stats, stats_for


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def _to_torch(value):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return value


class CheapPickle:
    """Requests and results cross process boundaries by the hundred per step: pickling a small torch
    tensor costs about 100 us, a numpy array a few, so their tensors travel as numpy arrays."""

    def __getstate__(self) -> dict:
        return {k: _to_numpy(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: _to_torch(v) for k, v in state.items()})


@dataclass
class ScoreRequest(CheapPickle):
    """One trajectory's sampled snapshots, as token ids (never pixels)."""

    image_ids: torch.Tensor  # [s, N_img] x̂0 image span
    text_ids: torch.Tensor  # [s, N_txt] revealed text span (masks still in place)
    steps: list[int]
    key: int = 0  # the caller's index of the trajectory


@dataclass
class ScoreResult(CheapPickle):
    key: int
    raw: dict[str, torch.Tensor]  # per reward model: its raw score at each step [s]
    r_t: dict[str, torch.Tensor]  # per reward model: R_t after standardisation and clip [s]
    combined: torch.Tensor  # weighted sum over reward models [s]
    reward: float  # mean of combined over the steps (NaN when any step is non-finite)
    problem: str | None = None  # what was non-finite, for the caller's drop/fail policy
    batch_size: int = 1  # how many requests shared this request's batch
    texts: list[str] = field(default_factory=list)
    replica: int = 0  # process id of the replica that scored it
    compute_seconds: float = 0.0  # decoding + reward models for the whole batch this request was in


def requests_from(traj: Trajectories) -> list[ScoreRequest]:
    """Split a trajectory batch into per-trajectory requests from its snapshots."""
    if traj.snapshot_x0 is None or not len(traj.snapshot_steps):
        raise ValueError("trajectories carry no snapshots: sample with the reward's snapshot steps")
    lay = traj.layout
    img, txt = lay.relative(lay.image), lay.relative(lay.text)
    steps = traj.snapshot_steps.tolist()
    x0, revealed = traj.snapshot_x0.cpu(), traj.snapshot_tokens.cpu()
    return [ScoreRequest(x0[r, :, img], revealed[r, :, txt], steps, key=r) for r in range(len(traj))]


class SemanticScorer:
    def __init__(self, codecs: Codecs, cfg: RewardConfig, models: dict[str, RewardModel] | None = None) -> None:
        check_reward_config(cfg)
        self.codecs, self.cfg = codecs, cfg
        self.models = models or {label: build_reward_model(m.name, dict(m.kwargs)) for label, m in cfg.models.items()}
        self.weights = [cfg.models[label].weight for label in self.models]
        self.stats = {}
        needs_stats = [label for label in self.models if cfg.models[label].standardize]
        if needs_stats:
            table = load_stats(cfg.stats_file)
            for label in needs_stats:
                self.stats[label] = stats_for(table, label, self.models[label].identity, cfg.stats_file)

    def texts(self, text_ids: torch.Tensor) -> list[str]:
        return [self.codecs.decode_text(row) for row in text_ids]

    def raw_scores(self, images: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward model's raw score of the same images and texts (what the HTTP route serves)."""
        return {label: model.score(images, texts) for label, model in self.models.items()}

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        if not requests:
            return []
        start = time.perf_counter()
        counts = [len(r.steps) for r in requests]
        images = self.codecs.decode_images(torch.cat([r.image_ids for r in requests]))
        texts = [t for r in requests for t in self.texts(r.text_ids)]
        raw = self.raw_scores(images, texts)
        r_t = {}
        for label, scores in raw.items():
            st = self.stats.get(label)
            r_t[label] = standardise(scores, st.mean, st.std) if st else scores
        combined = combine(r_t, self.weights)
        seconds = time.perf_counter() - start
        results, start = [], 0
        for req, n in zip(requests, counts):
            part = slice(start, start + n)
            start += n
            comb = combined[part]
            problem = None
            for label, scores in raw.items():
                bad = ~torch.isfinite(scores[part])
                if bad.any():
                    steps = [req.steps[i] for i in bad.nonzero().flatten().tolist()]
                    problem = f"reward model {label!r} returned a non-finite score at step(s) {steps}"
                    break
            results.append(ScoreResult(
                key=req.key,
                raw={k: v[part] for k, v in raw.items()},
                r_t={k: v[part] for k, v in r_t.items()},
                combined=comb,
                reward=float(trajectory_reward(comb)) if problem is None else float("nan"),
                problem=problem,
                batch_size=len(requests),
                texts=texts[part],
                replica=os.getpid(),
                compute_seconds=seconds,
            ))
        return results
