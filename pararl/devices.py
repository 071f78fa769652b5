"""Device and dtype names from configs, resolved in one place.

Configs name dtypes two ways (the learner's ``fp32 / bf16 / fp16``, torch's ``float32 / bfloat16``)
and devices as ``auto | cpu | cuda``; every stage turns them into torch objects here, so an unknown
name fails the same way everywhere.
"""
from __future__ import annotations

import torch

from pararl.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                                  "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, key: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r} is not a dtype; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """``auto``: a GPU when this process sees one. ``cuda`` without one is refused now, not at the first copy."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA device is visible to this process")
    return device
