"""What every token format offers: the output layout, the prompt's pieces, the id conventions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pararl.errors import ConfigError, DataError
from pararl.tasks import Task

TEXT_VOCABS = ("text", "all")

@dataclass(frozen=True)
class OutputLayout:
    """Columns of the output spans in a left-padded batch: the same for every row, so spans are slices."""

    length: int
    output_start: int
    image_start: int
    image_len: int
    text_start: int
    text_len: int

    @property
    def image(self) -> slice:
        return slice(self.image_start, self.image_start + self.image_len)

    @property
    def text(self) -> slice:
        return slice(self.text_start, self.text_start + self.text_len)

    @property
    def output(self) -> slice:
        return slice(self.output_start, self.length)

    def relative(self, span: slice) -> slice:
        """A span as columns of the output region (how snapshots store it)."""
        return slice(span.start - self.output_start, span.stop - self.output_start)


@dataclass(frozen=True)
class PromptTokens:
    """The conditioning part of one sequence, with which positions CFG blanks out."""

    ids: list[int]
    text_mask: list[bool]
    image_mask: list[bool]


class FormatBase:
    """What every token format offers the sampler, batching, learner and reward, whatever its layout.

    The output image span may hold fixed structural positions (the -A row newlines): they are never
    masks, so the sampler never reveals them and the learner never scores them; ``span_codes``
    drops them before an image tokenizer sees the codes, and ``span_ids`` puts them back.
    Subclasses are frozen dataclasses with at least the fields used here.
    """

    name: str
    mask_id: int
    pad_id: int
    uncond_id: int
    text_vocab_size: int
    image_offset: int
    codebook_size: int
    image_tokens: int  # codes per image (a field or a property of the subclass)
    special_ids: tuple[int, ...]
    text_vocab: str = "text"  # what a text position may draw: "text" ids, or "all" ids as the releases do
    TASKS: ClassVar[tuple[str, ...]] = ("generate", "edit")  # the task families this format can build sequences for

    def check_task(self, task: Task) -> Task:
        if task.name not in self.TASKS:
            raise DataError(f"format {self.name!r} builds no sequences for task {task.name!r}; it knows {', '.join(self.TASKS)}")
        return task

    @property
    def vocab_size(self) -> int:
        return max(self.text_vocab_size, self.image_offset + self.codebook_size)

    @property
    def image_span_len(self) -> int:
        """Positions of the output image span: the codes plus any structural positions between them."""
        return self.image_tokens

    def image_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_offset

    def image_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes of image-span ids; a mask (or any non-image id) becomes -1."""
        codes = ids - self.image_offset
        return torch.where((codes >= 0) & (codes < self.codebook_size), codes, torch.full_like(codes, -1))

    def span_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., image_tokens] -> the ids of a whole image span [..., image_span_len]."""
        return self.image_ids(codes)

    def span_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids of a whole image span [..., image_span_len] -> codes [..., image_tokens] (masks: -1).

        What an image tokenizer decodes: structural positions are dropped, row-major order kept."""
        if ids.shape[-1] != self.image_span_len:
            raise ValueError(f"an image span of format {self.name!r} has {self.image_span_len} positions, got {ids.shape[-1]}")
        return self.image_codes(ids)

    def unconditional(self, prompt: "PromptTokens", drop_image: bool = False) -> list[int]:
        """The CFG sequence of a prompt, same length: prompt text (and, if asked, the input image) blanked."""
        return [self.uncond_id if t or (i and drop_image) else tok
                for tok, t, i in zip(prompt.ids, prompt.text_mask, prompt.image_mask)]

    def restrict_text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What a text position may draw, for the sampler and the learner alike.

        ``text``: text ids only, specials (mask, structure) impossible. ``all``: every id the head
        scores, as both released generators draw text, except the mask token (drawing it would leave
        the position masked while the schedule counts it revealed)."""
        if self.text_vocab == "all":
            logits = logits.clone()
            logits[..., self.mask_id] = float("-inf")
            return logits
        logits = logits[..., : self.text_vocab_size].clone()
        logits[..., list(self.special_ids)] = float("-inf")
        return logits

    def check_text_vocab(self) -> None:
        if self.text_vocab not in TEXT_VOCABS:
            raise ConfigError(f"text_vocab {self.text_vocab!r} of format {self.name!r} is not one of {', '.join(TEXT_VOCABS)}")

    def restrict_image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook: index ``c`` is image code ``c``."""
        return logits[..., self.image_offset : self.image_offset + self.codebook_size]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"special_ids": list(self.special_ids)}
