"""Task families: what a request gives the model and what the model writes back.

ParaRL's tasks write an image AND its reasoning text; MMaDA's UniGRPO also trains tasks that write
only text (reasoning, multimodal understanding) or only an image (text-to-image). What a task
outputs decides the output layout (which spans exist), so a sampler call, a replay and a reward
request all work on one family at a time: requests of different families never share a batch.
Whether a task takes an input image decides how its prompt is built. The format turns a task into
ids (its task token, its sequence); nothing else hard-codes a task name.
"""
from __future__ import annotations

from dataclasses import dataclass

from pararl.errors import DataError
from pararl.registry import Registry

IMAGE, TEXT = "image", "text"


@dataclass(frozen=True)
class Task:
    name: str
    outputs: tuple[str, ...]  # the output spans, in layout order: a subset of (image, text)
    input_image: bool  # the request carries an input image (editing, understanding)

    @property
    def writes_image(self) -> bool:
        return IMAGE in self.outputs

    @property
    def writes_text(self) -> bool:
        return TEXT in self.outputs


TASKS: Registry[Task] = Registry("task")
for _task in (
    Task("generate", (IMAGE, TEXT), False),  # ParaRL: prompt -> image + reasoning text
    Task("edit", (IMAGE, TEXT), True),  # ParaRL: input image + instruction -> image + reasoning text
    Task("t2i", (IMAGE,), False),  # MMaDA <|t2i|>: prompt -> image
    Task("understand", (TEXT,), True),  # MMaDA <|mmu|>: input image + question -> answer text
    Task("reason", (TEXT,), False),  # MMaDA / LLaDA chat: question -> reasoning and answer text
):
    TASKS.add(_task.name, _task)


def task_of(name: str | None, has_input_image: bool) -> Task:
    """The task a request names, checked against its input image; None: edit with an image, else generate
    (what a request meant before tasks had names)."""
    if name is None:
        name = "edit" if has_input_image else "generate"
    task = TASKS.get(name, "task")
    if task.input_image != has_input_image:
        need = "needs an input image" if task.input_image else "takes no input image"
        raise DataError(f"task {name!r} {need}")
    return task


def one_family(tasks: list[Task]) -> tuple[str, ...]:
    """The output spans every task of a batch shares; tasks that write different spans cannot share one."""
    families = sorted({t.outputs for t in tasks})
    if len(families) != 1:
        names = sorted({t.name for t in tasks})
        raise ValueError(f"tasks {names} write different outputs {families}: sample them in separate batches")
    return families[0]
