"""The -M image tokenizer: MAGVIT-v2 with lookup-free quantization (LFQ), as MMaDA and Show-o use it.

Written for this project from the structure of the released weights (``showlab/magvitv2``): a
convolutional VQ-GAN encoder and decoder in the taming-transformers layout (GroupNorm of 32 groups,
swish, ResNet blocks with a 1x1 ``nin_shortcut`` when the width changes, a single-head spatial
attention block in the middle, stride-2 downsampling with right/bottom padding, nearest-neighbour
upsampling followed by a conv), ``quant_conv`` at the end of the encoder and ``post_quant_conv`` at the
start of the decoder, and an LFQ with 13 binary channels: code ``c`` is the latent whose channel ``k``
is +1 where bit ``12 - k`` of ``c`` is set and -1 elsewhere (8192 codes, no codebook weights).
Module names follow the released state dict (``encoder.down.0.block.0.norm1.weight``,
``decoder.up.4.block.2.conv2.bias``, ``quantize.embedding``, ...), so its weights load strictly.

Images are [-1, 1] inside the model; this tokenizer takes and returns [0, 1]. Downsampling is 16 with
the released widths: a 512x512 image is 32x32 codes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pararl.devices import resolve_device, resolve_dtype
from pararl.errors import CheckpointError
from pararl.image_tokenizers import ModuleImageTokenizer, register_image_tokenizer

WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.bin")


@dataclass
class MagvitConfig:
    """The released architecture by default (its config.json records no architecture fields)."""

    ch: int = 128
    encoder_ch_mult: Sequence[int] = (1, 2, 2, 4, 4)
    encoder_res_blocks: Sequence[int] = (4, 3, 4, 3, 4)
    decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    decoder_res_blocks: Sequence[int] = (4, 4, 3, 4, 3)
    attn_resolutions: Sequence[int] = (5,)  # feature sizes (at ``resolution``) with attention: none in the release
    resolution: int = 256
    codebook_bits: int = 13  # LFQ channels: 2**13 = 8192 codes
    in_channels: int = 3
    norm_groups: int = 32
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_file(cls, path: Path) -> "MagvitConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        raw = json.loads(path.read_text()) if path.is_file() else {}
        return cls(**{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class SpatialAttention(nn.Module):
    """One head over the h*w positions, 1x1 convs for q, k, v and the output projection, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # [B, 1, hw, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: ResNet blocks, attention after each block where the size calls for it, then a resampler."""

    def __init__(self, cin: int, cout: int, blocks: int, attend: bool, groups: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks))
        self.attn = nn.ModuleList(SpatialAttention(cout, groups) for _ in range(blocks if attend else 0))

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.attn_1 = SpatialAttention(channels, groups)
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: MagvitConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.ch, list(cfg.encoder_ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        size, cin = cfg.resolution, ch
        for i, m in enumerate(mult):
            level = Level(cin, ch * m, cfg.encoder_res_blocks[i], size in cfg.attn_resolutions, g)
            if i != len(mult) - 1:
                level.downsample = Downsample(ch * m)
                size //= 2
            self.down.append(level)
            cin = ch * m
        self.mid = Middle(cin, g)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.codebook_bits, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.codebook_bits, cfg.codebook_bits, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, cfg: MagvitConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.ch, list(cfg.decoder_ch_mult), cfg.norm_groups
        top = ch * mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.codebook_bits, cfg.codebook_bits, 1)
        self.conv_in = nn.Conv2d(cfg.codebook_bits, top, 3, padding=1)
        self.mid = Middle(top, g)
        levels: list[Level] = [None] * len(mult)  # type: ignore[list-item]
        size, cin = cfg.resolution // 2 ** (len(mult) - 1), top
        for i in reversed(range(len(mult))):  # built from the coarsest level, indexed by level
            level = Level(cin, ch * mult[i], cfg.decoder_res_blocks[i], size in cfg.attn_resolutions, g)
            if i != 0:
                level.upsample = Upsample(ch * mult[i])
                size *= 2
            levels[i] = level
            cin = ch * mult[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """Sign quantization of ``bits`` channels; the code is the binary number they spell, channel 0 first."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        weights = 2 ** torch.arange(bits - 1, -1, -1)
        codes = torch.arange(2**bits)
        self.register_buffer("embedding", ((codes[:, None] // weights) % 2).float() * 2 - 1)  # [2**bits, bits]
        self.register_buffer("power_vals", weights)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] latents -> [B, h*w] codes (row-major)."""
        return ((z > 0).long() * self.power_vals[None, :, None, None]).sum(1).flatten(1)

    def latents(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, h*w] codes -> [B, bits, h, w] latents of +-1."""
        return self.embedding[codes].view(codes.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()


class MagvitV2(nn.Module):
    def __init__(self, cfg: MagvitConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = LookupFreeQuantizer(cfg.codebook_bits)


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no MAGVIT-v2 weights (looked for {', '.join(WEIGHT_NAMES)})")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def load_magvit2(folder: str | Path) -> MagvitV2:
    """The model in ``folder`` (config.json, weights), loaded strictly: every tensor present and the right shape.

    The LFQ buffers are a function of the bit count; a checkpoint that lacks them is accepted, one
    that has them must hold exactly those values."""
    folder = Path(folder)
    cfg = MagvitConfig.from_file(folder / "config.json")
    model = MagvitV2(cfg)
    state = read_weights(weights_file(folder))
    expected = model.state_dict()
    computed = {k: v for k, v in expected.items() if k.startswith("quantize.")}
    for key, value in computed.items():
        if key in state and not torch.equal(state[key].to(value.dtype), value):
            raise CheckpointError(f"{folder}: {key} differs from the {cfg.codebook_bits}-bit LFQ it should hold")
        state.setdefault(key, value)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{folder}: MAGVIT-v2 weights do not match the architecture: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@register_image_tokenizer("magvit2")
class Magvit2Tokenizer(ModuleImageTokenizer):
    def __init__(self, path: str, grid: Sequence[int] = (32, 32), device: str = "auto", dtype: str = "float32") -> None:
        self.path, self.device_name, self.dtype_name = str(path), device, dtype
        self.model = load_magvit2(path)
        self.model.to(resolve_device(device), resolve_dtype(dtype))
        self._sized(grid)

    @classmethod
    def around(cls, model: MagvitV2, grid: Sequence[int] = (32, 32)) -> "Magvit2Tokenizer":
        """A tokenizer around a model built elsewhere (``pararl plan``: the released architecture on fake tensors)."""
        self = cls.__new__(cls)
        self.path, self.device_name, self.dtype_name, self.model = "", "", "", model
        self._sized(grid)
        return self

    def _sized(self, grid: Sequence[int]) -> None:
        self.codebook_size = 2**self.model.config.codebook_bits
        self.grid = (int(grid[0]), int(grid[1]))
        scale = self.model.config.downsampling
        self.image_size = (self.grid[0] * scale, self.grid[1] * scale)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        device, dtype = self._where
        z = self.model.quantize.latents(codes.to(device).long(), self.grid).to(dtype)
        return ((self.model.decoder(z).float() + 1) / 2).clamp(0, 1).to(codes.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        device, dtype = self._where
        z = self.model.encoder(images.to(device, dtype) * 2 - 1)
        return self.model.quantize.codes(z).to(images.device)

    def spec(self) -> dict[str, Any]:
        return {"type": "magvit2", "path": self.path, "grid": list(self.grid), "device": self.device_name, "dtype": self.dtype_name}


def save_magvit2(model: MagvitV2, folder: str | Path) -> Path:
    """config.json (architecture fields) and model.safetensors, as ``load_magvit2`` reads them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_json(), indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder
