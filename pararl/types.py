"""What crosses actor boundaries: small dataclasses of tensors, never models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pararl.formats import OutputLayout


@dataclass
class GenerationRequest:
    """One prompt (token ids), an optional input image (codes: editing, understanding), the seed of its
    group, and its task family (``pararl.tasks``; None: edit with an input image, generate without)."""

    prompt_ids: Sequence[int]
    input_codes: torch.Tensor | None = None
    seed: int = 0
    task: str | None = None


@dataclass
class PromptFacts:
    """What a prompt's rewards read besides its trajectories: the task family, the prompt text (t2i
    scores the image against it), the reference answer (verifiable rewards), the input image's span ids
    (understanding scores the answer against it)."""

    task: str = "generate"
    prompt: str = ""
    reference: str | None = None
    input_ids: torch.Tensor | None = None


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
    policy_version: int = 0  # the oldest version among the rows (``versions`` has each row's)
    versions: torch.Tensor | None = None  # [R] the policy version that sampled each trajectory
    compute_seconds: float = 0.0  # sampling + behaviour log-probs on the worker (the slowest worker, once merged)
    # [R, L_out] log-probability of each output token under the distribution it was drawn from (guided,
    # tempered), at the step that revealed it: what the rollout really sampled, where the behaviour
    # log-probs are the unguided policy at temperature 1.
    sampled_logp: torch.Tensor | None = None
    # [R, L_out] the same tokens under the unguided policy at temperature 1, from the sampler's own forward
    # at the step that revealed them (the state trace replay rebuilds): pi_old for single-step windows
    # without extra forwards. NaN where no forward drew the token (the -A leftover's random code).
    policy_logp: torch.Tensor | None = None
    # [R, U, L] the unconditional rows' prompts the guidance forwarded beside each trajectory (their output
    # columns are whatever; a replay puts the trajectory's state there). None without guidance.
    guidance_rows: torch.Tensor | None = None

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

    def row_versions(self) -> torch.Tensor:
        """[R] each trajectory's policy version."""
        if self.versions is not None:
            return self.versions
        return torch.full((len(self),), self.policy_version, dtype=torch.long)

    def to(self, device: str | torch.device) -> "Trajectories":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Trajectories(**moved)


def concat_trajectories(parts: Sequence[Trajectories], pad_id: int) -> Trajectories:
    """One batch from the parts that different rollout workers sampled (in request order).

    The parts may come from different policy versions (a worker restarted with newer weights): each
    row keeps its own. Each worker left-padded its own prompts; the parts are padded further on the
    left to a common width, which keeps every output span in the same columns (padding is masked out
    of attention).
    """
    import torch.nn.functional as F

    if not parts:
        raise ValueError("no trajectories to concatenate")
    first = parts[0]
    width = max(p.tokens.shape[1] for p in parts)
    out_len = first.layout.length - first.layout.output_start
    for p in parts:
        if p.layout.length - p.layout.output_start != out_len or p.steps != first.steps:
            raise ValueError("trajectory parts differ in output layout or steps: not one sampler config")
        if not torch.equal(p.snapshot_steps, first.snapshot_steps):
            raise ValueError("trajectory parts have different snapshot steps")

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (width - t.shape[-1], 0), value=value)

    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += int(p.prompt_index.max()) + 1 if len(p) else 0
    shift = width - first.layout.length
    lay = first.layout
    layout = OutputLayout(width, lay.output_start + shift, lay.image_start + shift, lay.image_len,
                          lay.text_start + shift, lay.text_len)
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return Trajectories(
        tokens=torch.cat([left(p.tokens, pad_id) for p in parts]),
        attention_mask=torch.cat([left(p.attention_mask, 0) for p in parts]),
        step_map=torch.cat([left(p.step_map, -1) for p in parts]),
        prompt_index=torch.cat([p.prompt_index + off for p, off in zip(parts, offsets)]),
        member=cat("member"),
        seeds=cat("seeds"),
        layout=layout,
        steps=first.steps,
        snapshot_steps=first.snapshot_steps,
        snapshot_tokens=None if first.snapshot_tokens is None else cat("snapshot_tokens"),
        snapshot_x0=None if first.snapshot_x0 is None else cat("snapshot_x0"),
        policy_version=min(p.policy_version for p in parts),
        versions=torch.cat([p.row_versions() for p in parts]),
        compute_seconds=max(p.compute_seconds for p in parts),
        sampled_logp=None if first.sampled_logp is None else cat("sampled_logp"),
        policy_logp=None if first.policy_logp is None else cat("policy_logp"),
        guidance_rows=None if first.guidance_rows is None else torch.cat([left(p.guidance_rows, pad_id) for p in parts]),
    )
