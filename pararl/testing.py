"""Tiny checkpoints in the on-disk layout of the released MMaDA-Parallel models, built in code, for
the tests and the benchmarks (no weights can be downloaded there; ``reward.testing`` does the same
for reward models).

Random weights and a tiny width, but the real key names, the real config fields and the real token
ids (the vocabulary is full size: 126464 text ids + 8192 image codes), a tokenizer saved in the
folder with the special tokens at their ids, and the image tokenizer where the release keeps it
(-A: a diffusers ``VQModel`` in ``vqvae/``). Loading them runs the same code a real checkpoint runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pararl.formats import DIMOO_EDIT_INSTRUCTION, DIMOO_GENERATE_INSTRUCTION
from pararl.models import LLaDAConfig, build_policy

LLADA_VOCAB = 126464  # LLaDA's text vocabulary (the -M image offset)
MMADA_VOCAB = 134656  # 126464 + 8192: the embedding rows of both released variants' checkpoints here
WORDS = ("a red square in the top left make circle blue add green triangle an image of cat and dog "
         "the picture shows because so it is now there".split())

# Ids fixed by the released code (facts file); the template markup ids are this test's choice.
A_SPECIALS = {
    "<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336, "<|pad|>": 126339,
    "<newline>": 126084, "<boi>": 126349, "<eoi>": 126350, "<uncondition>": 126351,
    "<answer>": 126354, "</answer>": 126355,
    "<system>": 126340, "</system>": 126341, "<user>": 126342, "</user>": 126343,
}
M_SPECIALS = {
    "<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
    "<|soi|>": 126084, "<|eoi|>": 126085, "<|t2i|>": 126088, "<|mmu|>": 126089,
    "<|interleave|>": 126095, "<|t2it|>": 126096,
}


def id_tokenizer(specials: dict[str, int], words=WORDS, extra_text=(), size: int = LLADA_VOCAB,
                 bos: str | None = "<|startoftext|>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``size`` ids: the specials at their given ids, the words below them,
    fillers elsewhere (so ``len(tokenizer) == size`` as in the real one); it prepends BOS like LLaDA's."""
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    pieces = set(words)
    for text in extra_text:
        pieces |= {p for p, _ in splitter.pre_tokenize_str(text)}
    taken = set(specials.values())
    free = (i for i in range(size) if i not in taken)
    vocab = {w: next(free) for w in sorted(pieces - set(specials))}
    vocab["<unk>"] = next(free)
    vocab.update(specials)
    used = set(vocab.values())
    vocab.update({f"<r{i}>": i for i in range(size) if i not in used})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = splitter
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token="<|endoftext|>",
                                   mask_token="<|mdm_mask|>")
    fast.add_special_tokens({"additional_special_tokens": sorted(specials, key=specials.get)})
    return fast


def tiny_llada_fields(**overrides) -> dict:
    fields = dict(d_model=16, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=32, rope_theta=500000.0,
                  vocab_size=LLADA_VOCAB, embedding_size=MMADA_VOCAB, weight_tying=False, mask_token_id=126336,
                  max_sequence_length=4096)
    fields.update(overrides)
    return fields


def write_policy(folder: Path, fields: dict, seed: int = 0, extra_config: dict | None = None) -> None:
    """Sharded safetensors + index + config.json, as the released checkpoints are stored."""
    model = build_policy(LLaDAConfig(**fields), seed=seed)
    model.save_pretrained(folder, max_shard_size="8MB")
    if extra_config:
        config_file = folder / "config.json"
        config = json.loads(config_file.read_text()) | extra_config
        config_file.write_text(json.dumps(config, indent=1))


def tiny_vqmodel(codebook: int = 8192, lookup_from_codebook: bool = False, seed: int = 0):
    """A diffusers VQModel with downsampling 2 (two blocks): an 8x8 image is a 4x4 grid of codes."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, num_vq_embeddings=codebook, norm_num_groups=4, vq_embed_dim=4, sample_size=8,
        lookup_from_codebook=lookup_from_codebook,
    ).eval()


def a_tokenizer() -> PreTrainedTokenizerFast:
    return id_tokenizer(A_SPECIALS, extra_text=(DIMOO_GENERATE_INSTRUCTION, DIMOO_EDIT_INSTRUCTION))


def write_a_checkpoint(folder: Path, grid: int = 4, seed: int = 0) -> Path:
    """-A: model_type ``llada`` (LLaDAForMultiModalGeneration), tokenizer, ``vqvae/`` VQModel.

    The released -A images are 32x32 tokens; this one records a 4x4 grid in ``pararl.json`` (all
    else is detected from the files)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_policy(folder, tiny_llada_fields(), seed, {"architectures": ["LLaDAForMultiModalGeneration"]})
    a_tokenizer().save_pretrained(folder)
    tiny_vqmodel(seed=seed).save_pretrained(folder / "vqvae")
    (folder / "pararl.json").write_text(json.dumps({"format": {"preset": "mmada-parallel-a", "grid": [grid, grid]}}))
    return folder


def tiny_magvit2(seed: int = 0):
    """MAGVIT-v2 with the released structure at a tiny width: 13-bit LFQ (8192 codes), downsampling 2."""
    from pararl.image_tokenizers.magvit2 import MagvitConfig, MagvitV2

    torch.manual_seed(seed)
    cfg = MagvitConfig(ch=32, encoder_ch_mult=(1, 2), encoder_res_blocks=(1, 1), decoder_ch_mult=(1, 2),
                       decoder_res_blocks=(1, 1), resolution=8)
    return MagvitV2(cfg).eval()


def write_m_checkpoint(folder: Path, image_tokens: int = 16, seed: int = 0, magvit: bool = True) -> Path:
    """-M: model_type ``mmada`` with LLaDA's fields plus MMaDA's vocabulary fields, and a tokenizer.

    The released -M folder ships no image tokenizer (MAGVIT-v2 is a separate download): with
    ``magvit`` a tiny one is put where detection looks for it, ``magvitv2/``."""
    folder.mkdir(parents=True, exist_ok=True)
    mmada = {"model_type": "mmada", "architectures": ["MMadaModelLM"], "llm_vocab_size": LLADA_VOCAB,
             "codebook_size": 8192, "num_vq_tokens": image_tokens, "num_new_special_tokens": 0,
             "new_vocab_size": MMADA_VOCAB}
    write_policy(folder, tiny_llada_fields(vocab_size=MMADA_VOCAB), seed, mmada)
    id_tokenizer(M_SPECIALS).save_pretrained(folder)
    if magvit:
        from pararl.image_tokenizers.magvit2 import save_magvit2

        save_magvit2(tiny_magvit2(seed), folder / "magvitv2")
    return folder

# The repository's 8B run configs (paths from its root): what ``pararl plan`` is run on by the suite and bench/plan.py.
PLAN_8B_CONFIGS = ("configs/mmada-parallel-a-8b.yaml", "configs/mmada-parallel-a-8b-colocated.yaml",
                   "configs/mmada-parallel-m-8b.yaml", "configs/mmada-parallel-m-8b-colocated.yaml",
                   "configs/mmada-8b-unigrpo.yaml")


def write_8b_config(folder: Path, preset: str) -> Path:
    """``folder/config.json`` of an 8B MMaDA-Parallel policy (LLaDA-8B, 134,656 ids) in the layout the
    preset's release uses: what ``pararl plan`` reads, no weights."""
    from pararl.models import llada_8b_config

    fields = llada_8b_config(embedding_size=134656).to_dict()
    if preset == "mmada-parallel-m":
        fields.update(model_type="mmada", llm_vocab_size=126464, num_new_special_tokens=0, codebook_size=8192,
                      num_vq_tokens=1024, new_vocab_size=134656)
    else:
        fields.update(model_type="llada", architectures=["LLaDAForMultiModalGeneration"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields, indent=1))
    return folder
