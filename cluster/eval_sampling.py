"""Where ``pararl eval`` samples: in-process for small runs, or on rollout workers of a local or joined
Ray (``evaluation.workers``), each batch going to whichever worker is free.

Both give the same batches back (a batch's seeds are its own, so which worker samples it does not
matter) as they finish; the caller decodes and writes them. The workers are the training's own
``RolloutWorker`` actors, placed with ``cluster.rollout_cpus`` / ``rollout_gpus`` (bf16 on GPUs).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from cluster.run_config import RunConfig
from pararl.types import GenerationRequest, Trajectories

Batch = tuple[list[int], list[GenerationRequest]]  # record indices, their requests


class LocalSampling:
    """The held-out batches sampled in this process, in order: ``pararl eval`` and the default run's
    before/after evaluation (``cluster.evaluate``) both sample through here."""

    def __init__(self, policy: torch.nn.Module, fmt, sampler_cfg) -> None:
        from rollout.sampler import ParallelSampler

        self.sampler = ParallelSampler(policy, fmt, sampler_cfg)

    @classmethod
    def from_folder(cls, folder: str, cfg: RunConfig) -> "LocalSampling":
        from pararl.bundle import load_bundle

        bundle = load_bundle(folder, named=cfg.model_format.named())
        return cls(bundle.policy, bundle.fmt, cfg.sampler)

    def run(self, batches: Sequence[Batch], group: int, steps: Sequence[int]) -> Iterator[tuple[list[int], Trajectories]]:
        for chunk, requests in batches:
            with torch.inference_mode():
                yield chunk, self.sampler.sample(requests, group_size=group, snapshot_steps=steps)

    def close(self) -> None:
        pass


class RaySampling:
    def __init__(self, folder: str, cfg: RunConfig, workers: int) -> None:
        import ray

        from cluster.actor_group import ActorGroup
        from cluster.placement import start_ray
        from rollout.worker import RolloutWorker

        self.started = not ray.is_initialized()
        start_ray(cfg.cluster)
        c = cfg.cluster
        gpu = c.rollout_gpus > 0
        args = (folder, cfg.sampler, "cuda" if gpu else "cpu", "bfloat16" if gpu else None,
                c.rollout_threads or max(1, int(c.rollout_cpus)), None, cfg.model_format.named())
        self.group = ActorGroup(RolloutWorker, workers, lambda i: args,
                                lambda i: {"num_cpus": c.rollout_cpus, "num_gpus": c.rollout_gpus,
                                           "resources": dict(c.rollout_resources)}, c.call_timeout_s)
        self.group.call("ready")

    def run(self, batches: Sequence[Batch], group: int, steps: Sequence[int]) -> Iterator[tuple[list[int], Trajectories]]:
        import ray

        queue, free, pending = list(batches), list(range(len(self.group))), {}
        while queue or pending:
            while queue and free:
                worker = free.pop()
                chunk, requests = queue.pop(0)
                pending[self.group[worker].sample.remote(requests, group, list(steps))] = (chunk, worker)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.group.timeout_s)
            if not done:
                raise TimeoutError(f"no evaluation batch finished within cluster.call_timeout_s={self.group.timeout_s}")
            chunk, worker = pending.pop(done[0])
            traj, _ = ray.get(done[0])
            free.append(worker)
            yield chunk, traj

    def close(self) -> None:
        import ray

        for actor in self.group.actors:
            ray.kill(actor)
        if self.started:
            ray.shutdown()


def sampling(folder: str, cfg: RunConfig) -> LocalSampling | RaySampling:
    workers = cfg.evaluation.workers
    return RaySampling(folder, cfg, workers) if workers > 0 else LocalSampling.from_folder(folder, cfg)
