"""Counter-based randomness: a trajectory's noise depends only on its seed, the step and the position.

Drawing from a shared torch generator would make a trajectory depend on what else is in the batch
(and a per-trajectory generator needs a Python loop over samples). Hashing (seed, stream, step,
position) with splitmix64 in vectorised int64 ops gives the same numbers alone or in any batch, on
CPU and GPU alike.
"""
from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15 as int64
_MUL1 = -4658895280553007687  # 0xbf58476d1ce4e5b9
_MUL2 = -7723592293110705685  # 0x94d049bb133111eb

TEXT_SAMPLE, IMAGE_SAMPLE, IMAGE_CONFIDENCE, MEMBER, IMAGE_CONFIDENCE_2, IMAGE_LEFTOVER = 1, 2, 3, 4, 5, 6


def _i64(value: int) -> int:
    """A Python int wrapped to signed 64 bits, so torch accepts it as an int64 scalar."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: every input bit affects every output bit."""
    x = x * 1  # copy; int64 arithmetic wraps
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def derive_seeds(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One independent seed per (request seed, group member)."""
    return mix(mix(seeds.long() + _i64(MEMBER * _GOLDEN)) + index.long() * _GOLDEN)


def uniform(seeds: torch.Tensor, stream: int, step: int, n: int) -> torch.Tensor:
    """[R, n] uniforms in the open interval (0, 1), float32, on the seeds' device."""
    base = mix(seeds.long() + _i64((stream * 1_000_003 + step) * _GOLDEN))  # [R]
    pos = torch.arange(1, n + 1, device=seeds.device, dtype=torch.long) * _GOLDEN
    bits = _shr(mix(base[:, None] + pos[None, :]), 40)  # top 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def gumbel(seeds: torch.Tensor, stream: int, step: int, n: int) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(seeds, stream, step, n)))


GAUSSIAN_PAIR = {IMAGE_CONFIDENCE: IMAGE_CONFIDENCE_2}  # the second uniform stream Box-Muller takes


def gaussian(seeds: torch.Tensor, stream: int, step: int, n: int) -> torch.Tensor:
    """Standard normals by Box-Muller from two counter streams (``stream`` and its ``GAUSSIAN_PAIR``)."""
    u1, u2 = uniform(seeds, stream, step, n), uniform(seeds, GAUSSIAN_PAIR[stream], step, n)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


CONFIDENCE_NOISE = {"gumbel": gumbel, "gaussian": gaussian}
