"""The -A image tokenizer: a diffusers ``VQModel`` (aMUSEd-style VQ-GAN), as Lumina-DiMOO ships it.

The released checkpoint keeps it in its ``vqvae`` subfolder and loads it with
``VQModel.from_pretrained(folder, subfolder="vqvae")``; this class does the same. Decoding maps codes
through the quantizer's codebook to latents and runs the decoder; encoding runs the encoder and
takes the nearest codebook entry. Lumina-DiMOO feeds the VQ images in [0, 1] (no [-1, 1]
normalisation) and clips its output to [0, 1]: ``normalize=True`` serves VQs trained on [-1, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from pararl.devices import resolve_device, resolve_dtype
from pararl.image_tokenizers import ModuleImageTokenizer, register_image_tokenizer


@register_image_tokenizer("vqmodel")
class VQModelTokenizer(ModuleImageTokenizer):
    def __init__(
        self,
        path: str,
        subfolder: str | None = "vqvae",
        grid: Sequence[int] = (32, 32),
        normalize: bool = False,
        device: str = "auto",
        dtype: str = "float32",
    ) -> None:
        from diffusers import VQModel

        folder = Path(path) / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no VQModel (no config.json)")
        self.path, self.subfolder, self.normalize, self.device_name, self.dtype_name = str(path), subfolder, normalize, device, dtype
        self.model = VQModel.from_pretrained(str(path), subfolder=subfolder or None, torch_dtype=resolve_dtype(dtype))
        self.model.to(resolve_device(device)).eval().requires_grad_(False)
        self._sized(grid)

    @classmethod
    def around(cls, model: Any, grid: Sequence[int] = (32, 32), normalize: bool = False) -> "VQModelTokenizer":
        """A tokenizer around a VQModel built elsewhere (``pararl plan``: built from its config on fake tensors)."""
        self = cls.__new__(cls)
        self.path, self.subfolder, self.normalize, self.device_name, self.dtype_name = "", None, normalize, "", ""
        self.model = model
        self._sized(grid)
        return self

    def _sized(self, grid: Sequence[int]) -> None:
        cfg = self.model.config
        self.scale = 2 ** (len(cfg.block_out_channels) - 1)
        self.embed_dim = cfg.vq_embed_dim or cfg.latent_channels
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = (self.grid[0] * self.scale, self.grid[1] * self.scale)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        device, _ = self._where
        b, (h, w) = codes.shape[0], self.grid
        shape = (b, h, w, self.embed_dim)
        idx = codes.to(device).long()
        if self.model.config.lookup_from_codebook:  # the model's own decode looks the codes up
            images = self.model.decode(idx.view(b, h, w), force_not_quantize=True, shape=shape).sample
        else:
            latents = self.model.quantize.get_codebook_entry(idx.reshape(-1), shape)  # [B, C, h, w]
            images = self.model.decode(latents, force_not_quantize=True).sample
        if self.normalize:
            images = (images + 1) / 2
        return images.float().clamp(0, 1).to(codes.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        device, dtype = self._where
        x = images.to(device, dtype)
        if self.normalize:
            x = x * 2 - 1
        latents = self.model.encode(x).latents
        _, _, (_, _, idx) = self.model.quantize(latents)
        return idx.view(images.shape[0], -1).to(images.device)

    def spec(self) -> dict[str, Any]:
        return {"type": "vqmodel", "path": self.path, "subfolder": self.subfolder, "grid": list(self.grid),
                "normalize": self.normalize, "device": self.device_name, "dtype": self.dtype_name}
