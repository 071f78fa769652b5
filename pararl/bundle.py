"""A model folder as a user brings it: policy weights, text tokenizer, token format, image tokenizer.

``config.json`` + safetensors hold the policy (LLaDA layout), the tokenizer files sit beside them as in
any hub checkpoint, and ``pararl.json`` records what a LLaDA checkpoint cannot say about itself: its
token format and the image tokenizer that turns its codes into pixels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pararl.formats import ParallelFormat
from pararl.image_tokenizers import ImageTokenizer, build_image_tokenizer
from pararl.models import CheckpointError, LLaDAModelLM, load_policy

BUNDLE_FILE = "pararl.json"


@dataclass
class ModelBundle:
    policy: LLaDAModelLM
    tokenizer: PreTrainedTokenizerBase
    fmt: ParallelFormat
    image_tokenizer: ImageTokenizer

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        meta = {"format": self.fmt.to_dict(), "image_tokenizer": self.image_tokenizer.spec()}
        (path / BUNDLE_FILE).write_text(json.dumps(meta, indent=1))

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids: torch.Tensor) -> str:
        """Text of revealed ids: masks and other specials dropped (what the reward scores)."""
        keep = [int(i) for i in ids.tolist() if int(i) not in self.fmt.special_ids and int(i) < self.fmt.text_vocab_size]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()


def load_bundle(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> ModelBundle:
    path = Path(path)
    policy = load_policy(path, dtype=dtype, device=device)
    meta_file = path / BUNDLE_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} has no {BUNDLE_FILE}: its token format and image tokenizer are unknown")
    meta = json.loads(meta_file.read_text())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot load the text tokenizer: {err}") from err
    fmt = ParallelFormat.from_dict(meta["format"])
    if fmt.vocab_size > policy.config.output_size:
        raise CheckpointError(
            f"{path}: format {fmt.name!r} needs {fmt.vocab_size} ids, the policy has {policy.config.output_size}"
        )
    return ModelBundle(policy, tokenizer, fmt, build_image_tokenizer(meta["image_tokenizer"]))
