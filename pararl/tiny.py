"""A tiny world-format model built in code: random weights, a word tokenizer and a palette image codec,
saved and loaded back through the real loading path. The tests, the benchmarks and the fault soak run
it where no weights can be downloaded."""
from __future__ import annotations

from pathlib import Path

from pararl.formats import ParallelFormat, world_format
from pararl.models import LLaDAConfig, build_policy, load_policy

TEXT_VOCAB = 40
CODEBOOK = 8
IMAGE_TOKENS = 16


def tiny_format() -> ParallelFormat:
    return world_format(TEXT_VOCAB, CODEBOOK, IMAGE_TOKENS)


def tiny_config(fmt: ParallelFormat | None = None, **overrides) -> LLaDAConfig:
    fmt = fmt or tiny_format()
    fields = dict(
        d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, rope_theta=10000.0,
        vocab_size=fmt.vocab_size, embedding_size=fmt.vocab_size + 4, weight_tying=False,
        mask_token_id=fmt.mask_id, max_sequence_length=256,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def tiny_policy(tmp_path: Path, seed: int = 0, **overrides):
    """Build, save and load back through ``load_policy``: tests exercise the real checkpoint path."""
    model = build_policy(tiny_config(**overrides), seed=seed)
    folder = tmp_path / f"policy-{seed}"
    model.save_pretrained(folder)
    return load_policy(folder)


WORDS = "a an the red green blue yellow square circle triangle top bottom left right add make is there".split()


def tiny_bundle(tmp_path: Path, seed: int = 0):
    """A complete model folder (policy, tokenizer, format, palette codec), saved and loaded back."""
    from pararl.bundle import ModelBundle, load_bundle
    from pararl.formats import world_format
    from pararl.image_tokenizers import PaletteCodec
    from pararl.text_tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(WORDS)
    fmt = world_format(len(tok), CODEBOOK, IMAGE_TOKENS)
    policy = build_policy(tiny_config(fmt), seed=seed)
    folder = tmp_path / f"bundle-{seed}"
    ModelBundle(tok, fmt, PaletteCodec(grid=(4, 4), patch=8, codebook_size=CODEBOOK), policy).save(folder)
    return folder, load_bundle(folder)


