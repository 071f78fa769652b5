"""A model folder as a user brings it: policy weights, text tokenizer, token format, image tokenizer.

``config.json`` + safetensors hold the policy (LLaDA layout), the tokenizer files sit beside them as in
any hub checkpoint, and ``pararl.json`` records what a LLaDA checkpoint cannot say about itself: its
token format and the image tokenizer that turns its codes into pixels. A released MMaDA-Parallel
checkpoint has no ``pararl.json``: its format is detected from its files (``pararl.detect``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pararl.files import atomic_write
from pararl.formats import FormatBase
from pararl.image_tokenizers import ImageTokenizer, build_image_tokenizer
from pararl.models import CheckpointError, LLaDAModelLM, load_policy

BUNDLE_FILE = "pararl.json"


@dataclass
class Codecs:
    """Everything that turns tokens into text and pixels and back, without the policy weights.

    The reward service holds this (rollout workers send token ids, not pixels), and must not load
    an 8B policy to get it.
    """

    tokenizer: PreTrainedTokenizerBase
    fmt: FormatBase
    image_tokenizer: ImageTokenizer

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        meta = {"format": self.fmt.to_dict(), "image_tokenizer": self.image_tokenizer.spec()}
        atomic_write(path / BUNDLE_FILE, json.dumps(meta, indent=1))

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids: torch.Tensor) -> str:
        """Text of revealed ids: masks and other specials dropped (what the reward scores)."""
        keep = [int(i) for i in ids.tolist() if int(i) not in self.fmt.special_ids and int(i) < self.fmt.text_vocab_size]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()

    def decode_images(self, image_ids: torch.Tensor) -> torch.Tensor:
        """Image-span token ids [B, span] (no masks) -> images [B, 3, H, W] in [0, 1].

        The span may hold structural positions (row newlines): the format drops them."""
        codes = self.fmt.span_codes(image_ids)
        if bool((codes < 0).any()):
            raise ValueError("image span holds non-image tokens (masks?): decode x̂0, not the revealed tokens")
        return self.image_tokenizer.decode(codes)


@dataclass
class ModelBundle(Codecs):
    policy: LLaDAModelLM | None = None

    def save(self, path: str | Path) -> None:
        self.policy.save_pretrained(Path(path))
        super().save(path)


def load_codecs(path: str | Path, named: dict[str, Any] | None = None) -> Codecs:
    """Tokenizer, format and image tokenizer of a model folder: ``pararl.json`` where it says, else
    detected from the folder's files (``pararl.detect``: a released -A or -M checkpoint as it is).
    ``named`` (``preset``, ``options``, ``image_tokenizer``: a run config's ``model_format``) overrides both."""
    from pararl.detect import detect

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load the text tokenizer: {err}") from err
    named = {k: v for k, v in (named or {}).items() if v}
    found = detect(path, tokenizer, **named)
    try:
        image_tokenizer = build_image_tokenizer(found.image_tokenizer)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build the image tokenizer {found.image_tokenizer}: {err}") from err
    check_image_tokenizer(found.fmt, image_tokenizer, path)
    return Codecs(tokenizer, found.fmt, image_tokenizer)


def check_image_tokenizer(fmt: FormatBase, image_tokenizer: ImageTokenizer, where: Path) -> None:
    """A codebook or grid that differs from the format's would decode garbage without an error."""
    if image_tokenizer.codebook_size != fmt.codebook_size or image_tokenizer.num_tokens != fmt.image_tokens:
        raise CheckpointError(
            f"{where}: the image tokenizer has {image_tokenizer.codebook_size} codes and {image_tokenizer.num_tokens} "
            f"tokens per image; format {fmt.name!r} has {fmt.codebook_size} codes and {fmt.image_tokens}"
        )


def load_bundle(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
                named: dict[str, Any] | None = None, policy: LLaDAModelLM | None = None) -> ModelBundle:
    """The folder's codecs with its policy, or with ``policy``: a model already in memory (a colocated
    learner's), so no second copy of the weights is read."""
    policy = policy if policy is not None else load_policy(path, dtype=dtype, device=device)
    codecs = load_codecs(path, named)
    if codecs.fmt.vocab_size > policy.config.output_size:
        raise CheckpointError(
            f"{path}: format {codecs.fmt.name!r} needs {codecs.fmt.vocab_size} ids, the policy has {policy.config.output_size}"
        )
    return ModelBundle(codecs.tokenizer, codecs.fmt, codecs.image_tokenizer, policy)
