"""Calling the reward pool: every trajectory gets its own score back, none is lost, none trusted blindly.

Requests whose replica dies are sent again (Serve routes them to a live or replacement replica);
results come back keyed by trajectory; a non-finite score is never averaged in silently: by config
the trajectory is dropped and counted, or the step fails naming the reward model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from pararl.errors import PararlError, RunError
from pararl.types import PromptFacts, Trajectories
from reward.config import RewardConfig
from reward.messages import ChunkResult, ScoreRequest, ScoreResult, chunk_requests
from reward.scorer import SemanticScorer, requests_from
from reward.semantic import clipped_shares

RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError)


class RewardError(RunError):
    """The reward step cannot complete (non-finite scores under nonfinite=fail, or a pool that stays down)."""


@dataclass
class RewardBatch:
    """Scores of one batch of trajectories, row-aligned with it."""

    rewards: torch.Tensor  # [R], NaN where dropped
    r_t: torch.Tensor  # [R, s] combined R_t
    per_model: dict[str, torch.Tensor]  # label -> [R, s] R_t of that reward model
    raw: dict[str, torch.Tensor]  # label -> [R, s] raw scores
    kept: torch.Tensor  # [R] bool
    steps: list[int]
    problems: list[str] = field(default_factory=list)
    mean_batch_size: float = 0.0
    retries: int = 0
    replicas_seen: int = 0  # distinct replica processes that have answered this client so far
    replica_losses: int = 0  # of those, ones beyond the pool's size: replicas that died and were replaced
    texts: list[list[str]] = field(default_factory=list)
    compute_seconds: float = 0.0  # reward-model time of all batches, divided by the replicas that shared them
    tasks: list[str] = field(default_factory=list)  # [R] each trajectory's task family

    @property
    def dropped(self) -> int:
        return int((~self.kept).sum())

    def metrics(self) -> dict[str, float]:
        kept = self.kept
        out: dict[str, float] = {
            "reward/mean": float(self.rewards[kept].mean()) if kept.any() else float("nan"),
            "reward/std": float(self.rewards[kept].std(unbiased=False)) if kept.any() else float("nan"),
            "reward/dropped": float(self.dropped),
            "reward/scored": float(len(self.rewards)),  # each trajectory once (check_answered)
            "reward/mean_batch_size": self.mean_batch_size,
            "reward/retries": float(self.retries),
            "reward/replicas_seen": float(self.replicas_seen),
            "reward/replica_losses": float(self.replica_losses),
        }
        for label, values in self.per_model.items():
            scored = kept & ~values.isnan().all(-1)  # the trajectories whose task this reward scores
            v = values[scored].mean(-1)
            out[f"reward/{label}/mean"] = float(v.mean()) if scored.any() else float("nan")
            out[f"reward/{label}/std"] = float(v.std(unbiased=False)) if scored.any() else float("nan")
            low, high = clipped_shares(values[scored])
            out[f"reward/{label}/clipped_at_0"], out[f"reward/{label}/clipped_at_1"] = low, high
        for i, step in enumerate(self.steps):
            out[f"reward/R_t/step_{step}"] = float(self.r_t[kept, i].mean()) if kept.any() else float("nan")
        if len(set(self.tasks)) > 1 or (self.tasks and self.tasks[0] not in ("generate", "edit")):
            for task in sorted(set(self.tasks)):
                mine = torch.tensor([t == task for t in self.tasks]) & kept
                out[f"reward/task/{task}/mean"] = float(self.rewards[mine].mean()) if mine.any() else float("nan")
                out[f"reward/task/{task}/trajectories"] = float(mine.sum())
        return out


def assemble(results: Sequence[ScoreResult], steps: list[int], nonfinite: str, retries: int = 0) -> RewardBatch:
    results = sorted(results, key=lambda r: r.key)
    problems = [f"trajectory {r.key}: {r.problem}" for r in results if r.problem]
    if problems and nonfinite == "fail":
        raise RewardError("non-finite reward (reward.nonfinite=fail): " + "; ".join(problems))
    if nonfinite not in ("drop", "fail"):
        raise ValueError(f"reward.nonfinite must be 'drop' or 'fail', got {nonfinite!r}")
    labels = list(dict.fromkeys(label for r in results for label in r.raw))
    blank = torch.full_like(results[0].combined, float("nan"))  # a reward the trajectory's task does not use
    stack = lambda key: {label: torch.stack([getattr(r, key).get(label, blank) for r in results]) for label in labels}  # noqa: E731
    return RewardBatch(
        rewards=torch.tensor([r.reward for r in results]),
        r_t=torch.stack([r.combined for r in results]),
        per_model=stack("r_t"),
        raw=stack("raw"),
        kept=torch.tensor([r.problem is None for r in results]),
        steps=steps,
        problems=problems,
        mean_batch_size=len(results) / sum(1.0 / r.batch_size for r in results),
        retries=retries,
        texts=[r.texts for r in results],
        compute_seconds=batch_seconds(results),
        tasks=[r.task for r in results],
    )


def batch_seconds(results: Sequence[ScoreResult]) -> float:
    """Compute time of the distinct batches behind these results, per replica (replicas run in parallel)."""
    batches = {(r.replica, r.compute_seconds) for r in results}
    replicas = len({r.replica for r in results})
    return sum(s for _, s in batches) / max(1, replicas)


class RewardClient:
    """Scores trajectories through the Serve pool (``handle``) or, for a one-process pilot, a local scorer."""

    def __init__(self, cfg: RewardConfig, handle=None, scorer: SemanticScorer | None = None) -> None:
        if (handle is None) == (scorer is None):
            raise ValueError("give exactly one of a Serve handle or a local scorer")
        self.cfg, self.handle, self.scorer = cfg, handle, scorer
        self.replicas: set[int] = set()
        self.nodes: set[str] = set()  # addresses of the nodes whose replicas have answered

    def score(self, traj: Trajectories, prompts: Sequence[PromptFacts] | None = None) -> RewardBatch:
        """``prompts[i]``: request ``i``'s task and what its rewards read (``requests_from``)."""
        return self.score_built(requests_from(traj, prompts))

    def score_built(self, requests: Sequence[ScoreRequest]) -> RewardBatch:
        """Requests already cut from trajectories (``requests_from``), all at the same steps: what an
        evaluation judge scores from samples saved to disk."""
        if self.scorer is not None:
            size = self.cfg.max_batch_size
            results = [res for i in range(0, len(requests), size) for res in self.scorer.score_batch(requests[i : i + size])]
            return assemble(results, requests[0].steps, self.cfg.nonfinite)
        results, retries = self.score_requests(requests)
        batch = assemble(results, requests[0].steps, self.cfg.nonfinite, retries)
        batch.replicas_seen, batch.replica_losses = len(self.replicas), self.replica_losses
        return batch

    @property
    def replica_losses(self) -> int:
        """Replicas beyond the pool's size that have answered: each one replaced a replica that died.
        Serve may re-send a dead replica's requests itself (no retry is counted here); a new process
        answering is what shows the loss."""
        return max(0, len(self.replicas) - self.cfg.replicas)

    def score_requests(self, requests: Sequence[ScoreRequest]) -> tuple[list[ScoreResult], int]:
        """All requests in flight at once, ``request_size`` trajectories each (stacked in one
        ``ScoreChunk``); a chunk whose replica died is sent again, up to ``retries`` times. Results
        come back in the order given."""
        chunks = chunk_requests(requests, self.cfg.request_size)
        pending = {i: self.handle.score.remote(c) for i, c in enumerate(chunks)}
        results: list[ChunkResult | None] = [None] * len(chunks)
        attempts = [0] * len(chunks)
        retried = 0
        while pending:
            for i, response in list(pending.items()):
                try:
                    results[i] = response.result(timeout_s=self.cfg.request_timeout_s)
                    del pending[i]
                except RETRYABLE as err:
                    attempts[i] += 1
                    if attempts[i] > self.cfg.retries:
                        raise RewardError(f"reward request for trajectories {chunks[i].keys} failed "
                                          f"{attempts[i]} times; last error: {err}") from err
                    retried += 1
                    pending[i] = self.handle.score.remote(chunks[i])
                except PararlError as err:  # raised in the replica (a reward model that failed): one line
                    raise RewardError(str(getattr(err, "cause", None) or err).strip().splitlines()[-1]) from err
                except (GetTimeoutError, TimeoutError) as err:
                    raise RewardError(f"reward pool gave no answer within {self.cfg.request_timeout_s}s "
                                      f"(trajectories {chunks[i].keys})") from err
        self.replicas.update(chunk.replica for chunk in results)
        self.nodes.update(chunk.node for chunk in results if chunk.node)
        out = [r for chunk in results for r in chunk.results()]  # type: ignore[union-attr]
        check_answered([r.key for r in requests], [r.key for r in out])
        return out, retried


def check_answered(asked: Sequence[int], answered: Sequence[int]) -> None:
    """Each trajectory asked about is scored exactly once: a retried request whose first answer also
    arrived, or one lost, would otherwise weigh a trajectory twice or leave it out unseen."""
    seen = Counter(answered)
    wrong = {"scored more than once": sorted(k for k, n in seen.items() if n > 1),
             "left unscored": sorted(set(asked) - set(seen)), "scored unasked": sorted(set(seen) - set(asked))}
    if any(wrong.values()):
        raise RewardError("the reward pool's answers do not match the trajectories asked about: " +
                          "; ".join(f"{what}: trajectories {keys}" for what, keys in wrong.items() if keys))
