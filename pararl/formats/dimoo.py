"""MMaDA-Parallel -A (Lumina-DiMOO based): text templates, a newline token after every image row."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from pararl.errors import ConfigError, DataError
from pararl.formats.base import FormatBase, PromptTokens
from pararl.tasks import IMAGE, TEXT, task_of

DIMOO_GENERATE_INSTRUCTION = "Generate an image according to the text prompt."
DIMOO_EDIT_INSTRUCTION = "Generate an image applying the following editing instruction based on the original image."


@dataclass(frozen=True)
class DimooFormat(FormatBase):
    """Layout of MMaDA-Parallel -A sequences (Lumina-DiMOO's conventions).

    Prompt: ``<system>{task instruction}</system><user>{prompt}</user>``; for editing, the input image
    ``<boi> rows <eoi>`` (each row of codes followed by the newline token) sits just before the last
    template token. Output: ``<answer_start> <boi> IMAGE-SPAN <eoi> TEXT </answer>``, the image span
    holding ``rows * (cols + 1)`` positions of which the newline columns are fixed. The template pieces
    are stored as token ids (tokenized once with the checkpoint's tokenizer by ``mmada_a_format``), so
    the format needs no tokenizer at sampling time and travels to actors as plain data.
    """

    name: str
    mask_id: int
    pad_id: int
    uncond_id: int  # <uncondition>: what the user part of the unconditional prompt says
    newline_id: int
    boi_id: int
    eoi_id: int
    answer_start_id: int
    answer_end_ids: tuple[int, ...]
    generate_prefix: tuple[int, ...]  # "<system>{generation instruction}</system><user>"
    edit_prefix: tuple[int, ...]  # "<system>{editing instruction}</system><user>"
    prompt_suffix: tuple[int, ...]  # "</user>"
    text_vocab_size: int
    image_offset: int
    codebook_size: int
    grid: tuple[int, int]  # token rows, token columns of one image
    special_ids: tuple[int, ...] = field(default=())
    text_vocab: str = "text"

    LAYOUT = "dimoo"

    def __post_init__(self) -> None:
        self.check_text_vocab()
        for name in ("answer_end_ids", "generate_prefix", "edit_prefix", "prompt_suffix", "grid"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ConfigError(f"grid {self.grid} must be (rows, columns) of at least one token")
        if not self.prompt_suffix:
            raise ConfigError("prompt_suffix is empty: the input image goes before the last template token")
        specials = {self.mask_id, self.uncond_id, self.newline_id, self.boi_id, self.eoi_id, self.answer_start_id,
                    *self.special_ids}
        object.__setattr__(self, "special_ids", tuple(sorted(i for i in specials if i < self.text_vocab_size)))

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_span_len(self) -> int:
        return self.grid[0] * (self.grid[1] + 1)

    def span_ids(self, codes: torch.Tensor) -> torch.Tensor:
        rows, cols = self.grid
        ids = self.image_ids(torch.as_tensor(codes))
        ids = ids.reshape(*ids.shape[:-1], rows, cols)
        newline = torch.full((*ids.shape[:-1], 1), self.newline_id, dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, newline], -1).flatten(-2)

    def span_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] != self.image_span_len:
            raise ValueError(f"an image span of format {self.name!r} has {self.image_span_len} positions, got {ids.shape[-1]}")
        rows, cols = self.grid
        return self.image_codes(ids.reshape(*ids.shape[:-1], rows, cols + 1)[..., :cols].flatten(-2))

    def _masked_span(self) -> list[int]:
        rows, cols = self.grid
        return ([self.mask_id] * cols + [self.newline_id]) * rows

    def encode_prompt(self, prompt_ids: Sequence[int], input_codes: Sequence[int] | torch.Tensor | None = None,
                      task: str | None = None) -> PromptTokens:
        self.check_task(task_of(task, input_codes is not None))
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise DataError("empty prompt: a generation or editing request needs instruction text")
        if input_codes is None:
            head, image = list(self.generate_prefix), []
        else:
            codes = torch.as_tensor(input_codes).flatten()
            if codes.numel() != self.image_tokens:
                raise DataError(f"input image has {codes.numel()} tokens; format {self.name!r} needs {self.image_tokens}")
            if codes.min() < 0 or codes.max() >= self.codebook_size:
                raise DataError(f"input image codes must lie in [0, {self.codebook_size})")
            head, image = list(self.edit_prefix), [self.boi_id, *self.span_ids(codes).tolist(), self.eoi_id]
        template = head + prompt_ids + list(self.prompt_suffix)
        ids = template[:-1] + image + template[-1:]
        text_mask = [False] * len(ids)
        text_mask[len(head) : len(head) + len(prompt_ids)] = [True] * len(prompt_ids)
        image_mask = [False] * len(ids)
        image_mask[len(template) - 1 : len(template) - 1 + len(image)] = [True] * len(image)
        return PromptTokens(ids, text_mask, image_mask)

    def unconditional(self, prompt: PromptTokens, drop_image: bool = False) -> list[int]:
        """``<uncondition>`` in place of the user prompt, the rest of it padding (same length as the
        conditional row); with ``drop_image`` the input image becomes padding too."""
        ids = list(prompt.ids)
        text = [i for i, t in enumerate(prompt.text_mask) if t]
        for n, i in enumerate(text):
            ids[i] = self.uncond_id if n == 0 else self.pad_id
        if drop_image:
            ids = [self.pad_id if m else tok for tok, m in zip(ids, prompt.image_mask)]
        return ids

    def released_unconditional(self, prompt: PromptTokens) -> tuple[list[int], list[int]]:
        """The released -A generator's two unconditional rows, same length as the conditional one.

        Each is the conditional sequence with its PREFIX overwritten by a separately built shorter
        prompt, so a tail of the original prefix stays behind it: ``uncond_text`` is the template with
        ``<uncondition>`` as the user text, then the input image (the last ``len(prompt) - 1`` tokens of
        the original prefix remain); ``uncond_img`` is the template with the prompt but no image (its
        closing token lands on ``<boi>``, the image tokens after it remain). For a generation prompt
        ``uncond_img`` equals the conditional row.
        """
        ids = list(prompt.ids)
        text = [i for i, t in enumerate(prompt.text_mask) if t]
        image = [ids[i] for i, m in enumerate(prompt.image_mask) if m]
        head = ids[: text[0]]
        user = [ids[i] for i in text]
        suffix = [tok for i, tok in enumerate(ids) if i >= text[0] and not prompt.text_mask[i] and not prompt.image_mask[i]]
        blank = head + [self.uncond_id] + suffix
        uncond_text = blank[:-1] + image + blank[-1:] if image else blank
        uncond_img = head + user + suffix
        return ([*uncond_text, *ids[len(uncond_text):]], [*uncond_img, *ids[len(uncond_img):]])

    def output_ids(self, text_len: int, outputs: tuple[str, ...] = (IMAGE, TEXT)) -> tuple[list[int], int, int]:
        if tuple(outputs) != (IMAGE, TEXT):
            raise DataError(f"format {self.name!r} writes image and text together; it has no {'+'.join(outputs)} layout")
        ids = ([self.answer_start_id, self.boi_id] + self._masked_span() + [self.eoi_id] + [self.mask_id] * text_len
               + list(self.answer_end_ids))
        return ids, 2, 3 + self.image_span_len

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"layout": self.LAYOUT} | {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "DimooFormat":
        fields = {k: v for k, v in fields.items() if k != "layout"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown token-format fields: {', '.join(unknown)}")
        return cls(**fields)


def _template_ids(tokenizer: Any, text: str, lead: bool, trail: bool) -> list[int]:
    """Ids of a template piece, with the special tokens the tokenizer itself adds around a whole prompt
    (BOS, ...) kept on the side where the released code has them: it tokenizes the whole template at once."""
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text)["input_ids"])
    head, tail = [], []
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            head, tail = full[:i], full[i + len(plain) :]
            break
    return (head if lead else []) + plain + (tail if trail else [])


def mmada_a_format(
    tokenizer: Any,
    grid: Sequence[int] = (32, 32),
    text_vocab_size: int = 126356,
    codebook_size: int = 8192,
    generate_instruction: str = DIMOO_GENERATE_INSTRUCTION,
    edit_instruction: str = DIMOO_EDIT_INSTRUCTION,
    text_vocab: str = "text",
) -> DimooFormat:
    """MMaDA-Parallel -A with the released ids (facts file): image id = 126356 + code, newline 126084,
    ``<boi>`` 126349, ``<eoi>`` 126350, ``<uncondition>`` 126351, pad 126339, answer_start 126354,
    mask 126336. The text templates are tokenized with the checkpoint's own tokenizer; 512x512 images
    are a 32x32 grid."""
    uncond = 126351
    known = tokenizer.convert_tokens_to_ids("<uncondition>")
    if known is not None and known != tokenizer.unk_token_id and known != uncond:
        raise ConfigError(f"the tokenizer maps <uncondition> to {known}, the -A format expects {uncond}")
    generate = _template_ids(tokenizer, f"<system>{generate_instruction}</system><user>", lead=True, trail=False)
    edit = _template_ids(tokenizer, f"<system>{edit_instruction}</system><user>", lead=True, trail=False)
    suffix = _template_ids(tokenizer, "</user>", lead=False, trail=True)
    markup = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return DimooFormat(
        name="mmada-parallel-a",
        mask_id=126336,
        pad_id=126339,
        uncond_id=uncond,
        newline_id=126084,
        boi_id=126349,
        eoi_id=126350,
        answer_start_id=126354,
        answer_end_ids=tuple(tokenizer("</answer>", add_special_tokens=False)["input_ids"]),
        generate_prefix=tuple(generate),
        edit_prefix=tuple(edit),
        prompt_suffix=tuple(suffix),
        text_vocab_size=text_vocab_size,
        image_offset=text_vocab_size,
        codebook_size=codebook_size,
        grid=(int(grid[0]), int(grid[1])),
        special_ids=tuple(sorted(i for i in {*generate, *edit, *suffix} if i in markup)),
        text_vocab=text_vocab,
    )

