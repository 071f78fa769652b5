"""A step's rollout from submission to training, and the rollouts queued ahead kept with a checkpoint.

With ``cluster.max_staleness = k >= 1``, steps s+1..s+k are queued on the workers while step s is
learned, each sampled by the version current when it was queued. A checkpoint taken then holds what
those rollouts sampled (tokens, step maps, snapshots, behaviour log-probs and the versions that made
them): a resumed run trains on the very samples the uninterrupted run trains on, where sampling them
again would use newer weights. It is small next to the weights: ``pararl plan`` prints its size at the
config's shapes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from cluster.rollout_group import SubmittedRollout
from pararl.logprobs import TokenLogProbs
from pararl.plans import Plan
from pararl.types import PromptFacts, Trajectories

QUEUE_FILE = "queued_rollouts.pt"


@dataclass
class Rollout:
    """One step's sampled batch: its trajectories, their behaviour log-probs and the plan that scored them."""

    traj: Trajectories
    old: TokenLogProbs | None
    plan: Plan
    seconds: float  # how long the driver waited for it
    prompts: list[PromptFacts]  # what each prompt's rewards read besides its trajectories (its task, answer)


@dataclass
class QueuedRollout:
    """A step's rollout sent to the workers; ``position`` is the data position before its prompts and
    ``end`` the one after them. ``collected`` once the driver has it (a checkpoint collects the queue)."""

    step: int
    submitted: SubmittedRollout | None
    plan: Plan
    position: int
    prompts: list[PromptFacts]
    end: int
    collected: Rollout | None = None


def encode_queue(queue: Iterable[QueuedRollout]) -> bytes:
    """The collected rollouts of ``queue``, in order, as the bytes a checkpoint keeps."""
    items = []
    for q in queue:
        if q.collected is None:
            raise ValueError(f"internal: the rollout of step {q.step} is kept with a checkpoint before it was collected")
        items.append({"step": q.step, "position": q.position, "end": q.end, "rollout": q.collected})
    buffer = io.BytesIO()
    torch.save(items, buffer)
    return buffer.getvalue()


def load_queue(checkpoint: str | Path) -> list[QueuedRollout]:
    """The rollouts a checkpoint kept, queued again as collected; none for a synchronous run's checkpoint."""
    path = Path(checkpoint) / QUEUE_FILE
    if not path.is_file():
        return []
    items = torch.load(path, weights_only=False)  # our own sealed checkpoint (its manifest checks the bytes)
    return [QueuedRollout(i["step"], None, i["rollout"].plan, i["position"], i["rollout"].prompts, i["end"], i["rollout"])
            for i in items]


def queued_bytes(rollout: Rollout) -> int:
    """What keeping ``rollout`` with a checkpoint costs, in bytes (``pararl plan`` at the real shapes)."""
    return len(encode_queue([QueuedRollout(0, None, rollout.plan, 0, rollout.prompts, 0, rollout)]))
