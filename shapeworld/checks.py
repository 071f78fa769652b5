"""Whether an output image obeys its prompt: the one definition the world's eval judge
(``shapeworld.judge``) and its t2i reward (``shapeworld.rewards``) share."""
from __future__ import annotations

from shapeworld.scene import ImageParse, WorldSpec
from shapeworld.tasks import PromptError, follows


def image_follows(spec: WorldSpec, prompt: str, before: ImageParse | None, after: ImageParse) -> bool:
    """Whether an output image obeys the prompt, given the input image's parse when editing: never with
    a garbled cell, and a prompt that is not an instruction of this world is not followed (a guard
    against a policy that buys alignment by ignoring the prompt)."""
    if after.garbled:
        return False
    try:
        return follows(spec, prompt, before.objects if before is not None else None, after.objects)
    except PromptError:
        return False
