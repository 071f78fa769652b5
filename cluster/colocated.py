"""Colocated ranks (``cluster.colocate=true``): each learner rank is also a rollout worker, in one process.

One node of a few GPUs cannot give rollout and training devices of their own; the two take turns
on the same ones instead. The rank's sampler is built around the learner's own model, so a new
policy version is the parameters the update just wrote: nothing is sent, copied or put in the
object store, and the weight sync only moves the sampler's version (``ColocatedSync``). Calls
reach the actor in the order the driver sent them, so a rollout queued before an update samples
the weights before it, under the version it was tagged with. While it samples, a GPU rank moves
its optimizer's state to host memory (``cluster.colocate_offload``); the next update brings it back.

A colocated rank that dies is a learner rank that died: the run stops (resume continues it).
"""
from __future__ import annotations

from typing import Any, Sequence

import ray
import torch

from cluster.learner_group import LearnerActorBody
from cluster.weight_sync import WeightSync, register_transport
from pararl.errors import RunError
from pararl.logprobs import TokenLogProbs
from pararl.plans import Plan
from pararl.types import GenerationRequest, Trajectories
from rollout.config import SamplerConfig
from rollout.worker import RolloutWorker


class ColocatedBody(LearnerActorBody):
    """A learner rank with a sampler on its own policy; it answers the rollout group's calls too."""

    worker: RolloutWorker | None = None
    offload = True

    def attach_sampler(self, model_folder: str, sampler_cfg: SamplerConfig, threads: int | None,
                       logprob_chunk_rows: int | None, named_format: dict[str, Any] | None, behaviour: str,
                       offload: bool) -> int:
        """After ``setup``: a rollout worker whose policy is this rank's training model (not a copy)."""
        self.offload = offload
        self.worker = RolloutWorker(model_folder, sampler_cfg, device=str(self.learner.engine.device), threads=threads,
                                    logprob_chunk_rows=logprob_chunk_rows, named_format=named_format,
                                    behaviour=behaviour, policy=self.learner.module)
        return self.worker.version

    def ready(self) -> int:
        return self.worker.version

    def sample(self, requests: Sequence[GenerationRequest], group_size: int, snapshot_steps: Sequence[int],
               version: int | None = None, plan: Plan | None = None) -> tuple[Trajectories, TokenLogProbs | None]:
        """The rollout worker's sample, on the training model in eval mode, its optimizer state aside."""
        if self.offload:
            self.learner.step_aside()
        module = self.learner.module
        training = module.training
        module.eval()
        try:
            return self.worker.sample(requests, group_size, snapshot_steps, version, plan)
        finally:
            module.train(training)
            if torch.cuda.is_available():  # the sampler's activations back to the GPU, for a reward replica beside it
                torch.cuda.empty_cache()

    def adopt_weights(self, version: int) -> int:
        """The sampler reads the learner's parameters themselves: the update already put version ``version`` there."""
        self.worker.version = version
        return version


ColocatedActor = ray.remote(ColocatedBody)


@register_transport("colocated")
class ColocatedSync(WeightSync):
    """Weight sync where each rollout worker is a learner rank: one call per rank moves its version."""

    def _send(self, version: int) -> tuple[list, list, list]:
        return [], [w.adopt_weights.remote(version) for w in self.workers], []

    def catch_up(self, worker) -> None:
        raise RunError("a colocated rollout worker cannot restart apart from its learner rank")
