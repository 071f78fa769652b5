"""Which token format and image tokenizer a model folder holds: recorded, named, or read off its files.

A released MMaDA-Parallel checkpoint says nothing about its token layout in a form a generic loader
understands, so the answer comes, in this order, from:

1. ``pararl.json`` with a full format (what ``Codecs.save`` writes): taken as is;
2. a named preset, passed by the caller or in ``pararl.json`` as ``"format": "mmada-parallel-a"`` or
   ``{"preset": "mmada-parallel-a", "grid": [32, 32]}``;
3. the files: ``config.json`` model_type ``mmada`` (or MMaDA's ``llm_vocab_size``/``num_vq_tokens``
   fields) is -M, its vocabulary fields giving the layout; model_type ``llada`` with a ``vqvae/``
   folder (or the LLaDAForMultiModalGeneration class) is -A.

The image tokenizer comes from ``pararl.json`` (``"image_tokenizer": {...}``, a relative ``path`` is
taken from the model folder) or from where the release keeps it: -A in ``vqvae/`` (a diffusers
VQModel); -M ships none, so ``magvitv2/`` inside the folder (the MAGVIT-v2 weights) or ``pararl.json``
must say where it is. Every decision is recorded in ``Detection.how`` for ``pararl doctor``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pararl.bundle import BUNDLE_FILE
from pararl.formats import FormatBase, format_from_dict, mmada_a_format, mmada_m_format
from pararl.models import CheckpointError

PRESETS = ("mmada-parallel-a", "mmada-parallel-m")
A_VQ_FOLDER = "vqvae"
M_VQ_FOLDER = "magvitv2"


@dataclass
class Detection:
    fmt: FormatBase
    image_tokenizer: dict[str, Any]  # spec for build_image_tokenizer, paths absolute
    preset: str | None = None  # the released layout it follows (None: a full format from pararl.json)
    how: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def guess_preset(folder: Path, config: dict[str, Any]) -> tuple[str, str]:
    """(preset, why) from config.json and the folder's contents."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "mmada":
        return "mmada-parallel-m", "config.json model_type 'mmada'"
    if model_type == "llada" and {"llm_vocab_size", "num_vq_tokens"} <= set(config):
        return "mmada-parallel-m", "config.json fields llm_vocab_size and num_vq_tokens (MMaDA's)"
    if model_type == "llada":
        if (folder / A_VQ_FOLDER).is_dir():
            return "mmada-parallel-a", f"config.json model_type 'llada' and a {A_VQ_FOLDER}/ folder"
        if "LLaDAForMultiModalGeneration" in architectures:
            return "mmada-parallel-a", "config.json architecture LLaDAForMultiModalGeneration"
        raise CheckpointError(
            f"{folder}: a LLaDA checkpoint without {A_VQ_FOLDER}/ and without {BUNDLE_FILE}: its image tokens are "
            f"unknown (a text-only LLaDA?); name the format in {BUNDLE_FILE}, e.g. {{\"format\": \"mmada-parallel-a\"}}"
        )
    raise CheckpointError(f"{folder}: config.json model_type {model_type!r} is not one of llada, mmada")


def preset_format(preset: str, config: dict[str, Any], tokenizer: Any, options: dict[str, Any]) -> tuple[FormatBase, str]:
    """The format of a released layout, sized by the checkpoint's own config fields (and ``options``)."""
    options = dict(options)
    if preset == "mmada-parallel-a":
        grid = options.pop("grid", (32, 32))
        vocab = int(options.pop("text_vocab_size", config.get("text_vocab_size", 126356)))
        codebook = int(options.pop("codebook_size", config.get("codebook_size", 8192)))
        text_vocab = str(options.pop("text_vocab", "text"))
        _no_more(options, preset)
        fmt = mmada_a_format(tokenizer, grid=grid, text_vocab_size=vocab, codebook_size=codebook, text_vocab=text_vocab)
        return fmt, f"-A format: image id = {vocab} + code, {fmt.grid[0]}x{fmt.grid[1]} codes with a newline per row"
    if preset == "mmada-parallel-m":
        llm = int(config.get("llm_vocab_size", 126464))
        new = int(config.get("num_new_special_tokens", 0))
        codebook = int(options.pop("codebook_size", config.get("codebook_size", 8192)))
        tokens = int(options.pop("image_tokens", config.get("num_vq_tokens", 1024)))
        text_vocab = str(options.pop("text_vocab", "text"))
        _no_more(options, preset)
        offset = llm + new  # MMaDA: image token id = len(text tokenizer) + code
        if len(tokenizer) != offset:
            raise CheckpointError(
                f"-M checkpoint: llm_vocab_size {llm} + num_new_special_tokens {new} = {offset}, but its tokenizer "
                f"has {len(tokenizer)} tokens (image ids start at len(tokenizer))"
            )
        total = config.get("new_vocab_size")
        if total is not None and int(total) < offset + codebook:
            raise CheckpointError(f"-M checkpoint: new_vocab_size {total} < {offset} + codebook {codebook}")
        fmt = mmada_m_format(text_vocab_size=offset, codebook_size=codebook, image_tokens=tokens, text_vocab=text_vocab,
                             tokenizer=tokenizer)
        return fmt, f"-M format: image id = {offset} + code, {tokens} codes per image"
    raise CheckpointError(f"unknown format preset {preset!r}; known: {', '.join(PRESETS)}")


def _no_more(options: dict[str, Any], preset: str) -> None:
    if options:
        raise CheckpointError(f"format preset {preset!r} takes no option(s) {', '.join(sorted(options))}")


def format_grid(fmt: FormatBase) -> list[int] | None:
    """Token rows and columns of the format's images: its own grid, or the square its token count makes."""
    if hasattr(fmt, "grid"):
        return [int(g) for g in fmt.grid]
    side = math.isqrt(fmt.image_tokens)
    return [side, side] if side * side == fmt.image_tokens else None


GRIDDED = ("vqmodel", "magvit2")  # image tokenizers whose grid is a free choice (fully convolutional)


def preset_image_tokenizer(folder: Path, preset: str | None, fmt: FormatBase) -> tuple[dict[str, Any], str]:
    grid = format_grid(fmt)
    if preset == "mmada-parallel-a":
        if not (folder / A_VQ_FOLDER / "config.json").is_file():
            raise CheckpointError(f"{folder}: an -A checkpoint keeps its image tokenizer in {A_VQ_FOLDER}/ "
                                  f"(a diffusers VQModel), which is missing")
        return {"type": "vqmodel", "path": str(folder), "subfolder": A_VQ_FOLDER, "grid": grid}, f"VQModel in {A_VQ_FOLDER}/"
    if preset == "mmada-parallel-m":
        if not (folder / M_VQ_FOLDER).is_dir():
            raise CheckpointError(
                f"{folder}: -M checkpoints do not ship their image tokenizer: put the MAGVIT-v2 weights "
                f"(showlab/magvitv2) in {folder / M_VQ_FOLDER} or name them in {BUNDLE_FILE}: "
                f"{{\"image_tokenizer\": {{\"type\": \"magvit2\", \"path\": \"/path/to/magvitv2\"}}}}"
            )
        return {"type": "magvit2", "path": str(folder / M_VQ_FOLDER), "grid": grid}, f"MAGVIT-v2 in {M_VQ_FOLDER}/"
    raise CheckpointError(f"{folder}: {BUNDLE_FILE} records a format but no image_tokenizer")


def absolute_paths(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    spec = dict(spec)
    if isinstance(spec.get("path"), str) and not Path(spec["path"]).is_absolute():
        spec["path"] = str(folder / spec["path"])
    return spec


def detect(path: str | Path, tokenizer: Any, preset: str | None = None, options: dict[str, Any] | None = None,
           image_tokenizer: dict[str, Any] | None = None) -> Detection:
    """The folder's format and image-tokenizer spec; ``preset``/``options``/``image_tokenizer`` override
    what ``pararl.json`` and the files say (a format named in a run config)."""
    folder = Path(path)
    meta = read_json(folder / BUNDLE_FILE) if (folder / BUNDLE_FILE).is_file() else {}
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    how: list[str] = []
    recorded = meta.get("format")
    opts = dict(options or {})
    if preset is not None:
        how.append(f"format preset {preset!r} named by the caller")
    elif isinstance(recorded, str):
        preset = recorded
        how.append(f"format preset {preset!r} named in {BUNDLE_FILE}")
    elif isinstance(recorded, dict) and "preset" in recorded:
        preset = recorded["preset"]
        opts = {k: v for k, v in recorded.items() if k != "preset"} | opts
        how.append(f"format preset {preset!r} named in {BUNDLE_FILE} with {sorted(opts) or 'no options'}")
    elif isinstance(recorded, dict):
        how.append(f"full token format recorded in {BUNDLE_FILE}")
    else:
        if not config:
            raise CheckpointError(f"{folder} has neither config.json nor {BUNDLE_FILE}: not a model folder")
        preset, why = guess_preset(folder, config)
        how.append(f"format {preset!r} detected from {why}")
    if preset is None:
        try:
            fmt = format_from_dict(recorded)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{folder / BUNDLE_FILE}: bad format: {err}") from err
    else:
        fmt, what = preset_format(preset, config, tokenizer, opts)
        how.append(what)
    if image_tokenizer is not None:
        spec = image_tokenizer
        how.append(f"image tokenizer {spec.get('type')!r} named by the caller")
    elif isinstance(meta.get("image_tokenizer"), dict):
        spec = meta["image_tokenizer"]
        how.append(f"image tokenizer {spec.get('type')!r} named in {BUNDLE_FILE}")
    else:
        spec, where = preset_image_tokenizer(folder, preset, fmt)
        how.append(f"image tokenizer: {where}")
    spec = absolute_paths(spec, folder)
    if spec.get("type") in GRIDDED and "grid" not in spec and format_grid(fmt):
        spec["grid"] = format_grid(fmt)  # the image size follows the format's token grid
    return Detection(fmt, spec, preset, how)
