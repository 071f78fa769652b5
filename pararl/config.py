"""The typed run configuration (omegaconf structured dataclasses).

A typo in a key must not silently fall back to a default in a multi-hour run, so merging a YAML
file or a ``key=value`` override into the schema refuses unknown keys and names the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from cluster.config import ClusterConfig, check_cluster_config
from learner.config import LearnerConfig
from learner.config import validate as validate_learner
from pararl.errors import ConfigError
from pararl.sampler_config import SamplerConfig, resolve_sampler  # noqa: F401 (re-exported)
from reward.config import RewardConfig


T = TypeVar("T")


def _closest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)  # a far-off "neighbour" misleads
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_keys(schema: DictConfig, given: Any, prefix: str = "") -> None:
    """Walk the user's keys against the schema, so the error names the full dotted key and a neighbour.

    A ``Dict[str, X]`` field takes any key (a label the user picks); its values are checked against X.
    """
    if not isinstance(given, (dict, DictConfig)):
        return
    if OmegaConf.get_type(schema) is dict:
        element = schema._metadata.element_type
        if dataclasses.is_dataclass(element):
            for key, value in given.items():
                _check_keys(OmegaConf.structured(element), value, f"{prefix}{key}.")
        return
    valid = list(schema.keys())
    for key in given:
        if key not in schema:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{_closest(str(key), valid)}")
        child = schema._get_node(key)
        if isinstance(child, DictConfig):
            _check_keys(child, given[key], f"{prefix}{key}.")


def build_config(schema: type[T], sources: Sequence[Any] = (), overrides: Sequence[str] = ()) -> T:
    """Merge YAML files / dicts, then dotted ``key=value`` overrides, into ``schema``; refuse unknown keys."""
    base = OmegaConf.structured(schema)
    layers = []
    for source in sources:
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            layer = OmegaConf.load(path)
        else:
            layer = OmegaConf.create(source)
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        layers.append(OmegaConf.from_dotlist([item]))
    for layer in layers:
        _check_keys(base, OmegaConf.to_container(layer))
    try:
        merged = OmegaConf.merge(base, *layers)
    except (ConfigKeyError, ConfigAttributeError, ValidationError) as err:
        what = str(getattr(err, "msg", err)).strip().splitlines()[0]  # OmegaConf appends key/type context lines
        key = getattr(err, "full_key", None)
        raise ConfigError(f"invalid config value for {key!r}: {what}" if key else f"invalid config: {what}") from err
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


@dataclass
class SampleCommandConfig:
    """What ``pararl sample`` reads besides its flags (only the sampler, for now)."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)


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
    eval_every: int = 0  # held-out evaluation every N steps (0: before and after only)
    eval_prompts: int = 32
    resume: bool = False  # continue from the latest checkpoint in the run folder
    max_idle_steps: int = 3  # steps in a row that train no trajectory before the run stops, naming why (0: never)


@dataclass
class ModelFormatConfig:
    """Name a model folder's token format and image tokenizer instead of detecting them (``pararl.detect``)."""

    preset: Optional[str] = None  # e.g. mmada-parallel-a, mmada-parallel-m
    options: Dict[str, Any] = field(default_factory=dict)  # preset options, e.g. {grid: [32, 32]}
    image_tokenizer: Dict[str, Any] = field(default_factory=dict)  # e.g. {type: magvit2, path: /shared/magvitv2}

    def named(self) -> dict[str, Any]:
        return {"preset": self.preset, "options": dict(self.options), "image_tokenizer": dict(self.image_tokenizer)}


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


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config with derived paths filled in (stats and code cache live in the run folder)."""
    cfg = build_config(RunConfig, [path] if path else [], overrides)
    run_dir = Path(cfg.run_dir)
    if cfg.reward.stats_file is None:
        cfg.reward.stats_file = str(run_dir / "reward_stats.json")
    if cfg.data.cache_dir is None:
        cfg.data.cache_dir = str(run_dir / "codes")
    if cfg.learner.checkpoint.folder is None:
        cfg.learner.checkpoint.folder = str(run_dir / "checkpoints")
    cfg.sampler = resolve_sampler(cfg.sampler)
    validate_learner(cfg.learner)
    check_cluster_config(cfg.cluster)
    check_sampled_steps(cfg)
    return cfg


def check_sampled_steps(cfg: RunConfig) -> None:
    """The reward's sampled steps must fit the sampler's steps: found now, not at the first step on Ray."""
    import random

    from reward.semantic import run_steps

    try:
        run_steps(cfg.reward, cfg.sampler.steps, random.Random(0))
    except ValueError as err:
        raise ConfigError(f"reward.sampled_steps / reward.first_step do not fit sampler.steps={cfg.sampler.steps}: {err}") from err


def require(value: Any, key: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"config key {key!r} must be set")
    return value
