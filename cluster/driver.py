"""The ParaRL driver loop on Ray: rollout -> reward -> advantages -> update(s) -> weight sync, repeated.

With ``cluster.max_staleness = k`` the rollouts of steps up to s + k are queued on the workers while
step s is scored and learned (k = 0: synchronous; k = 1: step s+1 is sampled with the weights of
step s-1's update while step s is learned). A new version reaches the workers behind the rollouts
they already hold, so each trajectory is made by the version current when its rollout was queued:
at most k versions behind the policy that trains on it. Each carries that version; an older one is
never trained on. The importance ratios use the behaviour log-probs the workers computed with the
weights that actually sampled.
"""
from __future__ import annotations

import json
import logging
import random
import signal
import time
from collections import deque
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from cluster.actor_group import concurrently
from cluster.ahead import QUEUE_FILE, QueuedRollout, Rollout, encode_queue, load_queue
from cluster.colocated import ColocatedActor
from cluster.config import sync_bucket_bytes
from cluster.evaluate import facts_for
from cluster.learner_group import LearnerActor, LearnerGroup
from cluster.placement import place, start_ray
from cluster.rollout_group import RolloutGroup
from cluster.run_config import RunConfig
from cluster.tracking import Tracker
from cluster.weight_sync import build_weight_sync
from learner.advantages import compute_advantages
from learner.batch import TrainBatch, iteration_plan
from learner.checkpoint import RunState, latest_checkpoint
from learner.config import behaviour_source
from pararl.bundle import load_codecs
from pararl.config import require
from pararl.data import CodeCache, PromptSource, check_images, read_records
from pararl.errors import ConfigError, RunError
from pararl.progress import progress as progress_bar
from pararl.seeds import PLAN_STRIDE, derive
from pararl.snapshots import snapshot_grid
from pararl.types import Trajectories
from reward.config import task_weights
from reward.pool.client import RewardClient
from reward.pool.service import start_reward_pool, stop_reward_pool
from reward.semantic import run_steps
from reward.stats import check_stats_identities
from rollout.config import scoring_of

log = logging.getLogger(__name__)


class Driver:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.codecs = load_codecs(require(cfg.model, "model"), cfg.model_format.named())
        if any(m.standardize for m in cfg.reward.models.values()):
            # a missing, unreadable or other-model stats file fails here, before Ray starts
            check_stats_identities(cfg.reward)
        records = read_records(require(cfg.data.train, "data.train"))
        check_images(records, self.codecs.image_tokenizer.image_size, cfg.data.train)
        unrewarded = sorted({r.task for r in records} - set(task_weights(cfg.reward)))
        if unrewarded:
            raise ConfigError(f"{cfg.data.train} holds {', '.join(unrewarded)} records, and reward.tasks gives them no "
                              f"reward (it has {', '.join(sorted(task_weights(cfg.reward)))})")
        self.prompts = PromptSource(records, self.codecs.encode_text, CodeCache(cfg.data.cache_dir, self.codecs.image_tokenizer),
                                    cfg.seed, step_size=cfg.data.prompts_per_step)
        self.sampled_as = scoring_of(cfg.sampler)  # the rollouts' distribution (learner.scoring=sampled scores under it)
        self.stop_requested = False
        self.idle_steps = 0  # steps in a row that trained no trajectory
        self.ahead: deque[QueuedRollout] = deque()  # rollouts queued on the workers, oldest first
        if cfg.train.resume and latest_checkpoint(cfg.learner.checkpoint.folder) is None:
            raise FileNotFoundError(f"train.resume=true but {cfg.learner.checkpoint.folder} holds no complete checkpoint")

        start_ray(cfg.cluster)
        c, r = cfg.cluster, cfg.reward
        self.placement = place(c, r)
        pool, _ = concurrently(lambda: start_reward_pool(r, cfg.model, cfg.model_format.named()), self._start_actors)
        self.reward = RewardClient(r, handle=pool)
        self.state = RunState(reward_stats_path=cfg.reward.stats_file)
        if cfg.train.resume:
            self._resume()
        self.next_rollout = self.state.step + len(self.ahead)  # the next step whose rollout is to be queued
        self.nodes_at_start = alive_nodes()
        self.tracker = Tracker(self.run_dir, cfg.tracking.experiment, cfg.name, cfg.tracking.tracking_uri,
                               run_id=self.state.extra.get("mlflow_run_id"))
        if not cfg.train.resume:
            self.tracker.log_config(cfg)
            self.tracker.log_file(cfg.reward.stats_file, "reward")
        self.state.extra["mlflow_run_id"] = self.tracker.run_id
        # A resumed run repeats the steps after its checkpoint that were logged before the stop; resume
        # is exact at any staleness (the same seeds, data position, weights and queued rollouts:
        # tests/test_staleness.py), so they are not logged a second time.
        self.logged_through = self.tracker.last_logged_step() if cfg.train.resume else -1

    def _start_actors(self) -> None:
        """The rollout workers, the learner ranks and the weight sync between them; colocated, the learner
        ranks are started first and each becomes a rollout worker too."""
        cfg, c = self.cfg, self.cfg.cluster
        dtype = "bfloat16" if cfg.learner.precision == "bf16" and c.rollout_gpus > 0 else None
        transport = "colocated" if c.colocate else c.sync_transport
        self.sync = build_weight_sync(transport, bucket_bytes=sync_bucket_bytes(c), timeout_s=c.call_timeout_s,
                                      wire_dtype=dtype or "float32", backend="nccl" if c.rollout_gpus > 0 else "gloo")
        behaviour = behaviour_source(cfg.learner, approximate_sampler=cfg.sampler.prompt_cache_refresh > 1)

        def rollouts(colocated=None) -> RolloutGroup:
            return RolloutGroup(c, cfg.model, cfg.sampler, self.placement, self.sync, self.codecs.fmt.pad_id,
                                dtype=dtype, device="cuda" if c.rollout_gpus > 0 else "cpu",
                                named_format=cfg.model_format.named(), behaviour=behaviour, colocated=colocated,
                                adapters=cfg.learner.lora)

        def learners() -> LearnerGroup:
            return LearnerGroup(
                cfg.learner, cfg.model, self.codecs.fmt, world=c.learner_ranks, num_cpus=c.learner_cpus,
                num_gpus=c.learner_gpus, timeout_s=c.call_timeout_s, actor_class=ColocatedActor if c.colocate else LearnerActor,
                actor_options=lambda rank: {"scheduling_strategy": self.placement.strategy(self.placement.learner_bundles[rank]),
                                            "resources": dict(c.learner_resources)})

        if c.colocate:
            self.learners = learners()
            self.rollouts = rollouts(colocated=self.learners.group)
        else:
            self.rollouts, self.learners = concurrently(rollouts, learners)
        self.sync.connect(self.learners.actors, self.rollouts.workers)

    # ---------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.cfg.learner.checkpoint.folder)
        self.state = self.learners.load_checkpoint(str(ckpt))
        self.prompts.position = self.state.data_position
        self.ahead.extend(load_queue(ckpt))  # k >= 1: the rollouts queued at the checkpoint, as they were sampled
        if self.ahead:
            self.prompts.position = self.ahead[-1].end
        # the rollout workers start from the model folder: bring them to the checkpoint's weights
        self.sync.broadcast(self.state.policy_version)

    def _submit(self, step: int) -> QueuedRollout:
        """Queue step ``step``'s rollout: its prompts, its reward steps and scoring plan (all seeded by the
        step), sampled by the version the workers will hold when they reach it."""
        rng = random.Random(derive(self.cfg.seed, step))
        steps = run_steps(self.cfg.reward, self.cfg.sampler.steps, rng)
        plan = iteration_plan(self.cfg.learner, self.cfg.sampler.steps, derive(self.cfg.seed, step, PLAN_STRIDE), steps,
                              self.sampled_as)
        position = self.prompts.position
        requests = self.prompts.next_batch(self.cfg.data.prompts_per_step)
        prompts = [facts_for(self.prompts.record(position + i), r, self.codecs) for i, r in enumerate(requests)]
        submitted = self.rollouts.submit(requests, self.cfg.data.group_size, steps, self.state.policy_version, plan)
        return QueuedRollout(step, submitted, plan, position, prompts, self.prompts.position)

    def _collect(self, queued: QueuedRollout) -> Rollout:
        if queued.collected is not None:
            return queued.collected
        t = time.perf_counter()
        traj, old = self.rollouts.collect(queued.submitted)
        return Rollout(traj, old, queued.plan, time.perf_counter() - t, queued.prompts)

    def _rollout(self, step: int) -> Rollout:
        return self._collect(self._submit(step))

    def _queue_ahead(self) -> None:
        """Queue rollouts up to ``max_staleness`` steps past the one being learned."""
        last = min(self.cfg.train.steps - 1, self.state.step + self.cfg.cluster.max_staleness)
        while self.next_rollout <= last:
            self.ahead.append(self._submit(self.next_rollout))
            self.next_rollout += 1

    def _train_batch(self, rollout: Rollout, rewards) -> tuple[TrainBatch | None, dict[str, float]]:
        lc, traj = self.cfg.learner, rollout.traj
        age = self.state.policy_version - traj.row_versions()
        fresh = age <= self.cfg.cluster.max_staleness  # a trajectory staler than that is never trained on
        staleness = {"rollout/staleness_max": float(age.max()), "rollout/staleness_mean": float(age.float().mean()),
                     "train/stale_dropped": float((~fresh).sum())}
        kept = (rewards.kept & fresh).nonzero().flatten()  # finite reward (the rest were dropped), fresh enough
        if len(kept) == 0:
            return None, {"train/trajectories": 0.0, "train/padding": 0.0, **staleness}
        adv = compute_advantages(rewards.rewards[kept], traj.prompt_index[kept], lc.advantage, lc.advantage_eps,
                                 lc.drop_constant_groups)
        values = torch.zeros(len(traj))
        values[kept] = adv.values
        keep = torch.zeros(len(traj), dtype=torch.bool)
        keep[kept] = adv.keep
        unit = lc.micro_batch_size * lc.grad_accumulation * self.cfg.cluster.learner_ranks
        rows = keep.nonzero().flatten()
        metrics = {"advantage/mean": float(values[keep].mean()) if keep.any() else 0.0,
                   "advantage/abs_mean": float(values[keep].abs().mean()) if keep.any() else 0.0,
                   "advantage/zero_variance_groups": adv.constant_groups / max(1, adv.groups),
                   "train/trajectories": float(len(rows)), "train/padding": float(-len(rows) % unit), **staleness}
        if len(rows) == 0:
            return None, metrics
        # Every usable trajectory trains: the batch is filled up to whole optimizer steps with weight-0 copies.
        batch = TrainBatch.from_trajectories(traj, values, rollout.plan, rollout.old).select(rows).padded(unit)
        return batch, metrics

    def _nothing_trained(self, step: int, traj, rewards, metrics: dict[str, float]) -> None:
        """A step without a trained trajectory is said at once; ``train.max_idle_steps`` of them in a row
        stop the run with the cause, since a run that updates nothing must not "finish"."""
        self.idle_steps += 1
        why = nothing_trained_reason(len(traj), rewards, metrics)
        log.warning("step %d: no trajectory trained (%s)", step, why)
        limit = self.cfg.train.max_idle_steps
        if limit and self.idle_steps >= limit:
            raise RunError(f"{self.idle_steps} steps in a row trained no trajectory (train.max_idle_steps={limit}): "
                           f"{why}; the last checkpoint is intact")

    def _checkpoint(self) -> str:
        """The rollouts queued ahead are collected first and kept with it (``cluster.ahead``)."""
        if any(q.collected is None for q in self.ahead):
            log.info("collecting the %d rollout(s) queued ahead, to keep them with the checkpoint", len(self.ahead))
        for q in self.ahead:
            q.collected = self._collect(q)
        self.state.data_position = self.ahead[0].position if self.ahead else self.prompts.position
        files = {QUEUE_FILE: encode_queue(self.ahead)} if self.ahead else None
        return self.learners.save_checkpoint(self.state, files=files)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_requested = signum
        log.warning("signal %d: finishing this step, writing a checkpoint, then stopping", signum)

    # ---------------------------------------------------------------------------------------------
    def run(self) -> RunState:
        cfg = self.cfg
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = progress_bar(total=cfg.train.steps, initial=self.state.step, desc="ParaRL", unit="step")
        with logging_redirect_tqdm():  # a warning prints above the bar, not through it
            try:
                while self.state.step < cfg.train.steps and not self.stop_requested:
                    step = self.state.step
                    metrics = self._step(step)
                    if step > self.logged_through:
                        self.tracker.log_metrics(metrics, step=step)
                    self.last_metrics = metrics
                    if cfg.train.checkpoint_every and self.state.step % cfg.train.checkpoint_every == 0:
                        self._checkpoint()
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}",
                                    traj_s=f"{metrics['throughput/trajectories_per_s']:.1f}", refresh=False)
                self.sync.wait()
                self._checkpoint()
                self.tracker.finish("FINISHED" if not self.stop_requested else "KILLED")
                return self.state
            except KeyboardInterrupt:
                self.tracker.fail("interrupted", "KILLED")
                raise
            except Exception as err:
                self.tracker.fail(f"{type(err).__name__}: {err}")
                raise
            finally:
                bar.close()
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _step(self, step: int) -> dict[str, float]:
        """One ParaRL iteration: rollout, reward, advantages, update, weight sync; the rollouts of the
        next ``max_staleness`` steps are queued first, so the workers sample them meanwhile."""
        cfg, clock = self.cfg, Clock()
        self._queue_ahead()
        queued = self.ahead.popleft()
        if queued.step != step:
            raise RunError(f"internal: step {step} found the rollout of step {queued.step} first in the queue")
        rollout = self._collect(queued)
        clock.lap("rollout")
        rewards = self.reward.score(rollout.traj, rollout.prompts)
        clock.lap("reward")
        batch, facts = self._train_batch(rollout, rewards)
        facts.update({"data/position": float(queued.position), "data/prompts": float(queued.end - queued.position)})
        if batch is None:
            self._nothing_trained(step, rollout.traj, rewards, facts)
        else:
            self.idle_steps = 0
        learn = self.learners.result(self.learners.train_async(batch), f"during step {step}") if batch is not None else {}
        clock.lap("learner")
        if batch is not None:
            self.state.policy_version += 1
            # behind the queued rollouts; a synchronous run waits, so the next rollout starts from it
            self.sync.broadcast(self.state.policy_version, wait=cfg.cluster.max_staleness == 0)
        clock.lap("sync")
        self.state.step += 1
        metrics = step_metrics(rollout.traj, rewards, facts, learn, clock.laps, clock.total(), self)
        if step == 0 or self.state.step == cfg.train.steps:
            self._log_placement()
        if cfg.tracking.snapshot_every and step % cfg.tracking.snapshot_every == 0:
            self._log_snapshots(rollout.traj, rewards, step)
        return metrics

    def _log_placement(self) -> None:
        """Which node each actor runs on (rollout and learner bundles, reward replicas that answered)."""
        record = {**self.placement.nodes(), "reward_replicas": sorted(self.reward.nodes)}
        path = self.run_dir / "placement.json"
        path.write_text(json.dumps(record, indent=1))
        self.tracker.log_file(path, "cluster")

    def _log_snapshots(self, traj, rewards, step: int) -> None:
        n = min(self.cfg.tracking.snapshot_trajectories, len(traj))
        rows = list(range(0, len(traj), max(1, len(traj) // n)))[:n]
        titles = [f"R={float(rewards.rewards[r]):.2f}" for r in rows]
        image = snapshot_grid(traj, self.codecs.fmt, self.codecs.image_tokenizer, self.codecs.decode_text, rows, titles)
        self.tracker.log_image(image, f"snapshots/step_{step:05d}.png")

    def shutdown(self) -> None:
        for part in (self.rollouts.shutdown, self.learners.shutdown, stop_reward_pool, self.placement.remove):
            try:
                part()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def nothing_trained_reason(n: int, rewards, metrics: dict[str, float]) -> str:
    """Why no trajectory of a step trained, in the user's terms: which reward model failed how often,
    or that every group left had one reward for all its members."""
    parts = []
    if rewards.dropped:
        causes: dict[str, int] = {}
        for p in rewards.problems:  # "trajectory K: reward model 'x' returned a non-finite score at step(s) [...]"
            cause = p.split(": ", 1)[-1].split(" at step")[0]
            causes[cause] = causes.get(cause, 0) + 1
        parts += [f"{cause} for {count} of {n} trajectories" for cause, count in causes.items()]
    if metrics.get("advantage/zero_variance_groups", 0.0) > 0:
        parts.append(f"{metrics['advantage/zero_variance_groups']:.0%} of the groups left had one reward for all "
                     "their members (learner.drop_constant_groups)")
    if metrics.get("train/stale_dropped", 0.0) > 0:
        parts.append(f"{metrics['train/stale_dropped']:.0f} of {n} trajectories were older than cluster.max_staleness")
    return "; ".join(parts) or "no trajectory had a usable advantage"


def alive_nodes() -> set[str]:
    """Ids of the Ray nodes alive now (one call to Ray's control store)."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


class Clock:
    """Wall time of a step's phases, lap by lap."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str, seconds: float | None = None) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last if seconds is None else seconds
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def step_metrics(traj: Trajectories, rewards, facts: dict[str, float], learn: dict, laps: dict[str, float], wall: float,
                 driver: Driver) -> dict[str, float]:
    """Everything a step logs, built in one place: the batch's facts, the reward's and the learner's
    metrics, compute measured where it ran, wall time per phase, and the run's counters."""
    compute = {"rollout": traj.compute_seconds, "reward": rewards.compute_seconds,
               "learner": learn.get("compute_seconds", 0.0)}
    total = sum(compute.values())
    metrics = {**facts, "train/idle_steps": float(driver.idle_steps), **rewards.metrics(),
               **{f"learner/{k}": v for k, v in learn.items() if isinstance(v, (int, float))},
               **{f"compute/{k}": v for k, v in compute.items()},
               "overhead": wall / total - 1 if total > 0 else float("nan"),
               **{f"time/{k}": v for k, v in laps.items()}, "time/step": wall,
               "throughput/trajectories_per_s": len(traj) / wall,
               "policy_version": driver.state.policy_version, "rollout/restarts": driver.rollouts.restarts,
               "rollout/trajectories": float(len(traj)), "rollout/workers": len(driver.rollouts.workers),
               "rollout/workers_lost": driver.rollouts.lost,
               "cluster/nodes_lost": len(driver.nodes_at_start - alive_nodes()),
               "rollout/trajectory_version": traj.policy_version, "learner/lr": driver.cfg.learner.lr}
    return metrics


def timing_metric(key: str) -> bool:
    """Whether a metric of ``step_metrics`` measures time (wall time per phase, compute seconds where it
    ran, the overhead between them, throughput): two runs of the same steps never agree on these, so a
    comparison of runs leaves them out. Takes the logged name or MLflow's (``/`` or ``.``)."""
    key = key.replace("/", ".")
    return key.startswith(("time.", "compute.", "throughput.")) or key == "overhead" or "seconds" in key
