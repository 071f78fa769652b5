"""The reward-model protocol and its registry.

A reward model scores N images against N texts. Users swap one by editing the config: a registered
name, or ``module:Class`` for their own class, with keyword arguments from the config. Its
``identity`` ties reward statistics to the exact model that produced them.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from pararl.errors import ConfigError, RunError
from pararl.registry import Registry


@runtime_checkable
class RewardModel(Protocol):
    identity: str

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1], N texts -> N float scores."""


class RewardModelError(RunError):
    """A reward model failed while scoring; the message names it (label and identity) and what it raised."""


REWARD_MODELS: Registry[Callable[..., RewardModel]] = Registry("reward model")
register_reward_model = REWARD_MODELS.register


def import_object(path: str) -> Any:
    """``package.module:Name`` -> the object, with an error that says what was not found."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not of the form module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import module {module_name!r} for {path!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"module {module_name!r} has no {attr!r}") from err


def find(registry: Registry, name: str, form: str) -> Any:
    """A registered entry, or the object ``module:Name`` names (``form`` says what users write there)."""
    if name in registry:
        return registry[name]
    if ":" in name:
        return import_object(name)
    raise ConfigError(registry.unknown(name) + f", or use {form}")


def build_reward_model(name: str, kwargs: dict[str, Any] | None = None) -> RewardModel:
    kwargs = dict(kwargs or {})
    factory = find(REWARD_MODELS, name, "module:Class")
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"reward model {name!r} rejects its arguments {sorted(kwargs)}: {err}") from err
    if not callable(getattr(model, "score", None)):
        raise ConfigError(f"reward model {name!r} has no score(images, texts) method")
    if not getattr(model, "identity", None):
        model.identity = default_identity(name, kwargs)
    return model


def static_identity(name: str, kwargs: dict[str, Any]) -> str | None:
    """The identity a registered reward model will have, if its class can tell without being built
    (``identity_of``); None for the others (their stats are checked where they are built)."""
    fn = getattr(REWARD_MODELS.get(name), "identity_of", None)
    return fn(**kwargs) if fn is not None else None


def default_identity(name: str, kwargs: dict[str, Any]) -> str:
    return f"{name}({json.dumps(kwargs, sort_keys=True, default=str)})"


def file_digest(path: str | Path, limit: int = 1 << 40) -> str:
    """sha256 of a weights file: the same architecture with other weights is another reward model."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def as_scores(values: Any, n: int, who: str) -> torch.Tensor:
    """Whatever a reward model returned, as a float tensor [n] (checked, never silently broadcast)."""
    scores = torch.as_tensor(values, dtype=torch.float32).detach().cpu().flatten()
    if scores.numel() != n:
        raise RunError(f"reward model {who} returned {scores.numel()} scores for {n} images")
    return scores
