"""Loading typed configs (omegaconf structured dataclasses), and the model-format section every stage reads.

Each stage owns its schema and checks (``rollout.config``, ``reward.config``, ``learner.config``,
``cluster.config``); the run config that composes them is ``cluster.run_config``.

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

from pararl.errors import ConfigError

__all__ = ["ConfigError", "ModelFormatConfig", "build_config", "require"]


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


def load_yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A YAML file as merge layers: what its ``extends: OTHER.yaml`` (relative to it) says first, then
    its own keys over them, so a variant config states only what it changes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} extends itself through {' -> '.join(map(str, seen))}")
    layer = OmegaConf.load(path)
    base = layer.pop("extends", None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [layer]
    return load_yaml_layers(path.parent / str(base), (*seen, path.resolve())) + [layer]


def build_config(schema: type[T], sources: Sequence[Any] = (), overrides: Sequence[str] = ()) -> T:
    """Merge YAML files / dicts, then dotted ``key=value`` overrides, into ``schema``; refuse unknown keys."""
    base = OmegaConf.structured(schema)
    layers = []
    for source in sources:
        if isinstance(source, (str, Path)):
            layers += load_yaml_layers(Path(source))
        else:
            layers.append(OmegaConf.create(source))
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
class ModelFormatConfig:
    """Name a model folder's token format and image tokenizer instead of detecting them (``pararl.detect``)."""

    preset: Optional[str] = None  # e.g. mmada-parallel-a, mmada-parallel-m
    options: Dict[str, Any] = field(default_factory=dict)  # preset options, e.g. {grid: [32, 32]}
    image_tokenizer: Dict[str, Any] = field(default_factory=dict)  # e.g. {type: magvit2, path: /shared/magvitv2}

    def named(self) -> dict[str, Any]:
        return {"preset": self.preset, "options": dict(self.options), "image_tokenizer": dict(self.image_tokenizer)}


def require(value: Any, key: str) -> Any:
    if value in (None, ""):
        raise ConfigError(f"config key {key!r} must be set")
    return value


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(resources: Dict[str, float], key: str) -> None:
    """A stage's custom Ray resources (what places its actors on chosen nodes): CPUs and GPUs have
    their own keys, and an amount that is not positive would place nothing."""
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ConfigError(f"{key} names Ray's own resource {name!r}: use the stage's cpus/gpus keys for it")
        if not amount > 0:
            raise ConfigError(f"{key}.{name}={amount:g} must be positive")
