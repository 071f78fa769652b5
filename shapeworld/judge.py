"""The generated world's exact checks as a ``pararl eval`` judge (``--judge world``), and the default
run's figures from the judgments.

The world knows the truth, so on it a judge can be exact: output alignment is 1 where the final text
names exactly the objects the image shows (agreement: the share of objects it gets right), image
alignment is 1 where the image obeys the prompt (given the input scene when editing; never with a
garbled cell), and an answer task's answer is checked against the reference. It is the yardstick a
CLIP judge is measured against.
"""
from __future__ import annotations

from typing import Sequence

from pararl.tasks import TASKS
from reward.judges import Judgment, Sample
from reward.verifiable import answers_match, extract_answer
from shapeworld.checks import image_follows
from shapeworld.rewards import world_spec
from shapeworld.scene import WorldSpec


class WorldJudge:
    name = "world"
    gives = ("output_alignment", "image_alignment", "agreement", "answer_correct")

    def __init__(self, world: "str | WorldSpec") -> None:
        """``world``: the world's file (world.json), or its spec."""
        self.spec = world if isinstance(world, WorldSpec) else world_spec(world)
        self.codec = self.spec.codec()
        self.identity = f"world-judge({self.spec.to_dict()})"

    def judge(self, samples: Sequence[Sample]) -> list[Judgment]:
        return [self._one(s) for s in samples]

    def _one(self, s: Sample) -> Judgment:
        kind = TASKS[s.task]
        if not kind.writes_image:
            answer = extract_answer(s.text, think_end=None)
            return {"answer_correct": float(answer is not None and answers_match(answer, s.answer))}
        if s.image is None:
            return {}
        codes = self.codec.encode(s.image[None])[0]
        before = self.spec.parse_image(self.codec.encode(s.input_image[None])[0]) if s.input_image is not None else None
        out = {"image_alignment": float(image_follows(self.spec, s.prompt, before, self.spec.parse_image(codes)))}
        if kind.writes_text:
            out |= {"output_alignment": float(self.spec.aligned(s.text, codes)), "agreement": self.spec.agreement(s.text, codes)}
        return out


def world_values(tasks: Sequence[str], judgments: dict[str, Sequence[Judgment]],
                 keys: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """The default run's held-out figures per sample, from judgments of the ``reward`` and ``world``
    judges (``tasks[i]``: sample i's task; ``keys[i]``: its name, its index by default): the reward,
    exact alignment, agreement and prompt following of tasks that write text and image, prompt following
    of image-only tasks (``t2i_follows``), and each answer task's correctness (``<task>_correct``). A
    judgment left missing (a dropped non-finite reward) is left out."""
    keys = [str(i) for i in range(len(tasks))] if keys is None else keys
    per: dict[str, dict[str, float]] = {}

    def add(figure: str, key: str, value) -> None:
        if value is not None:
            per.setdefault(figure, {})[key] = float(value)

    for i, (task, key) in enumerate(zip(tasks, keys)):
        kind = TASKS[task]
        if "reward" in judgments:
            add("reward", key, judgments["reward"][i].get("reward"))
        world = judgments["world"][i] if "world" in judgments else {}
        if not kind.writes_image:
            add(f"{task}_correct", key, world.get("answer_correct"))
        elif kind.writes_text:
            add("aligned", key, world.get("output_alignment"))
            add("agreement", key, world.get("agreement"))
            add("follows", key, world.get("image_alignment"))
        else:
            add("t2i_follows", key, world.get("image_alignment"))
    return per


def world_figures(tasks: Sequence[str], judgments: dict[str, Sequence[Judgment]]) -> dict[str, float]:
    """``world_values`` averaged: each figure's mean and its standard error (NAME_se), and ``n`` samples."""
    from cluster.evaluate import mean_se

    out: dict[str, float] = {"n": len(tasks)}
    for figure, values in world_values(tasks, judgments).items():
        out[figure], out[f"{figure}_se"] = mean_se(list(values.values()))
    return out
