"""``pararl reward-stats CONFIG``: measure each standardising reward model on the training data.

The pairs are ``reward.stats_texts`` ("partial" by default) drawn with the run's seed: on a default
run's config this gives the statistics its preparation measured.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cluster.run_config import load_run_config
from pararl.bundle import load_codecs
from pararl.config import require
from pararl.data import CodeCache, check_images, read_records
from pararl.errors import ConfigError
from reward.base import build_reward_model
from reward.stats import ModelStats, compute_stats, reference_batches, save_stats


def reward_stats(config: str | Path, overrides: Sequence[str] = (), batch: int = 32) -> Path:
    cfg = load_run_config(config, overrides)
    codecs = load_codecs(require(cfg.model, "model"), cfg.model_format.named())
    records = read_records(require(cfg.data.train, "data.train"))
    check_images(records, codecs.image_tokenizer.image_size, cfg.data.train)
    cache = CodeCache(cfg.data.cache_dir, codecs.image_tokenizer)
    total = sum(1 for r in records if r.output_image and r.output_text)
    stats: dict[str, ModelStats] = {}
    for label, spec in cfg.reward.models.items():
        if not spec.standardize:
            continue
        model = build_reward_model(spec.name, dict(spec.kwargs))
        pairs = reference_batches(records, cache, batch, cfg.reward.stats_texts, cfg.seed)
        stats[label] = compute_stats(model, pairs, total=total, desc=f"reward stats: {label}")
        s = stats[label]
        print(f"{label}: {s.identity}  mean {s.mean:.4f}  Z {s.std:.4f}  over {s.count} pairs")
    if not stats:
        raise ConfigError("no reward model standardises: there are no statistics to compute")
    path = save_stats(cfg.reward.stats_file, stats)
    print(f"saved {path}")
    return path
