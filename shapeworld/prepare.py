"""Everything the default run needs before ParaRL starts, built once into a cache folder.

Three stages, each in its own subfolder: the world (JSONL + PNGs), the SFT warm-up (a model bundle),
and the CLIP reward (open_clip config + weights, the reward statistics over the training data and a
check that held-out matched pairs outscore mismatched ones). A stage is built in a temporary folder
whose ``DONE.json`` marker is written last, then renamed into place, so a crash never leaves a stage
that looks complete. The marker records a fingerprint of the stage's settings, of the code that builds
it (``pararl.provenance``) and of the stages it was built from: a second call with the same settings
and code skips the stage; other settings, or changed code, rebuild it.

The preparation runs with a fixed number of torch threads (``PrepareConfig.threads``): a reduction
split over another number of threads rounds differently, and after thousands of SFT steps the warm-up
would differ with the machine's core count.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from learner.sft import SFTConfig
from pararl.errors import ConfigError
from pararl.files import atomic_folder
from pararl.provenance import code_version
from reward.train_clip import ClipTrainConfig
from shapeworld.dataset import EVAL_FILE, TRAIN_FILE, WorldConfig
from shapeworld.scene import EOS, WorldSpec

MARKER = "DONE.json"
REWARD_LABEL = "clip"  # the label of the CLIP reward model in RewardConfig.models (and in the stats file)
# The modules each stage runs (their project imports are followed); this module builds all three.
STAGE_CODE = {"world": ("shapeworld.dataset", __name__),
              "policy": ("learner.sft", "pararl.models", __name__),
              "clip": ("reward.train_clip", "reward.clip_models", "reward.stats", "pararl.data", __name__)}


@dataclass
class PolicyArch:
    """The warm-up policy's LLaDA architecture (vocabulary sizes come from the world's format)."""

    d_model: int = 128
    n_heads: int = 8  # head_dim 16: more heads learned the image layout far faster than 4 in the warm-up budget
    n_layers: int = 4
    mlp_hidden_size: int = 336
    rope_theta: float = 1000.0  # sequences are ~60 tokens; LLaDA's 500000 leaves most frequencies unused here
    # LLaDA's 0.02 suits d_model 4096; at d_model 128 it leaves attention logits near zero and the
    # warm-up never learns to read the prompt in its budget. About 1/sqrt(d_model).
    init_std: float = 0.088


@dataclass
class PrepareConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    policy: PolicyArch = field(default_factory=PolicyArch)
    sft: SFTConfig = field(default_factory=SFTConfig)
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)
    stats_batch: int = 256
    stats_texts: str = "partial"  # reward.stats_texts (reward/stats.py says why); the default run passes its own
    threads: int = 2  # torch threads for every stage, whatever the machine's core count


def writes_both(record) -> bool:
    from pararl.tasks import TASKS

    return TASKS[record.task].writes_image and TASKS[record.task].writes_text


def stage_code(stage: str) -> str:
    """The code version of a stage (a hash of its source files)."""
    return code_version(STAGE_CODE[stage])


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(folder: Path, key: str) -> dict | None:
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    return meta if meta.get("fingerprint") == key else None


def _stage(folder: Path, key: str, build, log) -> tuple[dict, bool]:
    """(marker contents, built?) of a stage: skip it when complete with this fingerprint, else build it."""
    meta = _done(folder, key)
    if meta is not None:
        log(f"{folder.name}: complete, skipped ({MARKER} {key})")
        return meta, False
    start = time.perf_counter()
    with atomic_folder(folder) as tmp:
        info = build(tmp)
        meta = {"fingerprint": key, "seconds": round(time.perf_counter() - start, 2), **info}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1, default=str))
    log(f"{folder.name}: built in {meta['seconds']:.1f}s")
    return meta, True


def default_config(seed: int = 0) -> PrepareConfig:
    cfg = PrepareConfig()
    return replace(cfg, world=replace(cfg.world, seed=seed), sft=replace(cfg.sft, seed=seed), clip=replace(cfg.clip, seed=seed))


def prepare_default(cache_dir: str | Path, seed: int = 0, cfg: PrepareConfig | None = None, progress: bool = True,
                    log=print) -> dict[str, Any]:
    """Build (or find) the world, the warm-up policy and the CLIP reward in ``cache_dir``.

    Returns the paths a run config needs (``train``, ``eval``, ``model``, ``codes``, ``reward_stats``,
    ``clip_kwargs`` for ``RewardConfig.models['clip'].kwargs``), ``built``: the stages built by this
    call (empty when everything was cached), and the stages' figures.
    """
    cfg = cfg or default_config(seed)
    if cfg.threads < 1:
        raise ConfigError(f"the preparation's threads must be at least 1, got {cfg.threads}")
    with torch_threads(cfg.threads):
        return _prepare(Path(cache_dir), cfg, progress, log)


def _prepare(cache: Path, cfg: PrepareConfig, progress: bool, log) -> dict[str, Any]:
    from pararl.bundle import Codecs
    from pararl.data import CodeCache, read_records
    from shapeworld.dataset import world_token_format, world_tokenizer, write_world

    cache.mkdir(parents=True, exist_ok=True)
    spec: WorldSpec = cfg.world.spec
    codes_dir = cache / "codes"
    built = []

    world_key = fingerprint("world", cfg.world.to_dict(), stage_code("world"))
    world_meta, b = _stage(cache / "world", world_key,
                           lambda tmp: {"records": {k: str(v.name) for k, v in write_world(tmp, cfg.world, progress).items()}},
                           log)
    built += ["world"] if b else []
    data = cache / "world"
    train_records = read_records(data / TRAIN_FILE)
    eval_records = read_records(data / EVAL_FILE)

    tokenizer = world_tokenizer(spec, cfg.world.questions)
    # the CLIP reward learns the pairs of image and reasoning text (a question's answer is no description)
    paired_records = [r for r in train_records if writes_both(r)]
    codecs = Codecs(tokenizer, world_token_format(spec, tokenizer), spec.codec())

    def build_policy_stage(tmp: Path) -> dict:
        from learner.sft import train_sft
        from pararl.models import LLaDAConfig

        fmt = codecs.fmt
        arch = LLaDAConfig(vocab_size=fmt.vocab_size, embedding_size=fmt.vocab_size, mask_token_id=fmt.mask_id,
                           max_sequence_length=512, **asdict(cfg.policy))
        figures = train_sft(tmp, train_records, codecs, arch, cfg.sft, spec.text_len, codes_dir, EOS, progress)
        (tmp / "world.json").write_text(json.dumps(cfg.world.to_dict(), indent=1))  # which world it speaks
        return figures

    policy_key = fingerprint("policy", world_key, asdict(cfg.policy), asdict(cfg.sft), cfg.threads,
                             stage_code("policy"))
    policy_meta, b = _stage(cache / "policy", policy_key, build_policy_stage, log)
    built += ["policy"] if b else []

    def build_clip_stage(tmp: Path) -> dict:
        from reward.clip_models import OpenClipReward
        from reward.stats import compute_stats, reference_batches, save_stats
        from reward.train_clip import separation, train_clip
        from shapeworld.tasks import mismatched_description

        code_cache = CodeCache(codes_dir, codecs.image_tokenizer)
        pairs = {}
        for rec in paired_records:  # distinct (image, text) pairs: a pair is never its own negative
            pairs.setdefault(rec.output_text, rec.output_image)
        texts = sorted(pairs)
        images = codecs.image_tokenizer.decode(torch.stack([code_cache.codes(pairs[t]) for t in texts]))
        result = train_clip(tmp, images, texts, cfg.clip, progress)
        model = OpenClipReward(**result["kwargs"])
        batches = reference_batches(paired_records, code_cache, cfg.stats_batch, cfg.stats_texts, cfg.clip.seed)
        stats = compute_stats(model, batches, total=len(paired_records), desc="reward stats")
        save_stats(tmp / "reward_stats.json", {REWARD_LABEL: stats})
        rng = random.Random(cfg.clip.seed)
        held = [r for r in eval_records if r.output_text and writes_both(r)]
        held_codes = torch.stack([code_cache.codes(r.output_image) for r in held])
        negatives = [mismatched_description(spec, spec.parse_image(c).objects, rng) for c in held_codes]
        check = separation(model, codecs.image_tokenizer.decode(held_codes), [r.output_text for r in held], negatives)
        shuffled = [held[(i + 1) % len(held)].output_text for i in range(len(held))]
        check_random = separation(model, codecs.image_tokenizer.decode(held_codes), [r.output_text for r in held], shuffled)
        return {"clip_loss": result["loss"], "pairs": result["pairs"], "stats": asdict(stats),
                "heldout_one_attribute_changed": check, "heldout_other_text": check_random,
                "kwargs_files": {"config_file": Path(result["kwargs"]["config_file"]).name,
                                 "pretrained": Path(result["kwargs"]["pretrained"]).name}}

    clip_key = fingerprint("clip", world_key, asdict(cfg.clip), cfg.stats_batch, cfg.stats_texts, cfg.threads,
                           stage_code("clip"))
    clip_meta, b = _stage(cache / "clip", clip_key, build_clip_stage, log)
    built += ["clip"] if b else []
    clip_dir = cache / "clip"
    return {
        "cache_dir": str(cache),
        "train": str(data / TRAIN_FILE),
        "eval": str(data / EVAL_FILE),
        "world": str(data / "world.json"),
        "codes": str(codes_dir),
        "model": str(cache / "policy"),
        "reward_label": REWARD_LABEL,
        "clip_kwargs": {"model": cfg.clip.name, "config_file": str(clip_dir / clip_meta["kwargs_files"]["config_file"]),
                        "pretrained": str(clip_dir / clip_meta["kwargs_files"]["pretrained"])},
        "reward_stats": str(clip_dir / "reward_stats.json"),
        "text_len": spec.text_len,
        "built": built,
        "stages": {"world": world_meta, "policy": policy_meta, "clip": clip_meta},
    }
