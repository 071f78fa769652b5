"""Reward statistics: mean and Z (std) of each reward model's score over the training data.

They are measured once (``pararl reward-stats``, or the default run's preparation: one code path,
``reference_batches``) and saved with the reward model's identity; a run refuses statistics made with
another model, since standardising with them would silently shift every reward.

What they are measured on is ``reward.stats_texts``. "full": the training pairs as they are, the
paper's E[r_CLIP] and Z. "partial" (the default): the same pairs with a random share of each text's
words dropped, i.e. the text as the reward sees it at a sampled intermediate step. The reward scores
partial texts; standardised by the statistics of full ones, nearly every partial snapshot lands far
below the mean and R_t is clipped at 0, and the group has nothing to contrast.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from pararl.data import CodeCache, Record, reference_pairs
from pararl.errors import ConfigError
from pararl.files import atomic_write
from pararl.progress import progress as progress_bar
from reward.base import RewardModel, static_identity


class RewardStatsError(ConfigError):
    """Missing, unreadable or mismatched statistics; the message says what to run."""


@dataclass
class ModelStats:
    identity: str
    mean: float
    std: float
    count: int


STATS_TEXTS = ("partial", "full")


def drop_words(text: str, rng: random.Random) -> str:
    """A random partial reveal: each word kept with probability 1 - t, t ~ U(0, 1); at least one word kept."""
    words = text.split()
    t = rng.random()
    kept = [w for w in words if rng.random() >= t]
    return " ".join(kept or [rng.choice(words)])


def reference_batches(records: list[Record], cache: CodeCache, batch: int, texts: str = "partial",
                      seed: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The (image, text) batches the statistics are measured on; ``texts`` as ``reward.stats_texts``."""
    if texts not in STATS_TEXTS:
        raise ConfigError(f"reward.stats_texts must be one of {STATS_TEXTS}, got {texts!r}")
    batches = reference_pairs(records, cache, batch)
    if texts == "full":
        return batches
    rng = random.Random(seed + 1)  # a run's seed gives the same partial texts in every batch size
    return ((images, [drop_words(t, rng) for t in part]) for images, part in batches)


def compute_stats(
    model: RewardModel, batches: Iterable[tuple[torch.Tensor, Sequence[str]]], total: int | None = None, desc: str = "reward stats"
) -> ModelStats:
    """Mean and population std over (image, text) batches, accumulated in float64."""
    n, s1, s2 = 0, 0.0, 0.0
    with progress_bar(total=total, desc=desc, unit="pair") as bar:
        for images, texts in batches:
            scores = model.score(images, texts).double()
            if not torch.isfinite(scores).all():
                raise RewardStatsError(f"reward model {model.identity} returned non-finite scores on training data")
            n += scores.numel()
            s1 += float(scores.sum())
            s2 += float((scores * scores).sum())
            bar.update(len(texts))
    if n < 2:
        raise RewardStatsError("reward statistics need at least two training pairs")
    mean = s1 / n
    std = max(s2 / n - mean * mean, 0.0) ** 0.5
    if std == 0:
        raise RewardStatsError(f"reward model {model.identity} gives the same score to every training pair (std 0)")
    return ModelStats(model.identity, mean, std, n)


def save_stats(path: str | Path, stats: dict[str, ModelStats]) -> Path:
    """A crash never leaves half a stats file."""
    payload = {"models": {label: asdict(s) for label, s in stats.items()}}
    return atomic_write(path, json.dumps(payload, indent=1))


def load_stats(path: str | Path) -> dict[str, ModelStats]:
    path = Path(path)
    if not path.is_file():
        raise RewardStatsError(f"reward stats file {path} does not exist; run `pararl reward-stats CONFIG` first")
    try:
        models = json.loads(path.read_text())["models"]
        return {label: ModelStats(**fields) for label, fields in models.items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RewardStatsError(f"reward stats file {path} is unreadable: {err}") from err


def stats_for(stats: dict[str, ModelStats], label: str, identity: str, path: str | Path) -> ModelStats:
    """The entry for this reward model, refusing one measured with a different model."""
    entry = stats.get(label)
    if entry is None:
        raise RewardStatsError(f"reward stats file {path} has no entry for reward model {label!r}; rerun `pararl reward-stats`")
    if entry.identity != identity:
        raise RewardStatsError(
            f"reward stats file {path} was computed with reward model {entry.identity!r}, but {label!r} is "
            f"{identity!r}; rerun `pararl reward-stats` for this model"
        )
    return entry


def check_stats_identities(cfg: Any) -> None:
    """Before Ray starts: the stats file (``reward.stats_file``) exists, reads, and was measured with
    the very reward models the config names, for every model whose identity is known without building it."""
    table = load_stats(cfg.stats_file)
    for label, m in cfg.models.items():
        if m.standardize:
            identity = static_identity(m.name, dict(m.kwargs))
            if identity is not None:
                stats_for(table, label, identity, cfg.stats_file)
