"""``pararl sample``: one output from a model folder, written where a user can look at it.

The sampler starts from the settings the model was trained with when its folder keeps them
(``sampler.json``: a policy trained on 16 image tokens and 8 steps is sampled that way, not with the
sampler's defaults for a released model); the command's ``key=value`` overrides come last.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pararl.bundle import load_bundle
from pararl.config import build_config
from pararl.data import load_image
from pararl.files import atomic_write
from pararl.snapshots import snapshot_grid, to_pil
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler

SAMPLER_FILE = "sampler.json"  # in a model folder: the sampler settings it was trained with


@dataclass
class SampleCommandConfig:
    """What ``pararl sample`` reads besides its flags (only the sampler, for now)."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def save_sampler_settings(folder: str | Path, cfg: SamplerConfig) -> Path:
    """Keep the sampler settings a policy was trained with beside it, for ``pararl sample`` to start from."""
    from omegaconf import OmegaConf

    return atomic_write(Path(folder) / SAMPLER_FILE, json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)), indent=1))


def trained_sampler(folder: str | Path) -> dict:
    """The model folder's sampler settings (``SAMPLER_FILE``), or none: the sampler's defaults."""
    path = Path(folder) / SAMPLER_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def sample_to_folder(
    model: str | Path,
    prompt: str,
    out: str | Path,
    image: str | Path | None = None,
    seed: int = 0,
    snapshots: int = 6,
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    cfg = build_config(SampleCommandConfig, [{"sampler": trained_sampler(model)}], [f"sampler.{o}" for o in overrides]).sampler
    bundle = load_bundle(model)
    prompt_ids = bundle.encode_text(prompt) if prompt.strip() else []
    codes = None
    if image is not None:
        codes = bundle.image_tokenizer.encode(load_image(image, bundle.image_tokenizer.image_size)[None])[0]
    sampler = ParallelSampler(bundle.policy, bundle.fmt, cfg)
    steps = sorted({round(x) for x in np.linspace(0, cfg.steps - 1, max(1, min(snapshots, cfg.steps)))})
    traj = sampler.sample([GenerationRequest(prompt_ids, codes, seed)], snapshot_steps=steps, progress=True)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"image": out / "image.png", "text": out / "text.txt", "snapshots": out / "snapshots.png"}
    final = bundle.decode_images(traj.image_tokens)
    to_pil(final[0], size=max(256, final.shape[-1])).save(files["image"])
    files["text"].write_text(bundle.decode_text(traj.text_tokens[0]) + "\n")
    snapshot_grid(traj, bundle.fmt, bundle.image_tokenizer, bundle.decode_text).save(files["snapshots"])
    for name, path in files.items():
        print(f"{name}: {path}")
    return files
