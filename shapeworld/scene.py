"""Scenes of the generated world: coloured shapes in a grid of cells, as palette tokens and as text.

An image is a grid of cells, each cell k x k palette tokens (k = 2 or 3), so a shape is a token pattern and a
colour is a palette code. Because the codec is exact, an image's codes parse back into the objects
it shows, and a reasoning text parses into the objects it names: whether the two agree is a yes/no
fact here, which no real image/text pair allows. That is the exact alignment check the default run
reports next to the CLIP reward.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from pararl.errors import ConfigError
from pararl.image_tokenizers import PaletteCodec
from pararl.image_tokenizers.palette import NAMED_COLOURS

# Shapes as token patterns, per cell size (tokens per side of a cell).
SHAPES: dict[int, dict[str, tuple[str, ...]]] = {
    2: {"square": ("##", "##"), "triangle": ("#.", "##"), "bar": ("##", ".."), "diagonal": ("#.", ".#")},
    3: {"square": ("###", "###", "###"), "plus": (".#.", "###", ".#."), "triangle": ("#..", "##.", "###"),
        "cross": ("#.#", ".#.", "#.#")},
}
ROW_NAMES = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COL_NAMES = {2: ("left", "right"), 3: ("left", "centre", "right")}
EOS = "<eos>"  # pads the reasoning text to its fixed length; a tokenizer special, so decoding drops it
JOIN = "and"


@dataclass(frozen=True, order=True)
class Obj:
    """One object of a scene; ordering is reading order (row, then column)."""

    row: int
    col: int
    colour: str
    shape: str

    @property
    def pos(self) -> tuple[int, int]:
        return (self.row, self.col)


Scene = tuple[Obj, ...]  # sorted, at most one object per cell


def make_scene(objects: Iterable[Obj]) -> Scene:
    scene = tuple(sorted(objects))
    if len({o.pos for o in scene}) != len(scene):
        raise ValueError(f"two objects share a cell: {scene}")
    return scene


def scene_key(scene: Scene) -> str:
    return ";".join(f"{o.row}{o.col}{o.colour}{o.shape}" for o in scene) or "empty"


@dataclass(frozen=True)
class ImageParse:
    objects: Scene  # cells that hold a known shape in one colour
    garbled: tuple[tuple[int, int], ...]  # cells that hold something else (no shape, mixed colours)


@dataclass(frozen=True)
class TextParse:
    objects: tuple[Obj, ...]  # every (colour shape row col) phrase found, in text order
    exact: bool  # the whole text is such phrases joined by "and", nothing else


@dataclass(frozen=True)
class WorldSpec:
    """Geometry and vocabulary of a world; everything that parses or renders it follows from this."""

    cells: tuple[int, int] = (2, 2)
    cell: int = 2  # tokens per side of a cell (2 or 3)
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("square", "triangle", "bar")
    background: str = "black"
    patch: int = 4  # pixels per token side
    codebook_size: int = 8  # palette codes (the first named colours)
    max_objects: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells", tuple(self.cells))
        object.__setattr__(self, "colours", tuple(self.colours))
        object.__setattr__(self, "shapes", tuple(self.shapes))
        names = list(NAMED_COLOURS)[: self.codebook_size]
        bad = [c for c in (*self.colours, self.background) if c not in names]
        if bad:
            raise ConfigError(f"colours {bad} are not among the codec's first {self.codebook_size} named colours {names}")
        if self.background in self.colours:
            raise ConfigError(f"the background {self.background!r} cannot also be an object colour")
        if self.cell not in SHAPES:
            raise ConfigError(f"cell {self.cell}: shapes exist for cells of {sorted(SHAPES)} tokens")
        unknown = [s for s in self.shapes if s not in SHAPES[self.cell]]
        if unknown:
            raise ConfigError(f"unknown shapes {unknown} for cells of {self.cell} tokens; known: {', '.join(SHAPES[self.cell])}")
        if self.cells[0] not in ROW_NAMES or self.cells[1] not in COL_NAMES:
            raise ConfigError(f"cells {self.cells}: rows and columns must each be 2 or 3")
        if not 1 <= self.max_objects <= self.cells[0] * self.cells[1]:
            raise ConfigError(f"max_objects {self.max_objects} must lie in [1, {self.cells[0] * self.cells[1]}]")

    # ----- geometry and names ------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return (self.cells[0] * self.cell, self.cells[1] * self.cell)

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def positions(self) -> list[tuple[int, int]]:
        return [(r, c) for r in range(self.cells[0]) for c in range(self.cells[1])]

    def code(self, colour: str) -> int:
        return list(NAMED_COLOURS).index(colour)

    def colour_of(self, code: int) -> str:
        return list(NAMED_COLOURS)[code]

    def position_words(self, pos: tuple[int, int]) -> list[str]:
        return [ROW_NAMES[self.cells[0]][pos[0]], COL_NAMES[self.cells[1]][pos[1]]]

    @property
    def text_len(self) -> int:
        """Text positions of the longest description: 4 words per object, "and" between objects."""
        return 5 * self.max_objects - 1

    def codec(self) -> PaletteCodec:
        return PaletteCodec(grid=self.grid, patch=self.patch, codebook_size=self.codebook_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, fields: dict) -> "WorldSpec":
        return cls(**fields)

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "WorldSpec":
        from pathlib import Path

        return cls.from_dict(json.loads(Path(path).read_text()))

    # ----- image <-> scene ---------------------------------------------------------------------
    def render(self, scene: Scene) -> torch.Tensor:
        """The scene's codes [N], row-major over the token grid."""
        h, w = self.grid
        grid = torch.full((h, w), self.code(self.background), dtype=torch.long)
        for o in scene:
            pattern = torch.tensor([[ch == "#" for ch in row] for row in SHAPES[self.cell][o.shape]])
            k = self.cell
            cell = grid[o.row * k : (o.row + 1) * k, o.col * k : (o.col + 1) * k]
            cell[pattern] = self.code(o.colour)
        return grid.flatten()

    def parse_image(self, codes: torch.Tensor | Sequence[int]) -> ImageParse:
        """Objects that the codes show; a cell that is neither background nor one known shape in one
        object colour is garbled (a half-drawn or mixed cell never counts as an object)."""
        h, w = self.grid
        grid = torch.as_tensor(codes).reshape(h, w).tolist()
        bg = self.code(self.background)
        known = {name: SHAPES[self.cell][name] for name in self.shapes}
        k = self.cell
        objects, garbled = [], []
        for r, c in self.positions:
            cell = [row[c * k : (c + 1) * k] for row in grid[r * k : (r + 1) * k]]
            pattern = tuple("".join("." if v == bg else "#" for v in row) for row in cell)
            colours = {v for row in cell for v in row if v != bg}
            if not colours:
                continue
            shape = next((name for name, p in known.items() if p == pattern), None)
            colour = self.colour_of(colours.pop()) if len(colours) == 1 else None
            if shape is None or colour not in self.colours:
                garbled.append((r, c))
            else:
                objects.append(Obj(r, c, colour, shape))
        return ImageParse(tuple(objects), tuple(garbled))

    # ----- text <-> scene ----------------------------------------------------------------------
    def describe(self, scene: Scene) -> str:
        """The reasoning text of a scene: its objects in reading order."""
        if not scene:
            raise ValueError("an empty scene has no description: every output shows an object")
        return f" {JOIN} ".join(" ".join([o.colour, o.shape, *self.position_words(o.pos)]) for o in scene)

    def parse_text(self, text: str) -> TextParse:
        words = [w for w in text.split() if w != EOS]
        rows, cols = ROW_NAMES[self.cells[0]], COL_NAMES[self.cells[1]]
        found, used, i = [], [False] * len(words), 0
        while i + 4 <= len(words):
            c, s, r, k = words[i : i + 4]
            if c in self.colours and s in self.shapes and r in rows and k in cols:
                found.append(Obj(rows.index(r), cols.index(k), c, s))
                used[i : i + 4] = [True] * 4
                i += 4
            else:
                i += 1
        # Exact: phrases separated by single "and"s and nothing else.
        exact = bool(found) and len(words) == 5 * len(found) - 1 and all(
            used[j] if j % 5 != 4 else words[j] == JOIN for j in range(len(words))
        )
        return TextParse(tuple(found), exact)

    # ----- agreement ---------------------------------------------------------------------------
    def aligned(self, text: str, codes: torch.Tensor | Sequence[int]) -> bool:
        """Exact alignment: the text is a well-formed description, the image has no garbled cell, and
        the text names exactly the objects (colour, shape, position) the image shows."""
        tp, ip = self.parse_text(text), self.parse_image(codes)
        if not tp.exact or ip.garbled or not ip.objects:
            return False
        return len(set(tp.objects)) == len(tp.objects) and set(tp.objects) == set(ip.objects)

    def agreement(self, text: str, codes: torch.Tensor | Sequence[int]) -> float:
        """Soft per-object agreement in [0, 1]: over the cells the text names or the image fills,
        1 for the same colour and shape, 1/2 for one of the two, 0 otherwise (a garbled cell or a
        cell named twice matches nothing); 1 only when the two agree exactly on every cell."""
        tp, ip = self.parse_text(text), self.parse_image(codes)
        named: dict[tuple[int, int], list[Obj]] = {}
        for o in tp.objects:
            named.setdefault(o.pos, []).append(o)
        shown = {o.pos: o for o in ip.objects}
        cells = set(named) | set(shown) | set(ip.garbled)
        if not cells:
            return 0.0
        total = 0.0
        for pos in cells:
            t, i = named.get(pos), shown.get(pos)
            if t and i and len(t) == 1:
                total += ((t[0].colour == i.colour) + (t[0].shape == i.shape)) / 2
        return total / len(cells)

    def words(self, questions: bool = False) -> list[str]:
        """Every word of descriptions and instructions (the text tokenizer's vocabulary); with
        ``questions``, the question tasks' words too (a drawing-only world keeps its vocabulary)."""
        from shapeworld.questions import QUESTION_WORDS
        from shapeworld.tasks import INSTRUCTION_WORDS

        return sorted({*self.colours, *self.shapes, *ROW_NAMES[self.cells[0]], *COL_NAMES[self.cells[1]], JOIN,
                       *INSTRUCTION_WORDS, *(QUESTION_WORDS if questions else ())})


def default_spec() -> WorldSpec:
    return WorldSpec()


__all__ = ["SHAPES", "EOS", "Obj", "Scene", "WorldSpec", "ImageParse", "TextParse", "make_scene", "scene_key",
           "default_spec"]
