"""The generated world's own checks of a policy's outputs, for the generic held-out evaluation.

Exact alignment (does the final text name exactly the objects the final image shows), a soft
per-object agreement, and prompt following (does the image obey the instruction: a guard against a
policy that buys alignment by ignoring the prompt). ``cluster.evaluate`` averages them with their
standard errors beside the reward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from pararl.bundle import Codecs
from pararl.data import Record
from pararl.tasks import TASKS
from pararl.types import GenerationRequest, Trajectories
from reward.verifiable import answers_match, extract_answer
from shapeworld.scene import ImageParse, WorldSpec
from shapeworld.tasks import PromptError, follows


def check_outputs(spec: WorldSpec, codecs: Codecs, traj: Trajectories, records: Sequence[Record],
                  input_codes: Sequence[torch.Tensor | None]) -> dict[str, list[float]]:
    """Per trajectory, by its task: for image and text, exact alignment, soft agreement and prompt
    following of the final outputs; for an image alone, prompt following (``t2i_follows``); for an
    answer, whether it is the reference after normalisation (``<task>_correct``)."""
    codes = codecs.fmt.image_codes(traj.image_tokens.cpu())
    out: dict[str, list[float]] = {}
    for row in range(len(traj)):
        rec = records[int(traj.prompt_index[row])]
        kind = TASKS[rec.task]
        text = codecs.decode_text(traj.text_tokens[row].cpu())
        if not kind.writes_image:
            answer = extract_answer(text, think_end=None)
            out.setdefault(f"{rec.task}_correct", []).append(float(answer is not None and answers_match(answer, rec.answer)))
            continue
        if kind.writes_text:
            out.setdefault("aligned", []).append(float(spec.aligned(text, codes[row])))
            out.setdefault("agreement", []).append(spec.agreement(text, codes[row]))
        inp = input_codes[int(traj.prompt_index[row])]
        ok = image_follows(spec, rec.prompt, spec.parse_image(inp) if inp is not None else None, spec.parse_image(codes[row]))
        out.setdefault("follows" if kind.writes_text else "t2i_follows", []).append(float(ok))
    return out


def image_follows(spec: WorldSpec, prompt: str, before: ImageParse | None, after: ImageParse) -> bool:
    """Whether an output image obeys the prompt, given the input image's parse when editing: never with
    a garbled cell, and a prompt that is not an instruction of this world is not followed. The one
    definition the checks, the t2i reward and the eval judge share."""
    if after.garbled:
        return False
    try:
        return follows(spec, prompt, before.objects if before is not None else None, after.objects)
    except PromptError:
        return False


def world_checks(spec: WorldSpec, codecs: Codecs) -> Callable[..., dict[str, list[float]]]:
    """The checks as the evaluation's hook: (trajectories, their records, their requests) -> values per check."""

    def checks(traj: Trajectories, records: Sequence[Record], requests: Sequence[GenerationRequest]) -> dict[str, list[float]]:
        return check_outputs(spec, codecs, traj, records, [r.input_codes for r in requests])

    return checks
