"""``pararl sample``: one output from a model folder, written where a user can look at it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pararl.bundle import load_bundle
from pararl.config import SampleCommandConfig, build_config
from pararl.snapshots import snapshot_grid, to_pil
from pararl.types import GenerationRequest
from rollout.sampler import ParallelSampler


def read_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """A PNG as [1, 3, H, W] in [0, 1]; a size other than the tokenizer's is refused, not resized."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image {path} does not exist")
    img = Image.open(path).convert("RGB")
    if (img.height, img.width) != tuple(size):
        raise ValueError(f"input image {path} is {img.width}x{img.height}; the image tokenizer needs {size[1]}x{size[0]}")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def sample_to_folder(
    model: str | Path,
    prompt: str,
    out: str | Path,
    image: str | Path | None = None,
    seed: int = 0,
    snapshots: int = 6,
    overrides: Sequence[str] = (),
) -> dict[str, Path]:
    cfg = build_config(SampleCommandConfig, overrides=[f"sampler.{o}" for o in overrides]).sampler
    bundle = load_bundle(model)
    prompt_ids = bundle.encode_text(prompt) if prompt.strip() else []
    codes = None
    if image is not None:
        codes = bundle.image_tokenizer.encode(read_image(image, bundle.image_tokenizer.image_size))[0]
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
