"""Judges: what ``pararl eval`` scores finished outputs with, ParaBench's six scores behind one registry.

A judge sees a finished sample (the prompt, the input image when editing, the output image and the
reasoning text) and returns the ParaBench scores it can give; a score it cannot give is left out
(``gives`` says which), and one it could give but did not (a refused or malformed answer) is None,
so a missing judgment is never averaged in as a zero. A judge may give scores of its own beside them
(the training reward, the world's answer checks); ParaBench's come first in tables. Judges are found by name or ``module:Class``
(``reward.base.find``); the generated world's exact checks register from their own package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from pararl.errors import ConfigError
from pararl.registry import Registry
from reward.base import build_reward_model, find
from reward.messages import ScoreRequest

SCORES = ("text_quality", "text_alignment", "image_consistency", "image_alignment", "image_quality", "output_alignment")


@dataclass
class Sample:
    """One finished output. ``key`` names it across runs (record, sample index, model), for caches."""

    key: str
    task: str
    prompt: str
    text: str
    image: Optional[torch.Tensor]  # [3, H, W] in [0, 1]; None for a text-only task
    input_image: Optional[torch.Tensor] = None
    answer: Optional[str] = None
    # the trajectory's snapshots as the reward reads them (token ids at the recorded steps), for judges
    # that score along the trajectory rather than its end
    request: Optional[ScoreRequest] = None


Judgment = dict  # score name -> float, or None where the judge could give it but did not


class Judge(Protocol):
    name: str
    identity: str  # what the judgment depends on (model, weights, prompt templates), for caches
    gives: tuple[str, ...]

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        """One judgment per sample, in order."""


JUDGES: Registry[Callable[..., Judge]] = Registry("judge")
register_judge = JUDGES.register
# judges of other packages, imported only when named (the reward layer imports nothing above the core)
LAZY = {"vlm": "reward.vlm_judge:VLMJudge", "world": "shapeworld.judge:WorldJudge"}


def check_judge_name(name: str) -> str:
    """Refuse an unknown judge at config load, before anything is sampled."""
    if name not in JUDGES and name not in LAZY and ":" not in name:
        raise ConfigError(f"unknown judge {name!r}; known: {', '.join(judge_names())}, or module:Class")
    return name


def build_judge(name: str, kwargs: dict[str, Any] | None = None) -> Judge:
    check_judge_name(name)
    factory = find(JUDGES, LAZY.get(name, name), "module:Class")
    judge = factory(**(kwargs or {}))
    if not judge.gives or not all(isinstance(g, str) and g for g in judge.gives):
        raise ConfigError(f"judge {name!r} must name the scores it gives (gives = {judge.gives!r})")
    return judge


def score_order(names: Sequence[str]) -> list[str]:
    """ParaBench's scores in their order, then any others a judge gave, sorted."""
    return [s for s in SCORES if s in names] + sorted(set(names) - set(SCORES))


def judge_names() -> list[str]:
    return sorted(set(JUDGES.names()) | set(LAZY))


@register_judge("clip")
class ClipJudge:
    """Offline scores from a CLIP model the config names (``reward_model``: open_clip or hf_clip, with its
    settings beside it; any reward model with ``embed_images`` will do):
    output alignment (the image against the reasoning text), image alignment (the image against the
    prompt), and for edits image consistency (input against output image embeddings). Cosines in [-1, 1]."""

    name = "clip"
    gives = ("output_alignment", "image_alignment", "image_consistency")

    def __init__(self, reward_model: str = "open_clip", **kwargs: Any) -> None:
        self.model = build_reward_model(reward_model, kwargs)
        self.identity = f"clip-judge:{self.model.identity}"

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        out: list[Judgment] = [{} for _ in samples]
        drawn = [i for i, s in enumerate(samples) if s.image is not None]
        if not drawn:
            return out
        images = torch.stack([samples[i].image for i in drawn])
        texts = self.model.score(images, [samples[i].text for i in drawn])
        prompts = self.model.score(images, [samples[i].prompt for i in drawn])
        for j, i in enumerate(drawn):
            out[i] = {"output_alignment": float(texts[j]), "image_alignment": float(prompts[j])}
        edits = [i for i in drawn if samples[i].input_image is not None]
        if edits:
            a = self.model.embed_images(torch.stack([samples[i].input_image for i in edits]))
            b = self.model.embed_images(torch.stack([samples[i].image for i in edits]))
            cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
            for j, i in enumerate(edits):
                out[i]["image_consistency"] = float(cos[j])
        return out


@register_judge("reward")
class RewardJudge:
    """The run's own reward on held-out samples: ParaRL's trajectory reward (R_t standardised and
    clipped, averaged over ``sampled_steps`` evenly spaced steps ending at the last), the number the
    training curve shows. Reads each sample's recorded snapshots; the steps are the same for every
    model, so evaluations compare. ``client``: the local scorer or the Serve pool (``RewardClient``)."""

    name = "reward"
    gives = ("reward",)

    def __init__(self, client: Any, steps: int) -> None:
        self.client = client
        self.steps = self.steps_for(client.cfg, steps)
        self.identity = f"reward-judge(steps={self.steps})"

    @staticmethod
    def steps_for(cfg: Any, steps: int) -> list[int]:
        """The steps scored out of a trajectory of ``steps`` (a ``RewardConfig``'s ``sampled_steps`` from
        ``first_step`` on); a ConfigError when they cannot be chosen."""
        import random

        from reward.semantic import choose_steps

        return choose_steps(steps, cfg.sampled_steps, True, "uniform", random.Random(0), cfg.first_step)

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        requests = [self._at_steps(j, s) for j, s in enumerate(samples)]
        if not requests:
            return []
        batch = self.client.score_built(requests)
        return [{"reward": float(r) if bool(k) else None} for r, k in zip(batch.rewards.tolist(), batch.kept.tolist())]

    def _at_steps(self, key: int, sample: Sample) -> ScoreRequest:
        req = sample.request
        if req is None or not set(self.steps) <= set(req.steps):
            have = None if req is None else req.steps
            raise ConfigError(f"judge reward: sample {sample.key} has no snapshots at steps {self.steps} (recorded: {have})")
        rows = [req.steps.index(t) for t in self.steps]
        return ScoreRequest(req.image_ids[rows], req.text_ids[rows], list(self.steps), key=key, task=req.task,
                            prompt=req.prompt, reference=req.reference, input_ids=req.input_ids)
