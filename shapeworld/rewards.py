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

from shapeworld.checks import image_follows
from shapeworld.dataset import load_world_config
from shapeworld.scene import WorldSpec


def world_spec(world: str | Path) -> WorldSpec:
    """The world a folder holds, named by the folder or by its world.json."""
    return load_world_config(Path(world).parent if Path(world).is_file() else world).spec


class FollowsReward:
    """1 where the image shows no garbled cell and a valid result of the prompt, else 0."""

    def __init__(self, world: str) -> None:
        self.spec = world_spec(world)
        self.codec = self.spec.codec()
        self.identity = f"world-follows({self.spec.to_dict()})"

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        codes = self.codec.encode(images)
        out = []
        for c, prompt in zip(codes, texts):
            out.append(float(image_follows(self.spec, prompt, None, self.spec.parse_image(c))))
        return torch.tensor(out)
