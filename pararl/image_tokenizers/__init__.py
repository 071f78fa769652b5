"""Image tokenizers: images in [0, 1] to codebook ids and back.

The reward service decodes x̂0 codes into pixels, and datasets encode input images once; both only
see this interface, so a palette codec (tests, the generated world), a diffusers ``VQModel`` (-A) or
MAGVIT-v2 (-M) plug in by a spec ``{"type": name, ...}`` resolved through the registry.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from pararl.registry import Registry


class ImageTokenizer(ABC):
    codebook_size: int
    grid: tuple[int, int]  # token rows, token columns
    image_size: tuple[int, int]  # pixel height, width

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> codes [B, N] (row-major over the token grid)."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, N] -> images [B, 3, H, W] in [0, 1]."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """What ``build_image_tokenizer`` needs to rebuild this tokenizer (saved next to a model)."""

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"images must be [B, 3, {self.image_size[0]}, {self.image_size[1]}], got {list(images.shape)}"
            )

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes must be [B, {self.num_tokens}], got {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")


class ModuleImageTokenizer(ImageTokenizer):
    """An image tokenizer backed by a torch module ``self.model`` (VQModel, MAGVIT-v2)."""

    model: torch.nn.Module

    @property
    def _where(self) -> tuple[torch.device, torch.dtype]:
        """Where the module's weights live: inputs are moved there, outputs come back."""
        p = next(self.model.parameters())
        return p.device, p.dtype


IMAGE_TOKENIZERS: Registry[Callable[..., ImageTokenizer]] = Registry("image tokenizer type")
register_image_tokenizer = IMAGE_TOKENIZERS.register


def build_image_tokenizer(spec: dict[str, Any], device: str | None = None) -> ImageTokenizer:
    """The tokenizer a spec names; ``device`` places one that has weights (a palette has none and takes none)."""
    spec = dict(spec)
    cls = IMAGE_TOKENIZERS.get(spec.pop("type", None))
    if device is not None and "device" in inspect.signature(cls).parameters:
        spec["device"] = device
    return cls(**spec)


from pararl.image_tokenizers.magvit2 import Magvit2Tokenizer  # noqa: E402  (registers itself)
from pararl.image_tokenizers.palette import PaletteCodec  # noqa: E402  (registers itself)
from pararl.image_tokenizers.vqmodel import VQModelTokenizer  # noqa: E402  (registers itself; imports diffusers lazily)

__all__ = ["ImageTokenizer", "ModuleImageTokenizer", "Magvit2Tokenizer", "PaletteCodec", "VQModelTokenizer", "IMAGE_TOKENIZERS",
           "build_image_tokenizer", "register_image_tokenizer"]
