"""Generation prompts and editing instructions of the world, drawn at random and parsed back.

Prompts name only some attributes on purpose ("draw a red shape at any place", "add a coloured
square at top left", "move top left shape to any place"): the rest are the model's free choice,
and the reasoning text must make the same choice as the image. That is the part a parallel
text+image sampler gets wrong when text and image commit independently, and what ParaRL's alignment
reward teaches. Every prompt parses back into what it asks, so ``follows`` can say whether an output
obeys it (a guard that alignment is not bought by ignoring the prompt).

Prompts have fixed slots: each object phrase is ``a <colour> <shape> at <row> <col>`` (a free
attribute says so: "coloured", "shape", "any place"), and every editing instruction is seven words
naming its object by cell ("paint the top left shape in blue", "move top left shape to any place").
The policy is a RoPE-only transformer (no absolute positions); fixed slots put each prompt word, and
the input image, at a fixed distance from the output, which it learns far faster than free word order.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

from shapeworld.scene import COL_NAMES, ROW_NAMES, Obj, Scene, WorldSpec, make_scene, scene_key

FREE_COLOUR, FREE_SHAPE, FREE_PLACE = "coloured", "shape", ("any", "place")
INSTRUCTION_WORDS = ("draw", "a", "at", FREE_COLOUR, FREE_SHAPE, *FREE_PLACE, "and", "add", "paint", "the", "in", "make",
                     "move", "to", "remove")
EDITS = ("add", "recolour", "reshape", "move", "remove")


@dataclass(frozen=True)
class Partial:
    """An object as a prompt names it: each attribute given or left free (None)."""

    colour: str | None = None
    shape: str | None = None
    pos: tuple[int, int] | None = None

    def admits(self, o: Obj) -> bool:
        return ((self.colour is None or self.colour == o.colour) and (self.shape is None or self.shape == o.shape)
                and (self.pos is None or self.pos == o.pos))


@dataclass(frozen=True)
class Example:
    task: str  # "generate" | "edit", or a question task (shapeworld.questions)
    prompt: str
    input: Scene | None
    output: Scene  # the scene the output image shows (questions: the scene asked about)
    answer: str | None = None  # a question's answer: the output text, and the verifiable reward's reference

    @property
    def key(self) -> str:
        """What makes two requests the same (splits never share a key)."""
        return f"{self.task}|{self.prompt}|{scene_key(self.input) if self.input is not None else '-'}"


# ----- drawing examples -----------------------------------------------------------------------
def random_scene(spec: WorldSpec, rng: random.Random, n: int) -> Scene:
    cells = rng.sample(spec.positions, n)
    return make_scene(Obj(r, c, rng.choice(spec.colours), rng.choice(spec.shapes)) for r, c in cells)


def object_phrase(spec: WorldSpec, p: Partial) -> str:
    """``a <colour> <shape> at <row> <col>``: every attribute has its slot, a free one says so
    ("coloured", "shape", "any place"). Fixed slots keep each word at a fixed distance from the
    output, which a RoPE-only policy (no absolute positions) learns far faster than free word order."""
    where = spec.position_words(p.pos) if p.pos else list(FREE_PLACE)
    return " ".join(["a", p.colour or FREE_COLOUR, p.shape or FREE_SHAPE, "at", *where])


def cell_words(spec: WorldSpec, pos: tuple[int, int]) -> str:
    return " ".join(spec.position_words(pos))


def sample_generation(spec: WorldSpec, rng: random.Random, given: float) -> Example:
    scene = random_scene(spec, rng, rng.randint(1, spec.max_objects))
    partials = [Partial(o.colour if rng.random() < given else None, o.shape if rng.random() < given else None,
                        o.pos if rng.random() < given else None) for o in scene]
    prompt = "draw " + " and ".join(object_phrase(spec, p) for p in partials)
    return Example("generate", prompt, None, scene)


def applicable_edits(spec: WorldSpec) -> list[str]:
    ops = ["recolour", "reshape"]
    if spec.max_objects >= 2:
        ops += ["add", "remove"]
    if len(spec.positions) >= 2:
        ops.append("move")
    return [op for op in EDITS if op in ops]


def sample_edit(spec: WorldSpec, rng: random.Random, given: float) -> Example:
    op = rng.choice(applicable_edits(spec))
    lo, hi = {"add": (1, spec.max_objects - 1), "remove": (2, spec.max_objects)}.get(op, (1, spec.max_objects))
    hi = min(hi, len(spec.positions) - 1) if op == "move" else hi
    scene = random_scene(spec, rng, rng.randint(lo, hi))
    empty = [p for p in spec.positions if p not in {o.pos for o in scene}]
    if op == "add":
        new = Obj(*rng.choice(empty), rng.choice(spec.colours), rng.choice(spec.shapes))
        partial = Partial(new.colour if rng.random() < given else None, new.shape if rng.random() < given else None,
                          new.pos if rng.random() < given else None)
        return Example("edit", "add " + object_phrase(spec, partial), scene, make_scene(scene + (new,)))
    target = rng.choice(scene)
    rest = tuple(o for o in scene if o != target)
    at = cell_words(spec, target.pos)
    if op == "recolour":
        colour = rng.choice([c for c in spec.colours if c != target.colour])
        return Example("edit", f"paint the {at} shape in {colour}", scene, make_scene(rest + (replace(target, colour=colour),)))
    if op == "reshape":
        shape = rng.choice([s for s in spec.shapes if s != target.shape])
        return Example("edit", f"make the {at} shape a {shape}", scene, make_scene(rest + (replace(target, shape=shape),)))
    if op == "move":
        row, col = rng.choice(empty)
        moved = replace(target, row=row, col=col)
        where = cell_words(spec, (row, col)) if rng.random() < given else " ".join(FREE_PLACE)
        return Example("edit", f"move {at} shape to {where}", scene, make_scene(rest + (moved,)))
    return Example("edit", f"remove the shape at the {at}", scene, make_scene(rest))


def sample_example(spec: WorldSpec, rng: random.Random, edit_share: float = 0.5, given: float = 0.5,
                   task_shares: dict[str, float] | None = None) -> Example:
    """``task_shares``: the shares of the question tasks (shapeworld.questions); the rest is drawing and
    editing, split by ``edit_share``. Without them the draws are exactly those of a drawing-only world."""
    if task_shares:
        from shapeworld.questions import sample_question_task

        u, acc = rng.random(), 0.0
        for task, share in sorted(task_shares.items()):
            acc += share
            if u < acc:
                return sample_question_task(spec, rng, task, given)
    if rng.random() < edit_share:
        return sample_edit(spec, rng, given)
    return sample_generation(spec, rng, given)


def mismatched_description(spec: WorldSpec, scene: Scene, rng: random.Random) -> str:
    """The description of ``scene`` with one attribute of one object changed (colour, shape or cell):
    the hard negative a reward must rank below the true description."""
    target = rng.choice(scene)
    rest = tuple(o for o in scene if o != target)
    empty = [p for p in spec.positions if p not in {o.pos for o in scene}]
    kinds = ["colour", "shape"] + (["cell"] if empty else [])
    kind = rng.choice(kinds)
    if kind == "colour":
        changed = replace(target, colour=rng.choice([c for c in spec.colours if c != target.colour]))
    elif kind == "shape":
        changed = replace(target, shape=rng.choice([s for s in spec.shapes if s != target.shape]))
    else:
        changed = replace(target, row=(cell := rng.choice(empty))[0], col=cell[1])
    return spec.describe(make_scene(rest + (changed,)))


# ----- parsing prompts back ------------------------------------------------------------------
class PromptError(ValueError):
    """A prompt that is not an instruction of this world."""


class _Words:
    def __init__(self, spec: WorldSpec, prompt: str) -> None:
        self.spec, self.words, self.i = spec, prompt.split(), 0
        self.rows, self.cols = ROW_NAMES[spec.cells[0]], COL_NAMES[spec.cells[1]]

    def peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def take(self, *allowed: str) -> str:
        word = self.peek()
        if word is None or (allowed and word not in allowed):
            raise PromptError(f"expected {' | '.join(allowed) or 'a word'} at word {self.i} of {' '.join(self.words)!r}")
        self.i += 1
        return word

    def position(self) -> tuple[int, int] | None:
        if self.peek() in self.rows:
            return (self.rows.index(self.take()), self.cols.index(self.take(*self.cols)))
        return None

    def partial(self) -> Partial:
        self.take("a")
        colour = self.take(FREE_COLOUR, *self.spec.colours)
        shape = self.take(FREE_SHAPE, *self.spec.shapes)
        self.take("at")
        return Partial(None if colour == FREE_COLOUR else colour, None if shape == FREE_SHAPE else shape, self.place())

    def place(self) -> tuple[int, int] | None:
        """A cell, or None for 'any place'."""
        if self.peek() == FREE_PLACE[0]:
            self.take(FREE_PLACE[0])
            self.take(FREE_PLACE[1])
            return None
        pos = self.position()
        if pos is None:
            raise PromptError(f"expected a cell or 'any place' at word {self.i} of {' '.join(self.words)!r}")
        return pos

    def cell(self) -> tuple[int, int]:
        pos = self.position()
        if pos is None:
            raise PromptError(f"expected a cell at word {self.i} of {' '.join(self.words)!r}")
        return pos

    def end(self) -> None:
        if self.peek() is not None:
            raise PromptError(f"unexpected {self.peek()!r} at word {self.i} of {' '.join(self.words)!r}")


def _at(scene: Scene, pos: tuple[int, int]) -> Obj:
    hits = [o for o in scene if o.pos == pos]
    if not hits:
        raise PromptError(f"the input has no object in cell {pos}")
    return hits[0]


def follows(spec: WorldSpec, prompt: str, input_scene: Scene | None, output: Scene) -> bool:
    """Whether ``output`` (e.g. parsed from a sampled image) is a valid result of the instruction."""
    w = _Words(spec, prompt)
    verb = w.take("draw", "add", "paint", "make", "move", "remove")
    if verb == "draw":
        partials = [w.partial()]
        while w.peek() == "and":
            w.take()
            partials.append(w.partial())
        w.end()
        return len(output) == len(partials) and any(
            all(p.admits(o) for p, o in zip(partials, perm)) for perm in itertools.permutations(output)
        )
    if input_scene is None:
        raise PromptError(f"{verb!r} edits an input image, and none was given")
    if verb == "add":
        partial = w.partial()
        w.end()
        new = set(output) - set(input_scene)
        return (set(input_scene) <= set(output) and len(output) == len(input_scene) + 1
                and partial.admits(next(iter(new))))
    if verb != "move":
        w.take("the")
    if verb == "remove":
        w.take("shape")
        w.take("at")
        w.take("the")
        target = _at(input_scene, w.cell())
        w.end()
        rest = set(input_scene) - {target}
        return set(output) == rest and len(output) == len(rest)
    target = _at(input_scene, w.cell())
    w.take("shape")
    rest = set(input_scene) - {target}
    if verb == "paint":
        w.take("in")
        colour = w.take(*spec.colours)
        w.end()
        return set(output) == rest | {replace(target, colour=colour)} and len(output) == len(input_scene)
    if verb == "make":
        w.take("a")
        shape = w.take(*spec.shapes)
        w.end()
        return set(output) == rest | {replace(target, shape=shape)} and len(output) == len(input_scene)
    w.take("to")
    dest = w.place()
    w.end()
    if len(output) != len(input_scene) or not rest <= set(output):
        return False
    (moved,) = set(output) - rest
    taken = {o.pos for o in input_scene}
    return (moved.colour, moved.shape) == (target.colour, target.shape) and moved.pos not in taken and (
        dest is None or moved.pos == dest)
