"""The world as files: train and held-out JSONL records with PNG images, its tokenizer and format.

Records are exactly what ``pararl.data`` reads (prompt, task, input_image, output_image, output_text,
image paths relative to the JSONL), so the run loads the generated world through the same code as
any user's dataset. Images are named by their scene, so a scene used by many records is one file.
``world.json`` beside them keeps the spec and the settings that made them.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pararl.formats import WORLD_SPECIAL_TOKENS, ParallelFormat, world_format
from pararl.progress import progress as progress_bar
from pararl.snapshots import to_pil
from shapeworld.scene import EOS, Scene, WorldSpec, scene_key
from shapeworld.tasks import Example, sample_example

WORLD_FILE = "world.json"
TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"


@dataclass
class WorldConfig:
    spec: WorldSpec = field(default_factory=WorldSpec)
    train_size: int = 4000
    eval_size: int = 256
    edit_share: float = 0.5  # share of editing instructions (the rest: generation prompts)
    given: float = 0.5  # chance that a prompt names each attribute (colour, shape, cell) of an object
    seed: int = 0
    # shares of UniGRPO's tasks (t2i, understand, reason: shapeworld.questions); the rest is drawing and editing
    task_shares: dict = field(default_factory=dict)

    @property
    def questions(self) -> bool:
        return bool(self.task_shares)

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, fields: dict) -> "WorldConfig":
        return cls(**{"task_shares": {}, **fields, "spec": WorldSpec.from_dict(fields["spec"])})


def held_out(key: str, seed: int, share: float) -> bool:
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def make_splits(cfg: WorldConfig) -> tuple[list[Example], list[Example]]:
    """Deterministic from ``cfg.seed``. A request (task, prompt, input scene) belongs to one split
    by a hash of it, so the held-out prompts are never trained on; draws for a full split are skipped."""
    rng = random.Random(cfg.seed)
    share = cfg.eval_size / (cfg.train_size + cfg.eval_size)
    train: list[Example] = []
    held: list[Example] = []
    tries = 0
    while len(train) < cfg.train_size or len(held) < cfg.eval_size:
        tries += 1
        if tries > 200 * (cfg.train_size + cfg.eval_size) + 10_000:
            raise RuntimeError(f"the world cannot fill {cfg.train_size} train and {cfg.eval_size} held-out "
                               "requests: too few distinct prompts for these sizes")
        ex = sample_example(cfg.spec, rng, cfg.edit_share, cfg.given, cfg.task_shares)
        split = held if held_out(ex.key, cfg.seed, share) else train
        if len(split) < (cfg.eval_size if split is held else cfg.train_size):
            split.append(ex)
    return train, held


def world_tokenizer(spec: WorldSpec, questions: bool = False):
    """Word-level tokenizer: the format's specials (ids 0..7), then ``<eos>`` (text padding), then words."""
    from pararl.text_tokenizer import build_word_tokenizer

    return build_word_tokenizer(spec.words(questions), WORLD_SPECIAL_TOKENS + (EOS,))


def world_token_format(spec: WorldSpec, tokenizer) -> ParallelFormat:
    return world_format(len(tokenizer), spec.codebook_size, spec.image_tokens)


def _image_file(folder: Path, spec: WorldSpec, scene: Scene, codec) -> str:
    name = f"images/{hashlib.sha1(scene_key(scene).encode()).hexdigest()[:16]}.png"
    path = folder / name
    if not path.exists():
        img = codec.decode(spec.render(scene)[None])[0]
        to_pil(img, size=img.shape[-1]).save(path)
    return name


def write_world(folder: str | Path, cfg: WorldConfig, progress: bool = False) -> dict[str, Path]:
    """Write both splits as JSONL + PNGs into ``folder``; returns the paths (train, eval, world)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    spec, codec = cfg.spec, cfg.spec.codec()
    paths = {"train": folder / TRAIN_FILE, "eval": folder / EVAL_FILE, "world": folder / WORLD_FILE}
    splits = make_splits(cfg)
    bar = progress_bar(total=sum(map(len, splits)), desc="world", unit="record", enabled=progress)
    for name, examples in zip(("train", "eval"), splits):
        lines = []
        for ex in examples:
            bar.update()
            rec = {"prompt": ex.prompt, "task": ex.task,
                   "input_image": _image_file(folder, spec, ex.input, codec) if ex.input is not None else None,
                   "output_image": _image_file(folder, spec, ex.output, codec),
                   "output_text": ex.answer or spec.describe(ex.output)}
            if ex.answer is not None:
                rec["answer"] = ex.answer
            lines.append(json.dumps(rec))
        paths[name].write_text("\n".join(lines) + "\n")
    bar.close()
    paths["world"].write_text(json.dumps(cfg.to_dict(), indent=1))
    return paths


def load_world_config(folder: str | Path) -> WorldConfig:
    return WorldConfig.from_dict(json.loads((Path(folder) / WORLD_FILE).read_text()))
