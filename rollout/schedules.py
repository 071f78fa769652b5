"""The two reveal schedules, as per-step counts shared by every trajectory of a batch.

Every row has the same number of text and image positions, so how many tokens a step reveals is one
integer per step: selection is a top-k with a scalar k, and the whole batch moves in lockstep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rollout.config import SamplerConfig, check_sampler


@dataclass(frozen=True)
class RevealPlan:
    """Per step: how many text/image positions to reveal, and which text block may be revealed."""

    text_reveal: list[int]
    text_window: list[tuple[int, int]]  # [start, stop) of the active block, in text-span positions
    image_reveal: list[int]
    image_update: list[bool]
    image_ratio: list[float]  # (s + 1) / steps at an image update made at step s, for the annealed noise
    image_target: list[int]  # floor(N cos(pi/2 ratio)) at an update (-1: the last, which reveals all)

    @property
    def steps(self) -> int:
        return len(self.text_reveal)


def text_masked_after(n: int, steps: int, block_length: int | None, schedule: str = "linear") -> list[int]:
    """Masked text positions after each step, blocks left to right.

    ``linear``: ``int(N * (1 - (k+1)/S))`` within each block, in floating point as the released -A
    generator computes it; ``even``: LLaDA's split (``N // S`` per step, the remainder on the first
    steps), what the released -M generator uses. The two agree whenever S divides N.
    """
    block = block_length or n
    blocks = n // block
    per_block = steps // blocks
    out = []
    for s in range(steps):
        b, k = divmod(s, per_block)
        if schedule == "even":
            base, extra = divmod(block, per_block)
            left = block - (k + 1) * base - min(k + 1, extra)
        else:
            left = int(block * (1 - (k + 1) / per_block))
        out.append((blocks - b - 1) * block + left)
    return out


def image_update_steps(steps: int, image_steps: int, image_start: int) -> list[int]:
    if image_steps == steps - image_start:
        return list(range(image_start, steps))
    return torch.linspace(image_start, steps - 1, image_steps).round().long().tolist()


def image_masked_after(n: int, steps: int, updates: list[int], leave_one: bool = False) -> list[int]:
    """MaskGIT cosine on the GLOBAL step, as both released generators do: after an update at step s,
    ``floor(N cos(pi/2 (s+1)/S))`` stay masked, clamped so each update reveals at least one position
    and leaves at least one; the last update reveals every position left, unless ``leave_one`` (the
    released -A flaw: one stays masked and is filled at random)."""
    counts, left = [], n
    for s in updates:
        left = max(1, min(left - 1, math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps))))
        counts.append(left)
    if not leave_one:
        counts[-1] = 0
    return counts


def reveal_plan(cfg: SamplerConfig, image_tokens: int, text_len: int | None = None) -> RevealPlan:
    """The plan of one layout: ``image_tokens`` codes and ``text_len`` text positions (None: the config's).
    A task family without an image (or text) span has 0 of them: that scheduler then reveals nothing."""
    check_sampler(cfg, image_tokens or None)
    steps = cfg.steps
    n = cfg.text_len if text_len is None else text_len
    if n:
        block = cfg.block_length or n
        per_block = steps // (n // block)
        masked = text_masked_after(n, steps, cfg.block_length, cfg.text_schedule)
        text_reveal = [prev - cur for prev, cur in zip([n] + masked[:-1], masked)]
        window = [((s // per_block) * block, (s // per_block + 1) * block) for s in range(steps)]
    else:
        text_reveal, window = [0] * steps, [(0, 0)] * steps

    image_reveal, image_update, image_ratio = [0] * steps, [False] * steps, [0.0] * steps
    image_target = [0] * steps
    if not image_tokens:
        return RevealPlan(text_reveal, window, image_reveal, image_update, image_ratio, image_target)
    image_steps = cfg.image_steps or steps - cfg.image_start
    updates = image_update_steps(steps, image_steps, cfg.image_start)
    after = image_masked_after(image_tokens, steps, updates, cfg.image_leftover == "random")
    for j, s in enumerate(updates):
        image_reveal[s] = (image_tokens if j == 0 else after[j - 1]) - after[j]
        image_update[s] = True
        image_ratio[s] = (s + 1) / steps
        image_target[s] = math.floor(image_tokens * math.cos(math.pi / 2 * image_ratio[s]))
    if cfg.image_leftover != "random":
        image_target[updates[-1]] = -1
    return RevealPlan(text_reveal, window, image_reveal, image_update, image_ratio, image_target)
