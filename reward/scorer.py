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
from pararl.tasks import TASKS
from pararl.types import PromptFacts, Trajectories
from reward.base import RewardModel, RewardModelError, build_reward_model
from reward.config import RewardConfig, check_reward_config, task_weights
from reward.messages import ChunkResult, ScoreChunk, ScoreRequest, ScoreResult, chunk_requests
from reward.semantic import combine, standardise, trajectory_reward
from reward.stats import load_stats, stats_for
from reward.verifiable import build_text_reward, score_texts


def requests_from(traj: Trajectories, prompts: Sequence[PromptFacts] | None = None) -> list[ScoreRequest]:
    """Split a trajectory batch into per-trajectory requests from its snapshots; ``prompts[i]`` is what
    the rewards of request ``i``'s task read besides the output (None: generation, nothing else)."""
    if traj.snapshot_x0 is None or not len(traj.snapshot_steps):
        raise ValueError("trajectories carry no snapshots: sample with the reward's snapshot steps")
    lay = traj.layout
    img, txt = lay.relative(lay.image), lay.relative(lay.text)
    steps = traj.snapshot_steps.tolist()
    x0, revealed = traj.snapshot_x0.cpu(), traj.snapshot_tokens.cpu()
    index = traj.prompt_index.tolist()
    facts = [prompts[index[r]] if prompts else PromptFacts() for r in range(len(traj))]
    return [ScoreRequest(x0[r, :, img], revealed[r, :, txt], steps, key=r, task=f.task, prompt=f.prompt,
                         reference=f.reference, input_ids=f.input_ids) for r, f in enumerate(facts)]


class SemanticScorer:
    """Every reward of a task family, one scoring pass per batch of chunks.

    Image-text models score ParaRL's pairs (the output image decoded from x̂0 against the revealed
    text) at each sampled step; for text-to-image the prompt takes the text's place, for understanding
    the input image the output image's. Text models score the final text (the last step's, which is
    the final one) against the request's reference and count at every step. Each task combines its
    labels with its weights (``reward.tasks``)."""

    def __init__(self, codecs: Codecs, cfg: RewardConfig, models: dict[str, RewardModel] | None = None) -> None:
        check_reward_config(cfg)
        self.codecs, self.cfg = codecs, cfg
        self.models = models or {label: build_reward_model(m.name, dict(m.kwargs)) for label, m in cfg.models.items()}
        self.text_models = {label: build_text_reward(t.name, dict(t.kwargs)) for label, t in cfg.text_models.items()}
        self.task_weights = task_weights(cfg)
        self.stats = {}
        needs_stats = [label for label in self.models if cfg.models[label].standardize]
        if needs_stats:
            table = load_stats(cfg.stats_file)
            for label in needs_stats:
                self.stats[label] = stats_for(table, label, self.models[label].identity, cfg.stats_file)

    def raw_scores(self, images: torch.Tensor, texts: Sequence[str], labels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Each reward model's raw score of the same images and texts (what the HTTP route serves).

        A reward model that raises is named in one ``RewardModelError`` (a plugin's bug is the user's
        to fix, and the run must say which model it was, not show the pool's traceback)."""
        out = {}
        for label, model in self.models.items():
            if labels is not None and label not in labels:
                continue
            try:
                out[label] = model.score(images, texts)
            except PararlError:
                raise
            except Exception as err:
                raise RewardModelError(f"reward model {label!r} ({model.identity}) raised "
                                       f"{type(err).__name__}: {err}") from err
        return out

    def weights(self, task: str) -> dict[str, float]:
        if task not in self.task_weights:
            raise RewardModelError(f"no reward is configured for task {task!r} (reward.tasks has "
                                   f"{', '.join(sorted(self.task_weights))})")
        return self.task_weights[task]

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One scoring pass over the requests (in one process: the pilot, tests)."""
        chunks = chunk_requests(requests, max(1, len(requests)))
        return [r for result in self.score_chunks(chunks) for r in result.results()]

    def score_chunks(self, chunks: Sequence[ScoreChunk]) -> list[ChunkResult]:
        """Every snapshot of every chunk in one call per reward model, answered per chunk."""
        if not chunks:
            return []
        start = time.perf_counter()
        texts = [[self.codecs.decode_text(row) for row in c.text_ids.flatten(0, 1)] for c in chunks]
        raw = self._image_text_scores(chunks, texts)
        said = [self._text_scores(c, t, scores) for c, t, scores in zip(chunks, texts, raw)]
        seconds = time.perf_counter() - start
        size = sum(len(c) for c in chunks)
        return [self._result(c, t, scores, problems, size, seconds)
                for c, t, scores, problems in zip(chunks, texts, raw, said)]

    def _pairs(self, c: ScoreChunk, texts: list[str]) -> tuple[torch.Tensor, list[str], bool] | None:
        """(image ids to decode, the texts they pair with, whether each decoded image repeats over the
        steps) of what this chunk's image-text models score; None for a task without an image."""
        task, s = TASKS[c.task], len(c.steps)
        if task.writes_image:
            paired = texts if task.writes_text else [p for p in c.prompts for _ in range(s)]
            return c.image_ids.flatten(0, 1), paired, False
        if task.input_image:
            if c.input_ids is None:
                raise RewardModelError(f"{c.task} trajectories {c.keys[:4]} came without their input image")
            return c.input_ids, texts, True
        return None

    def _image_text_scores(self, chunks: Sequence[ScoreChunk], texts: list[list[str]]) -> list[dict[str, torch.Tensor]]:
        """Per chunk, label -> raw scores [n * s] of the image-text models its task weighs: the images of
        all chunks decoded in one call, each model called once over the pairs of the chunks that use it."""
        pairs = [self._pairs(c, t) if any(lb in self.models for lb in self.weights(c.task)) else None
                 for c, t in zip(chunks, texts)]
        used = [i for i, p in enumerate(pairs) if p is not None]
        out: list[dict[str, torch.Tensor]] = [{} for _ in chunks]
        if not used:
            return out
        decoded = self.codecs.decode_images(torch.cat([pairs[i][0] for i in used])).split([len(pairs[i][0]) for i in used])
        images = {i: d.repeat_interleave(len(chunks[i].steps), 0) if pairs[i][2] else d for i, d in zip(used, decoded)}
        for label in self.models:
            rows = [i for i in used if label in self.weights(chunks[i].task)]
            if not rows:
                continue
            scores = self.raw_scores(torch.cat([images[i] for i in rows]), [t for i in rows for t in pairs[i][1]],
                                     [label])[label]
            scores = torch.as_tensor(scores).flatten()
            for i, part in zip(rows, scores.split([len(pairs[i][1]) for i in rows])):
                out[i][label] = part
        return out

    def _text_scores(self, c: ScoreChunk, texts: list[str], out: dict[str, torch.Tensor]) -> list[str | None]:
        """Adds label -> [n * s] to ``out``: each text model's score of the final text, the same at every
        step. Returns what went wrong per trajectory: an item a text model raised on or gave no finite
        score is NaN, and the trajectory is then dropped or the step fails, as reward.nonfinite says."""
        s, said = len(c.steps), [None] * len(c)
        finals = texts[s - 1 :: s]
        for label in self.weights(c.task):
            if label in self.text_models:
                scores, problems = score_texts(self.text_models[label], finals, c.references, on_error="drop")
                out[label] = scores.repeat_interleave(s)
                said = [old or new for old, new in zip(said, problems)]
        return said

    def _result(self, c: ScoreChunk, texts: list[str], scores: dict[str, torch.Tensor], said: list[str | None],
                size: int, seconds: float) -> ChunkResult:
        n, s = len(c), len(c.steps)
        weights = self.weights(c.task)
        order = [label for label in [*self.models, *self.text_models] if label in weights]
        raw = {label: scores[label].reshape(n, s) for label in order}
        r_t = {}
        for label, values in raw.items():
            st = self.stats.get(label)
            r_t[label] = standardise(values, st.mean, st.std) if st else values
        combined = combine(r_t, [weights[label] for label in order])
        problems: list[str | None] = list(said)
        for label, values in raw.items():
            bad = ~torch.isfinite(values)  # [n, s]
            kind = "reward model" if label in self.models else "text reward"
            for i in bad.any(-1).nonzero().flatten().tolist():
                if problems[i] is None:
                    steps = [c.steps[j] for j in bad[i].nonzero().flatten().tolist()]
                    problems[i] = f"{kind} {label!r} returned a non-finite score at step(s) {steps}"
        rewards = trajectory_reward(combined)
        rewards[torch.tensor([p is not None for p in problems], dtype=torch.bool)] = float("nan")
        return ChunkResult(
            keys=list(c.keys), raw=raw, r_t=r_t, combined=combined, rewards=rewards, problems=problems,
            texts=[texts[i * s : (i + 1) * s] for i in range(n)], batch_size=size, replica=os.getpid(),
            compute_seconds=seconds, task=c.task,
        )
