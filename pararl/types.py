"""What crosses actor boundaries: small dataclasses of tensors, never models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pararl.formats import OutputLayout


@dataclass
class GenerationRequest:
    """One prompt (token ids), an optional input image (codes, for editing) and the seed of its group."""

    prompt_ids: Sequence[int]
    input_codes: torch.Tensor | None = None
    seed: int = 0


@dataclass
class Trajectories:
    """B x G trajectories of one sampler call, row r = request ``prompt_index[r]``, member ``member[r]``.

    ``step_map[r, c]`` is the step at which column c was revealed (-1: never masked). A snapshot of
    step t holds the output region after step t's reveal (``snapshot_tokens``, masks in place) and
    x̂0 (``snapshot_x0``: what the model sampled at step t where the position was still masked, the
    revealed token elsewhere).
    """

    tokens: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, L] (left padding)
    step_map: torch.Tensor  # [R, L]
    prompt_index: torch.Tensor  # [R]
    member: torch.Tensor  # [R]
    seeds: torch.Tensor  # [R] the per-trajectory seeds the noise was drawn from
    layout: OutputLayout
    steps: int
    snapshot_steps: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [S]
    snapshot_tokens: torch.Tensor | None = None  # [R, S, L_out]
    snapshot_x0: torch.Tensor | None = None  # [R, S, L_out]
    policy_version: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def output(self) -> torch.Tensor:
        return self.tokens[:, self.layout.output]

    @property
    def image_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.layout.image]

    @property
    def text_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.layout.text]

    def snapshot(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(revealed output, x̂0 output) of every trajectory at ``step``."""
        hits = (self.snapshot_steps == step).nonzero()
        if not len(hits):
            raise KeyError(f"no snapshot at step {step}; have {self.snapshot_steps.tolist()}")
        i = int(hits[0])
        return self.snapshot_tokens[:, i], self.snapshot_x0[:, i]

    def to(self, device: str | torch.device) -> "Trajectories":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Trajectories(**moved)
