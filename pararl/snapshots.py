"""Pictures of trajectories along the denoising loop: what users look at, in files and in MLflow.

One row per trajectory, one column per snapshot step: the image decoded from x̂0 (what the reward
scores), the image as revealed so far (masked patches hatched grey), and the partial text.
"""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pararl.formats import ParallelFormat
from pararl.image_tokenizers import ImageTokenizer
from pararl.types import Trajectories

CELL = 128
TEXT_LINES = 7


def to_pil(image: torch.Tensor, size: int = CELL) -> Image.Image:
    """[3, H, W] in [0, 1] -> an upscaled PIL image (nearest, so tokens stay crisp)."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def decode_partial(fmt: ParallelFormat, tok: ImageTokenizer, image_ids: torch.Tensor) -> torch.Tensor:
    """Decode image ids with masks; masked patches become a grey checker so they read as 'not yet'."""
    codes = fmt.span_codes(image_ids)
    masked = codes < 0
    images = tok.decode(codes.clamp(min=0))
    rows, cols = tok.grid
    ph, pw = images.shape[2] // rows, images.shape[3] // cols
    cover = masked.view(-1, 1, rows, cols).repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    yy, xx = torch.meshgrid(torch.arange(images.shape[2]), torch.arange(images.shape[3]), indexing="ij")
    checker = (((yy // max(1, ph // 2)) + (xx // max(1, pw // 2))) % 2 * 0.25 + 0.5).to(images)
    return torch.where(cover, checker.expand_as(images), images)


def snapshot_grid(
    traj: Trajectories,
    fmt: ParallelFormat,
    image_tokenizer: ImageTokenizer,
    decode_text: Callable[[torch.Tensor], str],
    rows: Sequence[int] = (0,),
    titles: Sequence[str] | None = None,
) -> Image.Image:
    lay = traj.layout
    rimg, rtxt = lay.relative(lay.image), lay.relative(lay.text)
    steps = traj.snapshot_steps.tolist()
    line_h, pad = 12, 6
    cell_h = 2 * CELL + TEXT_LINES * line_h + 3 * pad + line_h
    grid = Image.new("RGB", (len(steps) * (CELL + pad) + pad, len(rows) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    blank = Image.new("RGB", (CELL, CELL), "lightgrey")  # a task family that writes no image (pararl.tasks)
    for r_i, r in enumerate(rows):
        y0 = pad + r_i * (cell_h + pad)
        if lay.image_len:
            x0_imgs = image_tokenizer.decode(fmt.span_codes(traj.snapshot_x0[r, :, rimg]).clamp(min=0))
            shown = decode_partial(fmt, image_tokenizer, traj.snapshot_tokens[r, :, rimg])
        for c, step in enumerate(steps):
            x = pad + c * (CELL + pad)
            label = f"step {step + 1}/{traj.steps}" + (f"  {titles[r_i]}" if titles else "")
            draw.text((x, y0), label[:22], fill="black")
            grid.paste(to_pil(x0_imgs[c]) if lay.image_len else blank, (x, y0 + line_h))
            grid.paste(to_pil(shown[c]) if lay.image_len else blank, (x, y0 + line_h + CELL + pad))
            text = decode_text(traj.snapshot_tokens[r, c, rtxt])
            empty = "(no text yet)" if lay.text_len else "(image only)"
            lines = textwrap.wrap(text, width=21)[:TEXT_LINES] or [empty]
            ty = y0 + line_h + 2 * CELL + 2 * pad
            for i, line in enumerate(lines):
                draw.text((x, ty + i * line_h), line, fill="black")
    return grid
