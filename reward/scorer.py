"""The reward computation itself, independent of how it is served.

Rollout workers send token ids: per trajectory, x̂0's image span and the revealed text span at each
sampled step. The scorer decodes them (image tokenizer, text tokenizer), scores every snapshot of a
whole batch of trajectories with each reward model in one call, and applies ParaRL's formula.
Ray Serve replicas wrap it; a single-process run can call it directly.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import torch

from pararl.bundle import Codecs
from pararl.errors import PararlError
from pararl.types import Trajectories
from reward.base import RewardModel, RewardModelError, build_reward_model
from reward.config import RewardConfig, check_reward_config
from reward.messages import ChunkResult, ScoreChunk, ScoreRequest, ScoreResult, chunk_requests
from reward.semantic import combine, standardise, trajectory_reward
from reward.stats import load_stats, stats_for


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

    def raw_scores(self, images: torch.Tensor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward model's raw score of the same images and texts (what the HTTP route serves).

        A reward model that raises is named in one ``RewardModelError`` (a plugin's bug is the user's
        to fix, and the run must say which model it was, not show the pool's traceback)."""
        out = {}
        for label, model in self.models.items():
            try:
                out[label] = model.score(images, texts)
            except PararlError:
                raise
            except Exception as err:
                raise RewardModelError(f"reward model {label!r} ({model.identity}) raised "
                                       f"{type(err).__name__}: {err}") from err
        return out

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One scoring pass over the requests (in one process: the pilot, tests)."""
        chunks = chunk_requests(requests, max(1, len(requests)))
        return [r for result in self.score_chunks(chunks) for r in result.results()]

    def score_chunks(self, chunks: Sequence[ScoreChunk]) -> list[ChunkResult]:
        """Every snapshot of every chunk in one call per reward model, answered per chunk."""
        if not chunks:
            return []
        start = time.perf_counter()
        images = self.codecs.decode_images(torch.cat([c.image_ids.flatten(0, 1) for c in chunks]))
        texts = [self.codecs.decode_text(row) for c in chunks for row in c.text_ids.flatten(0, 1)]
        raw = self.raw_scores(images, texts)
        r_t = {}
        for label, scores in raw.items():
            st = self.stats.get(label)
            r_t[label] = standardise(scores, st.mean, st.std) if st else scores
        combined = combine(r_t, self.weights)
        seconds = time.perf_counter() - start
        size = sum(len(c) for c in chunks)
        out, offset = [], 0
        for c in chunks:
            n, s = c.image_ids.shape[:2]
            part = slice(offset, offset + n * s)
            offset += n * s
            rows = lambda v: v[part].reshape(n, s)  # noqa: E731
            c_raw, c_comb = {k: rows(v) for k, v in raw.items()}, rows(combined)
            problems: list[str | None] = [None] * n
            for label, scores in c_raw.items():
                bad = ~torch.isfinite(scores)  # [n, s]
                for i in bad.any(-1).nonzero().flatten().tolist():
                    if problems[i] is None:
                        steps = [c.steps[j] for j in bad[i].nonzero().flatten().tolist()]
                        problems[i] = f"reward model {label!r} returned a non-finite score at step(s) {steps}"
            rewards = trajectory_reward(c_comb)
            rewards[torch.tensor([p is not None for p in problems], dtype=torch.bool)] = float("nan")
            out.append(ChunkResult(
                keys=list(c.keys), raw=c_raw, r_t={k: rows(v) for k, v in r_t.items()}, combined=c_comb,
                rewards=rewards, problems=problems, texts=[texts[part.start + i * s : part.start + (i + 1) * s] for i in range(n)],
                batch_size=size, replica=os.getpid(), compute_seconds=seconds,
            ))
        return out
