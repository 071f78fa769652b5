"""A deterministic codec in which every code is a flat coloured patch.

It has no weights to train or download, encodes exactly what it decodes, and its colours have
names, which is what lets the generated world check whether a text names the colours an image shows.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from pararl.errors import ConfigError
from pararl.image_tokenizers import ImageTokenizer, register_image_tokenizer

NAMED_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "orange": (1.0, 0.55, 0.0),
    "cyan": (0.1, 0.85, 0.9),
    "pink": (1.0, 0.5, 0.75),
    "brown": (0.5, 0.3, 0.1),
    "grey": (0.5, 0.5, 0.5),
}


def default_palette(size: int) -> torch.Tensor:
    """The named colours first, then colours drawn from a fixed seed: the same palette everywhere."""
    named = torch.tensor(list(NAMED_COLOURS.values()))[:size]
    extra = torch.rand(max(0, size - len(named)), 3, generator=torch.Generator().manual_seed(1234))
    return torch.cat([named, extra])


@register_image_tokenizer("palette")
class PaletteCodec(ImageTokenizer):
    def __init__(
        self,
        grid: Sequence[int] = (4, 4),
        patch: int = 8,
        codebook_size: int = 8,
        palette: Sequence[Sequence[float]] | None = None,
    ) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.patch = int(patch)
        self.palette = default_palette(codebook_size) if palette is None else torch.tensor(palette, dtype=torch.float)
        if self.palette.ndim != 2 or self.palette.shape[1] != 3:
            raise ConfigError("palette must be a list of RGB triples")
        self.codebook_size = len(self.palette)
        self.image_size = (self.grid[0] * self.patch, self.grid[1] * self.patch)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        h, w = self.grid
        colours = self.palette.to(codes.device)[codes]  # [B, N, 3]
        img = colours.view(-1, h, w, 3).permute(0, 3, 1, 2)
        return img.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3).contiguous()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        means = torch.nn.functional.avg_pool2d(images.float(), self.patch)  # [B, 3, h, w]
        flat = means.flatten(2).transpose(1, 2)  # [B, N, 3]
        return torch.cdist(flat, self.palette.to(images.device)[None].expand(len(flat), -1, -1)).argmin(-1)

    def spec(self) -> dict[str, Any]:
        return {"type": "palette", "grid": list(self.grid), "patch": self.patch, "palette": self.palette.tolist()}
