"""Reward-service configuration (omegaconf structured dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from pararl.config import check_custom_resources
from pararl.errors import ConfigError
from pararl.tasks import TASKS
from reward.verifiable import build_text_reward


@dataclass
class RewardModelConfig:
    name: str = "open_clip"  # a registered name or module:Class
    kwargs: Dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    standardize: bool = True  # ParaRL's clip(1/2 + (s - mean) / (2 Z), 0, 1) with training-data stats


@dataclass
class TextRewardConfig:
    """A reward of the final output text (``reward.verifiable``): a registered name or module:function."""

    name: str = "answer"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardHttpConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    route: str = "/reward"
    token: Optional[str] = None  # or read from the environment variable below
    token_env: str = "PARARL_REWARD_TOKEN"
    max_body_mb: float = 64.0  # a larger request is refused (413) before it is read
    max_images: int = 1024  # images per request
    max_image_side: int = 1024  # pixels; a larger image is refused, not resized and scored


@dataclass
class RewardConfig:
    # label -> reward model; empty in the schema so a config's own models replace, not join, a default
    models: Dict[str, RewardModelConfig] = field(default_factory=dict)
    # label -> a reward of the final text (a verifiable answer, a reasoning format), for the tasks below
    text_models: Dict[str, TextRewardConfig] = field(default_factory=dict)
    # task -> {label: weight}: which rewards score each task family (pararl.tasks) and how much; labels of
    # models (image against text: ParaRL's pairs, the prompt against the image for t2i, the answer against
    # the input image for understand) and of text_models. Unset: generate and edit, every model at its weight.
    tasks: Dict[str, Dict[str, float]] = field(default_factory=dict)
    stats_file: Optional[str] = None  # made by `pararl reward-stats`; required when a model standardises
    stats_texts: str = "partial"  # what the statistics are measured on: "partial" or "full" texts (reward.stats)
    sampled_steps: int = 3  # s: snapshot steps scored per trajectory
    include_final: bool = True  # the last denoising step is always one of them
    step_sampling: str = "random"  # "random" (fresh per iteration) or "uniform" (evenly spaced)
    first_step: float = 0.0  # earliest step that may be sampled, as a share of the trajectory
    nonfinite: str = "drop"  # "drop": the trajectory is dropped and counted; "fail": the step stops
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    # custom Ray resources per replica, e.g. {reward_node: 1}: replicas run only on nodes that have them
    resources_per_replica: Dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 16  # trajectories per batch
    # trajectories per pool request: Serve costs 1.5-2.5 ms of CPU per request here, so the client
    # packs trajectories; @serve.batch still merges requests from all callers up to max_batch_size
    request_size: int = 8
    # per replica; when every slot is taken Serve's router backs off and retries (measured: a 4 s
    # step took 23 s), so the queue belongs in the replica: room for every request of a step
    max_ongoing_requests: int = 1024
    batch_wait_timeout_s: float = 0.01
    retries: int = 3
    request_timeout_s: float = 300.0
    http: RewardHttpConfig = field(default_factory=RewardHttpConfig)


def task_weights(cfg: RewardConfig) -> dict[str, dict[str, float]]:
    """Each task's reward labels and weights (``reward.tasks``, or ParaRL's default)."""
    if cfg.tasks:
        return {task: dict(weights) for task, weights in cfg.tasks.items()}
    return {task: {label: m.weight for label, m in cfg.models.items()} for task in ("generate", "edit")}


def check_task_weights(cfg: RewardConfig) -> None:
    for task, weights in task_weights(cfg).items():
        kind = TASKS.get(task, "reward.tasks")
        if not weights:
            raise ConfigError(f"reward.tasks.{task} names no reward")
        for label, w in weights.items():
            if label not in cfg.models and label not in cfg.text_models:
                known = sorted([*cfg.models, *cfg.text_models])
                raise ConfigError(f"reward.tasks.{task}.{label}: no reward model or text model is labelled {label!r}; "
                                  f"known: {', '.join(known)}")
            if label in cfg.models and not (kind.writes_image or kind.input_image):
                raise ConfigError(f"reward.tasks.{task}.{label}: {label!r} scores an image against a text, and a "
                                  f"{task} trajectory has no image")
            if not w >= 0:
                raise ConfigError(f"reward.tasks.{task}.{label}={w} must be >= 0")
        if any(label in cfg.text_models for label in weights) and not cfg.include_final:
            raise ConfigError(f"reward.tasks.{task} has a text reward, which scores the final text: it needs "
                              "reward.include_final=true")


def check_reward_config(cfg: RewardConfig) -> None:
    """The cheap checks, made before any replica starts (a failing replica is retried for seconds)."""
    if not cfg.models and not cfg.text_models:
        raise ConfigError("reward.models is empty: configure at least one reward model")
    check_task_weights(cfg)
    for label, t in cfg.text_models.items():
        if label in cfg.models:
            raise ConfigError(f"reward label {label!r} names both a reward model and a text model")
        build_text_reward(t.name, dict(t.kwargs))
    standardising = [label for label, m in cfg.models.items() if m.standardize]
    if standardising and not cfg.stats_file:
        raise ConfigError(f"reward models {standardising} standardise but reward.stats_file is not set; "
                         "run `pararl reward-stats CONFIG`")
    if cfg.stats_texts not in ("partial", "full"):
        raise ConfigError(f"reward.stats_texts must be 'partial' or 'full', got {cfg.stats_texts!r}")
    if cfg.nonfinite not in ("drop", "fail"):
        raise ConfigError(f"reward.nonfinite must be 'drop' or 'fail', got {cfg.nonfinite!r}")
    h = cfg.http
    if h.max_body_mb <= 0 or h.max_images < 1 or h.max_image_side < 1:
        raise ConfigError("reward.http.max_body_mb, max_images and max_image_side must be positive")
    if cfg.step_sampling not in ("random", "uniform"):
        raise ConfigError(f"reward.step_sampling must be 'random' or 'uniform', got {cfg.step_sampling!r}")
    if cfg.max_batch_size < 1 or cfg.replicas < 1:
        raise ConfigError("reward.max_batch_size and reward.replicas must be >= 1")
    check_custom_resources(cfg.resources_per_replica, "reward.resources_per_replica")
    if not 1 <= cfg.request_size <= cfg.max_batch_size:
        raise ConfigError(f"reward.request_size must be between 1 and reward.max_batch_size ({cfg.max_batch_size}), "
                         f"got {cfg.request_size}")
    if cfg.max_ongoing_requests < -(-cfg.max_batch_size // cfg.request_size):
        raise ConfigError(f"reward.max_ongoing_requests ({cfg.max_ongoing_requests}) is too small for a full batch "
                         f"of {cfg.max_batch_size} trajectories in requests of {cfg.request_size}")
