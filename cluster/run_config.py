"""The run config: every stage's section composed, checked in one place before Ray starts.

``validate_run`` runs each stage's own checks and the checks that span two stages (the reward's
sampled steps must fit the sampler's steps), so a bad value exits with one line at load time, not
minutes later inside an actor.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from cluster.config import ClusterConfig, check_cluster_config
from learner.config import LearnerConfig
from learner.config import validate as validate_learner
from pararl.config import ModelFormatConfig, build_config
from pararl.errors import ConfigError
from pararl.files import atomic_write
from reward.config import RewardConfig, check_reward_config
from reward.judges import check_judge_name
from reward.semantic import run_steps
from rollout.config import SamplerConfig, resolve_sampler


@dataclass
class DataConfig:
    train: Optional[str] = None  # JSONL: prompt, task, input_image, output_image, output_text
    eval: Optional[str] = None  # held-out prompts, same format
    cache_dir: Optional[str] = None  # image codes cache (default: <run_dir>/codes)
    prompts_per_step: int = 4  # B
    group_size: int = 4  # G


@dataclass
class TrackingConfig:
    experiment: str = "pararl"
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the run folder
    snapshot_every: int = 5  # log a picture of snapshots every N steps (0: never)
    snapshot_trajectories: int = 4  # trajectories in that picture


@dataclass
class TrainConfig:
    steps: int = 10  # ParaRL iterations (each: rollout, reward, update(s), weight sync)
    checkpoint_every: int = 5  # 0: only at the end and on SIGTERM / Ctrl-C
    eval_prompts: int = 32
    resume: bool = False  # continue from the latest checkpoint in the run folder
    max_idle_steps: int = 3  # steps in a row that train no trajectory before the run stops, naming why (0: never)


@dataclass
class EvaluationConfig:
    """``pararl eval``: how held-out prompts are sampled and who judges them."""

    samples: int = 1  # samples per prompt (K), each with its own fixed seed
    prompts: Optional[int] = None  # the first N held-out records (None: all)
    snapshots: int = 4  # evenly spaced snapshot steps pictured per sample in the report
    batch_prompts: int = 16  # prompts per sampler call
    workers: int = 0  # 0: sample in-process; N: on N rollout workers of a local or joined Ray (cluster.rollout_*)
    seed: int = 1234  # the per-prompt seeds: the same for every model, so differences are paired
    # judge name -> its settings, e.g. vlm: {base_url: http://127.0.0.1:8000/v1, model: Qwen2.5-VL-7B-Instruct}
    # (clip defaults to the run's CLIP reward model)
    judges: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """A whole ParaRL run: what ``pararl train / eval / reward-stats`` read."""

    name: str = "pararl"
    run_dir: str = "runs/pararl"
    model: str = ""  # model folder: policy weights, tokenizer, pararl.json
    model_format: ModelFormatConfig = field(default_factory=ModelFormatConfig)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def _derived_paths(cfg: RunConfig) -> dict[str, tuple[object, str, str]]:
    """Paths that default to a place in the run folder: key -> (owning section, field, that place)."""
    run_dir = Path(cfg.run_dir)
    return {"reward.stats_file": (cfg.reward, "stats_file", str(run_dir / "reward_stats.json")),
            "data.cache_dir": (cfg.data, "cache_dir", str(run_dir / "codes")),
            "learner.checkpoint.folder": (cfg.learner.checkpoint, "folder", str(run_dir / "checkpoints"))}


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config with derived paths filled in (stats and code cache live in the run folder), checked."""
    cfg = build_config(RunConfig, [path] if path else [], overrides)
    for section, name, default in _derived_paths(cfg).values():
        if getattr(section, name) is None:
            setattr(section, name, default)
    return validate_run(cfg)


def save_run_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write a loaded config so that it can be run again elsewhere.

    The paths that were derived from the run folder are written unset: the config given another
    ``run_dir`` then writes its checkpoints (and statistics, codes) under that one, instead of into
    the first run's folder, which holds another run's checkpoints.
    """
    from omegaconf import OmegaConf

    out = copy.deepcopy(cfg)
    for section, name, default in _derived_paths(out).values():
        if getattr(section, name) == default:
            setattr(section, name, None)
    return atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(out)))


def validate_run(cfg: RunConfig) -> RunConfig:
    """Every stage's checks, then the ones between stages; fills the sampler's preset fields."""
    cfg.sampler = resolve_sampler(cfg.sampler)
    validate_learner(cfg.learner)
    check_cluster_config(cfg.cluster)
    if cfg.reward.models:  # a config that names no reward model is refused where a reward is built
        check_reward_config(cfg.reward)
    _check_counts(cfg)
    for name in cfg.evaluation.judges:
        check_judge_name(name)
    if cfg.cluster.colocate and cfg.learner.zero_stage == 3:
        raise ConfigError("cluster.colocate=true samples from the learner's own parameters, which ZeRO-3 partitions "
                          "across the ranks: use learner.zero_stage 0-2 (ZeRO-2 partitions the optimizer state and "
                          "gradients, and colocate_offload moves that state aside while sampling)")
    if cfg.learner.behaviour == "sampler" and cfg.sampler.prompt_cache_refresh > 1:
        raise ConfigError(f"learner.behaviour=sampler reads pi_old off the sampler's forwards, but with "
                          f"sampler.prompt_cache_refresh={cfg.sampler.prompt_cache_refresh} they are approximate: "
                          "use behaviour=replay (or auto, which replays)")
    try:
        run_steps(cfg.reward, cfg.sampler.steps, random.Random(0))
    except ValueError as err:
        raise ConfigError(f"reward.sampled_steps / reward.first_step do not fit sampler.steps={cfg.sampler.steps}: {err}") from err
    return cfg


def _check_counts(cfg: RunConfig) -> None:
    ev = cfg.evaluation
    positive = {"data.prompts_per_step": cfg.data.prompts_per_step, "data.group_size": cfg.data.group_size,
                "train.eval_prompts": cfg.train.eval_prompts, "evaluation.samples": ev.samples,
                "evaluation.snapshots": ev.snapshots, "evaluation.batch_prompts": ev.batch_prompts,
                "evaluation.prompts": 1 if ev.prompts is None else ev.prompts}
    at_least_zero = {"train.steps": cfg.train.steps, "train.checkpoint_every": cfg.train.checkpoint_every,
                     "train.max_idle_steps": cfg.train.max_idle_steps,
                     "tracking.snapshot_every": cfg.tracking.snapshot_every,
                     "tracking.snapshot_trajectories": cfg.tracking.snapshot_trajectories, "evaluation.workers": ev.workers}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
