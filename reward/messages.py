"""What crosses process boundaries between rollout workers, the driver and the reward pool.

``ScoreRequest`` and ``ScoreResult`` are one trajectory each: what callers build and read. On the
wire a pool request is a ``ScoreChunk`` and its answer a ``ChunkResult``: the chunk's trajectories
stacked into a few arrays. Per-trajectory objects made a tiny reward model's pool spend more CPU
on pickling than on scoring: the driver alone used 39% of a core for 8k images/s (``bench/reward.py``,
py-spy), with a few small arrays per trajectory each way.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from pararl.tensors import from_shared


def _to_numpy(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def _to_torch(value):
    if isinstance(value, np.ndarray):
        return from_shared(value)
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return value


class CheapPickle:
    """Pickling a small torch tensor costs about 100 us, a numpy array a few: tensors travel as numpy."""

    def __getstate__(self) -> dict:
        return {k: _to_numpy(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: _to_torch(v) for k, v in state.items()})


@dataclass
class ScoreRequest(CheapPickle):
    """One trajectory's sampled snapshots, as token ids (never pixels), and what its task's rewards read
    besides them: the prompt (t2i scores it against the image), the reference answer (verifiable text
    rewards), the input image (understanding scores the answer against it)."""

    image_ids: torch.Tensor  # [s, N_img] x̂0 image span (N_img = 0: the task writes no image)
    text_ids: torch.Tensor  # [s, N_txt] revealed text span (masks still in place; N_txt = 0: no text)
    steps: list[int]
    key: int = 0  # the caller's index of the trajectory
    task: str = "generate"
    prompt: str = ""
    reference: str | None = None
    input_ids: torch.Tensor | None = None  # [N_img] the input image span's ids (editing, understanding)


@dataclass
class ScoreResult(CheapPickle):
    key: int
    raw: dict[str, torch.Tensor]  # per reward model: its raw score at each step [s]
    r_t: dict[str, torch.Tensor]  # per reward model: R_t after standardisation and clip [s]
    combined: torch.Tensor  # weighted sum over reward models [s]
    reward: float  # mean of combined over the steps (NaN when any step is non-finite)
    problem: str | None = None  # what was non-finite, for the caller's drop/fail policy
    batch_size: int = 1  # how many trajectories shared this one's batch
    texts: list[str] = field(default_factory=list)
    replica: int = 0  # process id of the replica that scored it
    compute_seconds: float = 0.0  # decoding + reward models for the whole batch this request was in
    task: str = "generate"


@dataclass
class ScoreChunk(CheapPickle):
    """Trajectories with the same steps and span lengths, stacked: one pool request."""

    image_ids: torch.Tensor  # [n, s, N_img]
    text_ids: torch.Tensor  # [n, s, N_txt]
    steps: list[int]
    keys: list[int]
    task: str = "generate"
    prompts: list[str] = field(default_factory=list)
    references: list[str | None] = field(default_factory=list)
    input_ids: torch.Tensor | None = None  # [n, N_img]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, requests: Sequence[ScoreRequest]) -> "ScoreChunk":
        first = requests[0]
        for r in requests:
            if _stack_key(r) != _stack_key(first):
                raise ValueError(f"trajectory {r.key} does not stack with trajectory {first.key}: task, steps or "
                                 "span lengths differ")
        inputs = None if first.input_ids is None else torch.stack([r.input_ids for r in requests])
        return cls(torch.stack([r.image_ids for r in requests]), torch.stack([r.text_ids for r in requests]),
                   list(first.steps), [r.key for r in requests], first.task, [r.prompt for r in requests],
                   [r.reference for r in requests], inputs)


def _stack_key(r: ScoreRequest) -> tuple:
    """Requests stack into one chunk when these agree: their task, steps and span lengths."""
    inputs = None if r.input_ids is None else tuple(r.input_ids.shape)
    return r.task, tuple(r.steps), tuple(r.image_ids.shape), tuple(r.text_ids.shape), inputs


def chunk_requests(requests: Sequence[ScoreRequest], size: int) -> list[ScoreChunk]:
    """Consecutive runs of up to ``size`` requests that stack (same steps and span lengths)."""
    chunks, run = [], []
    for r in requests:
        if run and (len(run) == size or _stack_key(r) != _stack_key(run[0])):
            chunks.append(ScoreChunk.of(run))
            run = []
        run.append(r)
    if run:
        chunks.append(ScoreChunk.of(run))
    return chunks


@dataclass
class ChunkResult(CheapPickle):
    """A chunk's scores, row-aligned with its keys; ``results()`` gives the per-trajectory view."""

    keys: list[int]
    raw: dict[str, torch.Tensor]  # label -> [n, s]
    r_t: dict[str, torch.Tensor]  # label -> [n, s]
    combined: torch.Tensor  # [n, s]
    rewards: torch.Tensor  # [n], NaN where a step is non-finite
    problems: list[str | None]
    texts: list[list[str]]
    batch_size: int = 1
    replica: int = 0
    compute_seconds: float = 0.0
    node: str = ""  # the address of the node the replica ran on (set by the pool)
    task: str = "generate"

    def results(self) -> list[ScoreResult]:
        rewards = self.rewards.tolist()
        return [ScoreResult(key=k, raw={label: v[i] for label, v in self.raw.items()},
                            r_t={label: v[i] for label, v in self.r_t.items()}, combined=self.combined[i],
                            reward=rewards[i], problem=self.problems[i], batch_size=self.batch_size,
                            texts=self.texts[i], replica=self.replica, compute_seconds=self.compute_seconds,
                            task=self.task)
                for i, k in enumerate(self.keys)]


# The HTTP route's image payload (the pool serves it; ``reward.remote`` sends it).
def encode_images(images: torch.Tensor) -> str:
    """[N, 3, H, W] in [0, 1] -> base64 of an .npy uint8 array (what the HTTP route takes)."""
    buf = io.BytesIO()
    np.save(buf, (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return base64.b64encode(buf.getvalue()).decode()


class TooLarge(ValueError):
    """A request above one of the HTTP route's limits (``reward.http``): answered 413."""


def decode_images(payload: str, max_side: int | None = None) -> torch.Tensor:
    """The inverse of ``encode_images``; refuses anything but a uint8 [N, 3, H, W] array, and sides above ``max_side``."""
    arr = np.load(io.BytesIO(base64.b64decode(payload, validate=True)), allow_pickle=False)
    if arr.ndim != 4 or arr.shape[1] != 3 or arr.dtype != np.uint8:
        raise ValueError("images must be a uint8 array [N, 3, H, W]")
    if max_side is not None and max(arr.shape[2:]) > max_side:
        raise TooLarge(f"images of {arr.shape[2]}x{arr.shape[3]} pixels, the limit is {max_side} (reward.http.max_image_side)")
    return torch.from_numpy(arr).float() / 255.0
