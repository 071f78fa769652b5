"""What ``bench/gpu_check.py`` needs before it measures: the packages a lent machine lacks, the -A
checkpoint it samples and trains, the sampler settings and prompts, and the FLOP count of an update."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
NEEDED = ("omegaconf", "deepspeed", "diffusers", "open_clip", "ray", "mlflow", "peft")
PROMPT = "add a red square in the top left and make the circle blue"


@dataclass(frozen=True)
class Size:
    """A model and a batch: the GPU size, and the toy size of ``--dry-run``."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp: int
    grid: int  # image tokens = grid ** 2 (the -A span adds one newline per row)
    text_len: int
    steps: int
    prompts: int  # B; G = group
    group: int
    repeats: int
    e2e_steps: int


GPU = Size(d_model=2048, n_heads=16, n_layers=10, mlp=5632, grid=32, text_len=256, steps=16, prompts=4, group=4,
           repeats=3, e2e_steps=5)
DRY = Size(d_model=16, n_heads=2, n_layers=1, mlp=32, grid=4, text_len=8, steps=4, prompts=1, group=2, repeats=1,
           e2e_steps=2)
TINY = DRY  # the parity part's model: small enough for the CPU at full vocabulary


def wheel_files(folder: Path) -> list[Path]:
    """The wheels under ``folder``; one that travelled in pieces (``NAME.whl.partNN``) is joined first."""
    pieces: dict[str, list[Path]] = {}
    for f in folder.rglob("*.whl.part*"):
        pieces.setdefault(f.name.rsplit(".part", 1)[0], []).append(f)
    for name, parts in pieces.items():
        with open(folder / name, "wb") as out:
            for part in sorted(parts, key=lambda f: int(f.name.rsplit(".part", 1)[1])):
                out.write(part.read_bytes())
    return sorted({f.name: f for f in folder.rglob("*.whl")}.values(), key=lambda f: f.name)


def ensure_packages() -> list[str]:
    """Install what this Python lacks from the wheelhouse (no index is reachable there); returns what is
    still missing."""
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    folder = Path(os.environ.get("PARARL_WHEELS", WHEELS))
    wheels = wheel_files(folder) if missing and folder.is_dir() else []
    if wheels:
        print(f"installing {len(wheels)} wheels from {folder} (missing: {', '.join(missing)})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index", "--no-deps",
                        "--quiet", *map(str, wheels)], check=False)
        importlib.invalidate_caches()
        missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    return missing


def write_checkpoint(folder: Path, size: Size, seed: int = 0) -> Path:
    """An -A checkpoint in the released on-disk layout (full vocabulary, tokenizer, VQ model) at ``size``."""
    from pararl.testing import a_tokenizer, tiny_llada_fields, tiny_vqmodel, write_policy

    folder.mkdir(parents=True, exist_ok=True)
    fields = tiny_llada_fields(d_model=size.d_model, n_heads=size.n_heads, n_kv_heads=size.n_heads, n_layers=size.n_layers,
                               mlp_hidden_size=size.mlp)
    write_policy(folder, fields, seed, {"architectures": ["LLaDAForMultiModalGeneration"]})
    a_tokenizer().save_pretrained(folder)
    tiny_vqmodel(seed=seed).save_pretrained(folder / "vqvae")
    (folder / "pararl.json").write_text(json.dumps({"format": {"preset": "mmada-parallel-a", "grid": [size.grid] * 2}}))
    return folder


def sampler_config(size: Size, temperature: float = 1.0):
    from rollout.config import SamplerConfig

    return SamplerConfig(preset="mmada-parallel-a", steps=size.steps, text_len=size.text_len, image_start=size.steps // 4,
                         image_steps=size.steps // 2, cfg_prompt=2.5, cfg_image=4.0, text_temperature=temperature,
                         image_temperature=temperature)


def requests(bundle, size: Size) -> list:
    """Editing prompts (an input image, so both guidance rows run) of slightly different lengths."""
    import torch

    from pararl.types import GenerationRequest

    ids = bundle.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    codes = torch.arange(size.grid ** 2) % bundle.fmt.codebook_size
    return [GenerationRequest(ids[: len(ids) - i], codes, seed=i) for i in range(size.prompts)]


def train_flops(config, batch) -> float:
    """Model FLOPs of one forward + backward (3 x the forward) over the batch's replay rows: the body's
    matrix products, attention's two, and the span heads (text columns for text, the codebook for image)."""
    from pararl.models.config import parameter_count

    lay, d = batch.layout, config.d_model
    body = parameter_count(config) - d * config.output_size * (1 if config.weight_tying else 2)
    rows, seq = len(batch) * len(batch.plan.steps), batch.tokens.shape[1]
    text, image = (lay.text.stop - lay.text.start), (lay.image.stop - lay.image.start)
    head = 2 * d * (text * config.vocab_size + image * 8192)
    forward = rows * (2 * body * seq + 4 * config.n_layers * seq * seq * d + head)
    return 3.0 * forward
