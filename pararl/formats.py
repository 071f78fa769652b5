"""Token formats: where a model family puts the prompt, the input image and the two output spans.

The sampler, the learner and the reward service all need to know which columns hold the output
image and the output text, which ids are image codes, and what the unconditional (CFG) sequence
looks like. One object per family answers all of that, so no other module hard-codes an id.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


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
        """Logits over text ids only, specials (mask, structure) impossible: what a text position may draw."""
        logits = logits[..., : self.text_vocab_size].clone()
        logits[..., list(self.special_ids)] = float("-inf")
        return logits

    def restrict_image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook: index ``c`` is image code ``c``."""
        return logits[..., self.image_offset : self.image_offset + self.codebook_size]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"special_ids": list(self.special_ids)}


@dataclass(frozen=True)
class ParallelFormat(FormatBase):
    """Layout of MMaDA-Parallel style sequences: ``[task, (soi img eoi), prompt, soi IMG eoi bos TEXT]``.

    Output image first, reasoning text second (MMaDA-Parallel -M). Text ids are ``< text_vocab_size``;
    image code ``c`` is token ``image_offset + c``.
    """

    name: str
    mask_id: int
    pad_id: int
    uncond_id: int
    bos_id: int
    soi_id: int
    eoi_id: int
    generate_id: int
    edit_id: int
    text_vocab_size: int
    image_offset: int
    codebook_size: int
    image_tokens: int
    # Ids that are text but never a sampled text token (structure, padding, the mask itself).
    special_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        specials = {self.mask_id, self.pad_id, self.uncond_id, self.bos_id, self.soi_id, self.eoi_id,
                    self.generate_id, self.edit_id, *self.special_ids}
        object.__setattr__(self, "special_ids", tuple(sorted(i for i in specials if i < self.text_vocab_size)))

    def encode_prompt(self, prompt_ids: Sequence[int], input_codes: Sequence[int] | torch.Tensor | None = None) -> PromptTokens:
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("empty prompt: a generation or editing request needs instruction text")
        if input_codes is None:
            head, image = [self.generate_id], []
        else:
            codes = torch.as_tensor(input_codes).flatten()
            if codes.numel() != self.image_tokens:
                raise ValueError(
                    f"input image has {codes.numel()} tokens; format {self.name!r} needs {self.image_tokens}"
                )
            if codes.min() < 0 or codes.max() >= self.codebook_size:
                raise ValueError(f"input image codes must lie in [0, {self.codebook_size})")
            image = [self.soi_id, *self.image_ids(codes).tolist(), self.eoi_id]
            head = [self.edit_id]
        ids = head + image + prompt_ids
        text_mask = [False] * (len(head) + len(image)) + [True] * len(prompt_ids)
        image_mask = [False] * len(head) + [True] * len(image) + [False] * len(prompt_ids)
        return PromptTokens(ids, text_mask, image_mask)

    def output_ids(self, text_len: int) -> tuple[list[int], int, int]:
        """The masked output and the offsets of its image and text spans inside it."""
        ids = [self.soi_id] + [self.mask_id] * self.image_tokens + [self.eoi_id, self.bos_id] + [self.mask_id] * text_len
        return ids, 1, self.image_tokens + 3

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ParallelFormat":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown token-format fields: {', '.join(unknown)}")
        return cls(**{**fields, "special_ids": tuple(fields.get("special_ids", ()))})


def mmada_m_format(text_vocab_size: int = 126464, codebook_size: int = 8192, image_tokens: int = 1024) -> ParallelFormat:
    """MMaDA-Parallel -M: LLaDA's text vocabulary, then the MAGVIT-v2 codebook (ids from the facts file)."""
    return ParallelFormat(
        name="mmada-parallel-m",
        mask_id=126336,
        pad_id=126081,
        uncond_id=126081,
        bos_id=126080,
        soi_id=126084,
        eoi_id=126085,
        generate_id=126096,
        edit_id=126095,
        text_vocab_size=text_vocab_size,
        image_offset=text_vocab_size,
        codebook_size=codebook_size,
        image_tokens=image_tokens,
        special_ids=(126088, 126089),
    )


WORLD_SPECIAL_TOKENS = ("<pad>", "<mask>", "<uncond>", "<bos>", "<soi>", "<eoi>", "<gen>", "<edit>")


def world_format(text_vocab_size: int, codebook_size: int, image_tokens: int) -> ParallelFormat:
    """The generated world's format: its tokenizer puts the special tokens first, in WORLD_SPECIAL_TOKENS order."""
    ids = {tok: i for i, tok in enumerate(WORLD_SPECIAL_TOKENS)}
    return ParallelFormat(
        name="world",
        mask_id=ids["<mask>"],
        pad_id=ids["<pad>"],
        uncond_id=ids["<uncond>"],
        bos_id=ids["<bos>"],
        soi_id=ids["<soi>"],
        eoi_id=ids["<eoi>"],
        generate_id=ids["<gen>"],
        edit_id=ids["<edit>"],
        text_vocab_size=text_vocab_size,
        image_offset=text_vocab_size,
        codebook_size=codebook_size,
        image_tokens=image_tokens,
    )


# ---------------------------------------------------------------------------------------------------
# MMaDA-Parallel -A (Lumina-DiMOO based): text templates, a newline token after every image row.

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

    LAYOUT = "dimoo"

    def __post_init__(self) -> None:
        for name in ("answer_end_ids", "generate_prefix", "edit_prefix", "prompt_suffix", "grid"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid {self.grid} must be (rows, columns) of at least one token")
        if not self.prompt_suffix:
            raise ValueError("prompt_suffix is empty: the input image goes before the last template token")
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

    def encode_prompt(self, prompt_ids: Sequence[int], input_codes: Sequence[int] | torch.Tensor | None = None) -> PromptTokens:
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("empty prompt: a generation or editing request needs instruction text")
        if input_codes is None:
            head, image = list(self.generate_prefix), []
        else:
            codes = torch.as_tensor(input_codes).flatten()
            if codes.numel() != self.image_tokens:
                raise ValueError(f"input image has {codes.numel()} tokens; format {self.name!r} needs {self.image_tokens}")
            if codes.min() < 0 or codes.max() >= self.codebook_size:
                raise ValueError(f"input image codes must lie in [0, {self.codebook_size})")
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

    def output_ids(self, text_len: int) -> tuple[list[int], int, int]:
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
            raise ValueError(f"unknown token-format fields: {', '.join(unknown)}")
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
) -> DimooFormat:
    """MMaDA-Parallel -A with the released ids (facts file): image id = 126356 + code, newline 126084,
    ``<boi>`` 126349, ``<eoi>`` 126350, ``<uncondition>`` 126351, pad 126339, answer_start 126354,
    mask 126336. The text templates are tokenized with the checkpoint's own tokenizer; 512x512 images
    are a 32x32 grid."""
    uncond = 126351
    known = tokenizer.convert_tokens_to_ids("<uncondition>")
    if known is not None and known != tokenizer.unk_token_id and known != uncond:
        raise ValueError(f"the tokenizer maps <uncondition> to {known}, the -A format expects {uncond}")
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
    )


FORMAT_LAYOUTS: dict[str, type] = {"parallel": ParallelFormat, DimooFormat.LAYOUT: DimooFormat}


def format_from_dict(fields: dict[str, Any]) -> FormatBase:
    """A format saved with ``to_dict`` (``pararl.json``): its ``layout`` names the class (none: ParallelFormat)."""
    layout = fields.get("layout", "parallel")
    if layout not in FORMAT_LAYOUTS:
        raise ValueError(f"unknown token-format layout {layout!r}; known: {', '.join(sorted(FORMAT_LAYOUTS))}")
    return FORMAT_LAYOUTS[layout].from_dict(fields)
