"""The inputs of a plan: the config's token format, prompts of a stated length, and trajectories whose
shapes and step maps are those a run at the config's settings produces.

Nothing here depends on weights: the format comes from the model folder when it has a tokenizer (the
detection a run uses), or from the released preset and ``config.json`` alone. A trajectory's tokens
are valid ids of their spans and its step map follows the sampler's reveal plan (text: the planned
count at each step; image: spread evenly over the image updates), so trace replay runs the same
(trajectory, window) rows as on real rollouts. Memory and FLOPs depend on these shapes, not on values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pararl.batching import build_batch
from pararl.formats import FormatBase, mmada_m_format
from pararl.formats.dimoo import DimooFormat
from pararl.guidance import make_guidance
from pararl.tasks import TASKS
from pararl.types import GenerationRequest, Trajectories
from rollout.config import SamplerConfig, resolve_sampler
from rollout.schedules import reveal_plan

INSTRUCTION_TOKENS = 100  # a plan's prompt: this many instruction tokens, plus the format's template
A_TEMPLATE = (24, 3)  # -A's "<system>...</system><user>" and "</user>" pieces, in tokens, without its tokenizer
FILLER_ID = 1000  # a plain text id for the prompts a plan writes


def plan_format(preset: str | None, config: dict[str, Any], folder: Path | None) -> tuple[FormatBase, str]:
    """The format a run would detect when the folder has its tokenizer; else the preset's, sized by
    ``config.json`` (-A's template then has A_TEMPLATE's lengths)."""
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    if folder is not None and any((folder / f).is_file() for f in tokenizer_files):
        from transformers import AutoTokenizer

        from pararl.detect import detect

        detection = detect(folder, AutoTokenizer.from_pretrained(str(folder)))
        return detection.fmt, f"format {detection.fmt.name!r} detected in {folder}"
    if preset == "mmada-parallel-m" or config.get("model_type") == "mmada":
        offset = int(config.get("llm_vocab_size", 126464)) + int(config.get("num_new_special_tokens", 0))
        fmt = mmada_m_format(text_vocab_size=offset, codebook_size=int(config.get("codebook_size", 8192)),
                             image_tokens=int(config.get("num_vq_tokens", 1024)))
        return fmt, "format mmada-parallel-m from config.json (no tokenizer read)"
    if preset == "mmada-parallel-a":
        head, tail = A_TEMPLATE
        fmt = DimooFormat(
            name="mmada-parallel-a", mask_id=126336, pad_id=126339, uncond_id=126351, newline_id=126084, boi_id=126349,
            eoi_id=126350, answer_start_id=126354, answer_end_ids=(FILLER_ID + 1,), generate_prefix=(FILLER_ID,) * head,
            edit_prefix=(FILLER_ID,) * head, prompt_suffix=(FILLER_ID,) * tail, text_vocab_size=126356,
            image_offset=126356, codebook_size=8192, grid=(32, 32))
        return fmt, f"format mmada-parallel-a with a {head}+{tail}-token template (no tokenizer: pass the released folder)"
    raise ValueError(f"pararl plan knows the formats of the released presets; this config's is {preset!r} and its "
                     f"model folder has no tokenizer to detect one")


def requests(fmt: FormatBase, prompts: int, task: str = "edit") -> list[GenerationRequest]:
    """``prompts`` requests of one family; edits carry an input image of the format's size."""
    codes = torch.arange(fmt.image_tokens) % fmt.codebook_size if TASKS[task].input_image else None
    return [GenerationRequest([FILLER_ID] * INSTRUCTION_TOKENS, codes, seed=i, task=task) for i in range(prompts)]


def trajectories(fmt: FormatBase, sampler: SamplerConfig, reqs: list[GenerationRequest], group_size: int,
                 snapshot_steps: list[int]) -> Trajectories:
    """Finished trajectories of ``reqs`` x ``group_size`` on the host, as the sampler would return them."""
    cfg = resolve_sampler(sampler)
    g = make_guidance(cfg)
    batch = build_batch(fmt, reqs, cfg.text_len, cfg.cfg_drop_input_image, released_rows=bool(g.after_text))
    lay, rows = batch.layout, len(reqs) * group_size
    tokens = batch.input_ids.repeat_interleave(group_size, 0)
    step_map = torch.full_like(tokens, -1)
    masked = tokens == fmt.mask_id
    text_cols = torch.arange(lay.text.start, lay.text.stop)
    image_cols = torch.arange(lay.image.start, lay.image.stop)[masked[0, lay.image]]
    plan = reveal_plan(cfg, len(image_cols) and fmt.image_tokens, lay.text.stop - lay.text.start)
    text_steps = torch.repeat_interleave(torch.arange(cfg.steps), torch.tensor(plan.text_reveal))
    updates = torch.tensor([s for s in range(cfg.steps) if plan.image_update[s]], dtype=torch.long)
    step_map[:, text_cols[: len(text_steps)]] = text_steps
    if len(image_cols):
        step_map[:, image_cols] = updates[torch.arange(len(image_cols)) * len(updates) // len(image_cols)]
    tokens[:, text_cols] = FILLER_ID
    tokens[:, image_cols] = fmt.image_offset + torch.arange(len(image_cols)) % fmt.codebook_size
    out = tokens[:, lay.output]
    snaps = torch.tensor(snapshot_steps, dtype=torch.long)
    both = (batch.uncond_ids, batch.uncond_image_ids)
    unconditional = ([batch.uncond_ids] if g.with_cond else []) + [both[i] for i in g.after_text]
    return Trajectories(
        tokens=tokens, attention_mask=batch.attention_mask.repeat_interleave(group_size, 0), step_map=step_map,
        prompt_index=torch.arange(len(reqs)).repeat_interleave(group_size), member=torch.arange(group_size).repeat(len(reqs)),
        seeds=torch.arange(rows), layout=lay, steps=cfg.steps, snapshot_steps=snaps,
        snapshot_tokens=out[:, None].repeat(1, len(snaps), 1), snapshot_x0=out[:, None].repeat(1, len(snaps), 1),
        sampled_logp=torch.zeros(out.shape), policy_logp=None,
        guidance_rows=torch.stack([u.repeat_interleave(group_size, 0) for u in unconditional], 1) if unconditional else None,
    )
