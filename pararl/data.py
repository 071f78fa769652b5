"""Prompt datasets: JSONL records of prompt, task, optional input image and reference output.

Images are turned into codes once and cached next to the dataset (keyed by the image tokenizer), so
neither the driver nor the reward statistics re-encode pixels every epoch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from pararl.errors import ConfigError, DataError
from pararl.image_tokenizers import ImageTokenizer
from pararl.seeds import EPOCH_STRIDE, derive
from pararl.tasks import TASKS


@dataclass
class Record:
    """One prompt. ``task`` names its family (``pararl.tasks``); ``answer`` is the reference a verifiable
    reward checks the final text against (understanding, reasoning)."""

    prompt: str
    task: str = "generate"
    input_image: str | None = None
    output_image: str | None = None
    output_text: str | None = None
    answer: str | None = None


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            rec = Record(**fields)
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{path}:{n}: not a dataset record ({err})") from err
        if rec.task not in TASKS:
            raise DataError(f"{path}:{n}: task {rec.task!r} is not one of {', '.join(TASKS.names())}")
        if TASKS[rec.task].input_image != bool(rec.input_image):
            need = "needs input_image" if TASKS[rec.task].input_image else "takes no input_image"
            raise DataError(f"{path}:{n}: a {rec.task} record {need}")
        if not rec.prompt.strip():
            raise DataError(f"{path}:{n}: empty prompt")
        for name in ("input_image", "output_image"):
            value = getattr(rec, name)
            if value and not Path(value).is_absolute():
                setattr(rec, name, str(path.parent / value))
        records.append(rec)
    if not records:
        raise DataError(f"dataset {path} has no records")
    return records


def check_images(records: list[Record], size: tuple[int, int], source: str | Path) -> int:
    """Every image the records name exists, opens and has the image tokenizer's size; returns how many.

    Found now, from each file's header, not when a bad record is first drawn (minutes or never into a
    run, on an actor). The error counts the bad images and names the first ones.
    """
    problems, seen = [], set()
    for rec in records:
        for path in (rec.input_image, rec.output_image):
            if not path or path in seen:
                continue
            seen.add(path)
            try:
                with Image.open(path) as img:
                    if (img.height, img.width) != tuple(size):
                        problems.append(f"{path} is {img.width}x{img.height}")
            except (OSError, ValueError) as err:  # missing, unreadable or not an image
                problems.append(f"{path}: {type(err).__name__}: {err}")
    if problems:
        raise DataError(f"{len(problems)} of {len(seen)} images named by {source} cannot be used (the image tokenizer "
                        f"needs {size[1]}x{size[0]}): {'; '.join(problems[:3])}" + ("; ..." if len(problems) > 3 else ""))
    return len(seen)


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    img = Image.open(path).convert("RGB")
    if (img.height, img.width) != tuple(size):
        raise DataError(f"image {path} is {img.width}x{img.height}; the image tokenizer needs {size[1]}x{size[0]}")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


class CodeCache:
    """Codes of image files, computed once per (file contents, image tokenizer) and kept on disk."""

    def __init__(self, folder: str | Path, tokenizer: ImageTokenizer) -> None:
        self.folder = Path(folder)
        self.tokenizer = tokenizer
        self.tag = hashlib.sha256(json.dumps(tokenizer.spec(), sort_keys=True).encode()).hexdigest()[:12]

    def codes(self, path: str | Path) -> torch.Tensor:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20] if Path(path).is_file() else None
        if digest is None:
            raise FileNotFoundError(f"image {path} does not exist")
        cached = self.folder / self.tag / f"{digest}.pt"
        if cached.is_file():
            return torch.load(cached)
        codes = self.tokenizer.encode(load_image(path, self.tokenizer.image_size)[None])[0]
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        torch.save(codes, tmp)
        tmp.replace(cached)
        return codes


def reference_pairs(records: list[Record], cache: CodeCache, batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(output image as the reward service sees it, i.e. decoded from its codes; reasoning text) batches."""
    usable = [r for r in records if r.output_image and r.output_text]
    if not usable:
        raise DataError("the dataset has no records with output_image and output_text: reward stats need them")
    for i in range(0, len(usable), batch):
        part = usable[i : i + batch]
        codes = torch.stack([cache.codes(r.output_image) for r in part])
        yield cache.tokenizer.decode(codes), [r.output_text for r in part]


class PromptSource:
    """Batches of generation requests in a fixed, seeded order; ``position`` is what a checkpoint saves.

    The order is a seeded permutation per epoch, so a resumed run continues with exactly the prompts
    it would have seen, and each request's sampling seed derives from (run seed, position). Records of
    task families with different outputs never share a step (a sampler call writes one layout): with
    several families, consecutive steps of ``step_size`` prompts take them in turn, each family in its
    own seeded order, and a position still names one request.
    """

    def __init__(self, records: list[Record], encode_text, cache: CodeCache, seed: int, step_size: int = 0) -> None:
        self.records, self.encode_text, self.cache, self.seed = records, encode_text, cache, seed
        self.position = 0
        by_family: dict[tuple[str, ...], list[int]] = {}
        for i, rec in enumerate(records):
            by_family.setdefault(TASKS[rec.task].outputs, []).append(i)
        self.families = [by_family[k] for k in sorted(by_family)]
        if len(self.families) > 1 and step_size < 1:
            raise ConfigError(f"the dataset mixes task families {sorted(by_family)}: steps take them in turn, "
                              "which needs the step's prompt count (step_size)")
        self.step_size = step_size

    def _index(self, position: int) -> int:
        family, position = self._family_position(position)
        epoch, offset = divmod(position, len(family))
        stream = epoch if len(self.families) == 1 else epoch * len(self.families) + self.families.index(family)
        order = torch.randperm(len(family), generator=torch.Generator().manual_seed(derive(self.seed, stream, EPOCH_STRIDE)))
        return family[int(order[offset])]

    def _family_position(self, position: int) -> tuple[list[int], int]:
        """(the family a position draws from, the position within that family's own order)."""
        if len(self.families) == 1:
            return self.families[0], position
        step, offset = divmod(position, self.step_size)
        turn, f = divmod(step, len(self.families))
        return self.families[f], turn * self.step_size + offset

    def record(self, position: int) -> Record:
        return self.records[self._index(position)]

    def request(self, position: int):
        from pararl.types import GenerationRequest

        rec = self.record(position)
        codes = self.cache.codes(rec.input_image) if rec.input_image else None
        return GenerationRequest(self.encode_text(rec.prompt), codes, seed=derive(self.seed, position), task=rec.task)

    def next_batch(self, size: int) -> list:
        batch = [self.request(self.position + i) for i in range(size)]
        self.position += size
        return batch
