"""MMaDA-Parallel -M's sequences (MMaDA based) and the generated world's, which share the layout."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from pararl.errors import ConfigError, DataError
from pararl.formats.base import FormatBase, PromptTokens
from pararl.tasks import IMAGE, TEXT, Task, task_of


@dataclass(frozen=True)
class ParallelFormat(FormatBase):
    """Layout of MMaDA-Parallel style sequences: ``[task, (soi img eoi), prompt, soi IMG eoi bos TEXT]``.

    Output image first, reasoning text second (MMaDA-Parallel -M). Text ids are ``< text_vocab_size``;
    image code ``c`` is token ``image_offset + c``.

    ``released_layout`` builds the sequences of the released -M generator (docs/released-models.md):
    the instruction between BOS and EOS, an image span of id 0 where a generation prompt has no input
    image, and an unconditional row that keeps the structure tokens, zeroes the image and says
    ``BOS EOS EOS ...`` for the instruction. Without it (the generated world) the prompt is bare and
    the unconditional row blanks it with ``uncond_id``.
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
    text_vocab: str = "text"
    released_layout: bool = False
    eos_id: int = -1  # the instruction's closing token under released_layout
    # Task tokens of MMaDA's other families (-1: the world's, which reuses <gen> / <edit>: the output
    # layout already tells the model which family it is writing).
    t2i_id: int = -1
    mmu_id: int = -1
    # MMaDA's chat turn around a question (understand, reason) under released_layout: the ids of
    # "<|start_header_id|>user<|end_header_id|>\n" and of "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"
    chat_user_ids: tuple[int, ...] = ()
    chat_assistant_ids: tuple[int, ...] = ()
    TASKS: ClassVar[tuple[str, ...]] = ("generate", "edit", "t2i", "understand", "reason")

    def __post_init__(self) -> None:
        self.check_text_vocab()
        if self.released_layout and self.eos_id < 0:
            raise ConfigError(f"format {self.name!r}: released_layout needs eos_id")
        specials = {self.mask_id, self.pad_id, self.uncond_id, self.bos_id, self.soi_id, self.eoi_id,
                    self.generate_id, self.edit_id, *self.special_ids}
        if self.eos_id >= 0:
            specials.add(self.eos_id)
        object.__setattr__(self, "special_ids", tuple(sorted(i for i in specials if i < self.text_vocab_size)))

    def task_head(self, task: Task) -> int:
        """The task token a sequence of this family starts with."""
        own = {"t2i": self.t2i_id, "understand": self.mmu_id}.get(task.name, -1)
        if own >= 0:
            return own
        return self.edit_id if task.input_image else self.generate_id

    def encode_prompt(self, prompt_ids: Sequence[int], input_codes: Sequence[int] | torch.Tensor | None = None,
                      task: str | None = None) -> PromptTokens:
        """``[task, (soi image eoi), prompt]``; under ``released_layout`` the released generators' sequences:
        the instruction as ``BOS .. EOS`` (generate, edit, t2i) or as MMaDA's chat turn
        ``BOS <user header> question <eot><assistant header>`` (understand, reason: no task token for
        plain text), and generation's id-0 image span (tests/fixtures/mmada, tests/fixtures/released)."""
        kind = self.check_task(task_of(task, input_codes is not None))
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise DataError(f"empty prompt: a {kind.name} request needs instruction text")
        lead, tail = [], []
        if self.released_layout:
            if prompt_ids[0] == self.bos_id:
                prompt_ids = prompt_ids[1:]
            chat = not kind.writes_image
            if chat and not self.chat_user_ids:
                raise DataError(f"format {self.name!r} has no chat template ids: a {kind.name} request needs them "
                                "(the checkpoint's tokenizer gives them)")
            lead = [self.bos_id, *self.chat_user_ids] if chat else [self.bos_id]
            tail = list(self.chat_assistant_ids) if chat else [self.eos_id]
        if input_codes is None:
            blank = self.released_layout and kind.writes_image and kind.writes_text  # -M generation's id-0 image span
            image = [self.soi_id] + [0] * self.image_tokens + [self.eoi_id] if blank else []
        else:
            image = [self.soi_id, *self.checked_image_ids(input_codes), self.eoi_id]
        head = [] if self.released_layout and kind.name == "reason" else [self.task_head(kind)]
        ids = head + image + lead + prompt_ids + tail
        before, after = len(head) + len(image) + len(lead), len(tail)
        text_mask = [False] * before + [True] * len(prompt_ids) + [False] * after
        image_mask = [False] * len(head) + [True] * len(image) + [False] * (len(ids) - len(head) - len(image))
        if self.released_layout and not kind.writes_image:
            return PromptTokens(ids, text_mask, image_mask)
        # generation and editing blank BOS and EOS with the instruction (the released unconditional row)
        text_mask = [False] * (before - len(lead)) + [True] * (len(lead) + len(prompt_ids) + after)
        return PromptTokens(ids, text_mask, image_mask)

    def checked_image_ids(self, input_codes: Sequence[int] | torch.Tensor) -> list[int]:
        codes = torch.as_tensor(input_codes).flatten()
        if codes.numel() != self.image_tokens:
            raise DataError(f"input image has {codes.numel()} tokens; format {self.name!r} needs {self.image_tokens}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise DataError(f"input image codes must lie in [0, {self.codebook_size})")
        return self.image_ids(codes).tolist()

    def unconditional(self, prompt: PromptTokens, drop_image: bool = False) -> list[int]:
        if not self.released_layout:
            return super().unconditional(prompt, drop_image)
        ids, first_text = list(prompt.ids), prompt.text_mask.index(True)
        for i, (t, m) in enumerate(zip(prompt.text_mask, prompt.image_mask)):
            if t:
                ids[i] = self.bos_id if i == first_text else self.eos_id
            elif m and drop_image and ids[i] not in (self.soi_id, self.eoi_id):
                ids[i] = 0
        return ids

    def output_ids(self, text_len: int, outputs: tuple[str, ...] = (IMAGE, TEXT)) -> tuple[list[int], int, int]:
        """The masked output and the offsets of its image and text spans inside it (a span the task does
        not write is absent: its offset is where it would start, and the layout gives it no columns)."""
        image = [self.soi_id] + [self.mask_id] * self.image_tokens + [self.eoi_id] if IMAGE in outputs else []
        text = [self.mask_id] * text_len if TEXT in outputs else []
        if text and (image or not self.released_layout):  # MMaDA's answer follows the chat turn directly
            text = [self.bos_id] + text
        return image + text, 1 if image else 0, len(image) + len(text) - (text_len if text else 0)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "ParallelFormat":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown token-format fields: {', '.join(unknown)}")
        tuples = {k: tuple(fields.get(k, ())) for k in ("special_ids", "chat_user_ids", "chat_assistant_ids")}
        return cls(**{**fields, **tuples})


MMADA_CHAT_USER = "<|start_header_id|>user<|end_header_id|>\n"
MMADA_CHAT_ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n"


def chat_ids(tokenizer: Any) -> dict[str, tuple[int, ...]]:
    """The ids of MMaDA's chat turn around a question under ``tokenizer`` (none without one, or when the
    tokenizer lacks LLaDA's header tokens: a chat task is then refused by name, not built wrong)."""
    if tokenizer is None:
        return {}
    vocab = tokenizer.get_vocab()
    if not all(t in vocab for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")):
        return {}
    encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return {"chat_user_ids": encode(MMADA_CHAT_USER), "chat_assistant_ids": encode(MMADA_CHAT_ASSISTANT)}


def mmada_m_format(text_vocab_size: int = 126464, codebook_size: int = 8192, image_tokens: int = 1024,
                   text_vocab: str = "text", tokenizer: Any = None) -> ParallelFormat:
    """MMaDA-Parallel -M: LLaDA's text vocabulary, then the MAGVIT-v2 codebook (ids from the facts file),
    with the released generators' sequences; MMaDA's <|t2i|> and <|mmu|> tasks and its chat turns
    (from ``tokenizer``) for the families that write only an image or only text."""
    return ParallelFormat(
        name="mmada-parallel-m",
        mask_id=126336,
        pad_id=126081,
        uncond_id=126081,
        bos_id=126080,
        soi_id=126084,
        eoi_id=126085,
        generate_id=126088,  # <|t2i|>: what the released generation call passes (docs/released-models.md)
        edit_id=126095,
        text_vocab_size=text_vocab_size,
        image_offset=text_vocab_size,
        codebook_size=codebook_size,
        image_tokens=image_tokens,
        special_ids=(126089, 126096),
        text_vocab=text_vocab,
        released_layout=True,
        eos_id=126081,
        t2i_id=126088,
        mmu_id=126089,
        **chat_ids(tokenizer),
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

