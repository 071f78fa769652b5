"""The world's UniGRPO tasks: questions with a checkable answer, and image-only generation.

- understand: a question about the input scene ("how many red shapes", "what colour is the top left
  shape"), answered in text; the image is the evidence.
- reason: the same questions about a scene given as its description in the prompt, text only: the
  answer follows from the words.
- t2i: a generation prompt whose output is the image alone (no reasoning text).

Answers are single words ("two", "red", "none") so a verifiable reward can check them after
normalisation, and questions have fixed slots, as the drawing prompts do (a RoPE-only policy learns
fixed distances fastest).
"""
from __future__ import annotations

import random

from shapeworld.scene import Scene, WorldSpec
from shapeworld.tasks import Example, random_scene, sample_generation

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NONE = "none"
QUESTION_WORDS = ("how", "many", "shapes", "what", "colour", "is", "the", "shape", "question", NONE, *COUNT_WORDS)
QUESTION_TASKS = ("t2i", "understand", "reason")


def ask(spec: WorldSpec, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(question, answer) about ``scene``: a count of one colour, or the colour or shape in one cell."""
    kind = rng.choice(("count", "colour", "shape"))
    if kind == "count":
        colour = rng.choice(spec.colours)
        return f"how many {colour} shapes", COUNT_WORDS[sum(o.colour == colour for o in scene)]
    row, col = rng.choice(spec.positions)
    there = next((o for o in scene if o.pos == (row, col)), None)
    cell = " ".join(spec.position_words((row, col)))
    if kind == "colour":
        return f"what colour is the {cell} shape", there.colour if there else NONE
    return f"what shape is the {cell} shape", there.shape if there else NONE


def sample_question_task(spec: WorldSpec, rng: random.Random, task: str, given: float) -> Example:
    """One example of a UniGRPO task; its ``answer`` is the reference a verifiable reward checks."""
    if task == "t2i":
        ex = sample_generation(spec, rng, given)
        return Example("t2i", ex.prompt, None, ex.output)
    scene = random_scene(spec, rng, rng.randint(1, spec.max_objects))
    question, answer = ask(spec, scene, rng)
    if task == "understand":
        return Example("understand", question, scene, scene, answer)
    if task == "reason":
        return Example("reason", f"{spec.describe(scene)} question {question}", None, scene, answer)
    raise ValueError(f"the world has no task {task!r}; it knows generate, edit, {', '.join(QUESTION_TASKS)}")
