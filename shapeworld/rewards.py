"""The world's own reward model for text-to-image: does the image obey the prompt (a verifiable check).

A generation prompt of the world parses back into what it asks (``shapeworld.tasks.follows``), so an
image-only output can be rewarded exactly, where a CLIP trained on descriptions has never seen a prompt.
It is a reward model like any other (images against texts, found by ``module:Class``): for t2i the
texts it receives are the prompts (``reward.scorer``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from shapeworld.dataset import load_world_config
from shapeworld.tasks import PromptError, follows


class FollowsReward:
    """1 where the image shows no garbled cell and a valid result of the prompt, else 0."""

    def __init__(self, world: str) -> None:
        self.spec = load_world_config(Path(world).parent if Path(world).is_file() else world).spec
        self.codec = self.spec.codec()
        self.identity = f"world-follows({self.spec.to_dict()})"

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        codes = self.codec.encode(images)
        out = []
        for c, prompt in zip(codes, texts):
            parsed = self.spec.parse_image(c)
            try:
                out.append(float(not parsed.garbled and follows(self.spec, prompt, None, parsed.objects)))
            except PromptError:
                out.append(0.0)
        return torch.tensor(out)
