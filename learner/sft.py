"""SFT warm-up of a parallel text+image policy: the MMaDA-Parallel masked-token recipe.

Per sample a mask ratio t ~ U(0, 1] masks each output position (image span and text span) with
probability t; the loss is the cross-entropy of the masked positions, text tokens weighted 1/t (the
masked-diffusion ELBO) and image tokens 1 (the -M code), over the output's length. A share of the
samples has its prompt replaced by the unconditional token (the same rows ``pararl.batching``
builds for CFG), so the policy also learns the unconditional model that guidance subtracts.
Logits are restricted per span exactly as the sampler and the learner restrict them.

It runs on the learner's DeepSpeed engine (``learner.engine.build_engine``) in one process. The
warm-up of the default run is short on purpose: ParaRL needs a policy whose text and image agree
often, not always.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from learner.config import LearnerConfig
from learner.engine import build_engine, init_distributed
from pararl.batching import build_batch
from pararl.bundle import Codecs, ModelBundle
from pararl.data import CodeCache, Record
from pararl.errors import ConfigError, DataError
from pararl.formats import OutputLayout, ParallelFormat
from pararl.heads import span_forward
from pararl.models import LLaDAConfig, build_policy
from pararl.net import free_port
from pararl.progress import progress as progress_bar
from pararl.tasks import TASKS
from pararl.types import GenerationRequest


@dataclass
class SFTConfig:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompt_dropout: float = 0.1  # share of samples trained unconditionally (CFG)
    min_mask_ratio: float = 1e-3  # t ~ U(min, 1]: 1/t stays bounded (LLaDA's eps)
    # "shared": one t for both spans (the -M recipe); "independent": one t per span. The sampler reveals
    # text linearly and the image on a cosine, so mid-trajectory states mix a mostly masked image with a
    # mostly revealed text (and the reverse); independent ratios train on such states too.
    span_ratios: str = "independent"
    zero_stage: int = 0
    seed: int = 0


@dataclass
class Bucket:
    """Records of one task as one left-padded tensor (similar prompt lengths: little padding)."""

    ids: torch.Tensor  # [n, L] conditional rows, output spans holding the targets
    uncond: torch.Tensor  # [n, L] the same with the prompt blanked
    attention_mask: torch.Tensor  # [n, L]
    layout: OutputLayout

    def __len__(self) -> int:
        return self.ids.shape[0]


def text_targets(codecs: Codecs, texts: Sequence[str], text_len: int, pad_token: str) -> torch.Tensor:
    """Text ids padded to ``text_len`` with ``pad_token`` (a token the text span may draw, e.g. EOS)."""
    pad = codecs.tokenizer.convert_tokens_to_ids(pad_token)
    if pad is None or pad == codecs.tokenizer.unk_token_id or pad in codecs.fmt.special_ids:
        raise ConfigError(f"text padding token {pad_token!r} must be a tokenizer token outside the format's specials")
    rows = []
    for text in texts:
        ids = codecs.encode_text(text)
        if len(ids) > text_len:
            raise DataError(f"output text of {len(ids)} tokens exceeds text_len {text_len}: {text!r}")
        rows.append(ids + [pad] * (text_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def encode_records(records: Sequence[Record], codecs: Codecs, cache: CodeCache, text_len: int,
                   pad_token: str = "<eos>") -> list[Bucket]:
    """One bucket per task: prompt (and input image), then the target output: the image and the text
    of the spans the task writes (``pararl.tasks``)."""
    fmt = codecs.fmt
    buckets = []
    for task in sorted({r.task for r in records}):
        part = [r for r in records if r.task == task]
        kind = TASKS[task]
        missing = [r.prompt for r in part if (kind.writes_image and not r.output_image) or (kind.writes_text and not r.output_text)]
        if missing:
            need = " and ".join(f for f, w in (("output_image", kind.writes_image), ("output_text", kind.writes_text)) if w)
            raise DataError(f"SFT of {task} records needs {need}; missing for e.g. {missing[0]!r}")
        requests = [GenerationRequest(codecs.encode_text(r.prompt),
                                      cache.codes(r.input_image) if r.input_image else None, task=task) for r in part]
        batch = build_batch(fmt, requests, text_len)
        lay = batch.layout
        image = fmt.image_ids(torch.stack([cache.codes(r.output_image) for r in part])) if kind.writes_image else None
        text = text_targets(codecs, [r.output_text for r in part], text_len, pad_token) if kind.writes_text else None
        for t in (batch.input_ids, batch.uncond_ids):
            if image is not None:
                t[:, lay.image] = image
            if text is not None:
                t[:, lay.text] = text
        buckets.append(Bucket(batch.input_ids, batch.uncond_ids, batch.attention_mask, lay))
    return buckets


def masked_loss(model: torch.nn.Module, fmt: ParallelFormat, bucket: Bucket, rows: torch.Tensor, uncond: torch.Tensor,
                t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of ``rows`` of a bucket: ``uncond`` [B] bool picks CFG rows, ``t`` [B, 2] the mask ratios of
    the image and the text span, ``u`` [B, N_out] uniforms that decide the masked positions (masked where
    u < t of the position's span)."""
    lay = bucket.layout
    target = torch.where(uncond[:, None], bucket.uncond[rows], bucket.ids[rows])
    attn = bucket.attention_mask[rows]
    img, txt = lay.image, lay.text
    n_img, n_txt = img.stop - img.start, txt.stop - txt.start
    # [B, n_img + n_txt]: image span then text span. A row that masks nothing adds 0: forcing a masked
    # token there would give it weight 1/t (huge at small t) and bias the estimate.
    m_img, m_txt = u[:, :n_img] < t[:, :1], u[:, n_img:] < t[:, 1:]
    inputs = target.clone()
    inputs[:, img] = inputs[:, img].masked_fill(m_img, fmt.mask_id)
    inputs[:, txt] = inputs[:, txt].masked_fill(m_txt, fmt.mask_id)
    txt_logits, img_logits = span_forward(model, fmt, lay, inputs, None if bool(attn.all()) else attn)
    img_lp = img_logits.float().log_softmax(-1)
    txt_lp = fmt.restrict_text_logits(txt_logits).float().log_softmax(-1)
    ce_img = -img_lp.gather(-1, (target[:, img] - fmt.image_offset)[..., None]).squeeze(-1)
    ce_txt = -txt_lp.gather(-1, target[:, txt][..., None]).squeeze(-1)
    per_row = ((ce_img * m_img).sum(1) + (ce_txt * m_txt).sum(1) / t[:, 1]) / (n_img + n_txt)
    with torch.no_grad():
        stats = {
            "image_ce": float((ce_img * m_img).sum() / m_img.sum().clamp_min(1)),
            "text_ce": float((ce_txt * m_txt).sum() / m_txt.sum().clamp_min(1)),
        }
    return per_row.mean(), stats


def draw(rng: torch.Generator, bucket: Bucket, size: int, cfg: SFTConfig) -> tuple[torch.Tensor, ...]:
    lay = bucket.layout
    n_out = lay.image_len + lay.text_len
    rows = torch.randint(len(bucket), (size,), generator=rng)
    uncond = torch.rand(size, generator=rng) < cfg.prompt_dropout
    t = cfg.min_mask_ratio + (1 - cfg.min_mask_ratio) * (1 - torch.rand(size, 2, generator=rng))  # (min, 1]
    if cfg.span_ratios == "shared":
        t[:, 1] = t[:, 0]
    elif cfg.span_ratios != "independent":
        raise ConfigError(f"span_ratios must be 'shared' or 'independent', got {cfg.span_ratios!r}")
    u = torch.rand(size, n_out, generator=rng)
    return rows, uncond, t, u


@torch.no_grad()
def held_loss(model: torch.nn.Module, fmt: ParallelFormat, buckets: Sequence[Bucket], size: int = 64, seed: int = 1234) -> float:
    """The loss on a fixed draw (same rows, ratios and masks every call): comparable before and after."""
    rng = torch.Generator().manual_seed(seed)
    cfg = SFTConfig(prompt_dropout=0.0)
    losses = []
    for b in buckets:
        rows, uncond, t, u = draw(rng, b, min(size, len(b)), cfg)
        losses.append(float(masked_loss(model, fmt, b, rows, uncond, t, u)[0]))
    return sum(losses) / len(losses)


def lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_sft(out: str | Path, records: Sequence[Record], codecs: Codecs, policy_config: LLaDAConfig, cfg: SFTConfig,
              text_len: int, cache_dir: str | Path, pad_token: str = "<eos>", progress: bool = True) -> dict:
    """Warm up a fresh policy on ``records`` and save it with ``codecs`` as a model bundle in ``out``."""
    fmt = codecs.fmt
    if policy_config.output_size < fmt.vocab_size:
        raise ConfigError(f"the policy's {policy_config.output_size} logits cannot cover the format's {fmt.vocab_size} ids")
    buckets = encode_records(records, codecs, CodeCache(cache_dir, codecs.image_tokenizer), text_len, pad_token)
    init_distributed(0, 1, free_port(), "gloo")
    engine_cfg = LearnerConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                               zero_stage=cfg.zero_stage, micro_batch_size=cfg.batch_size, device="cpu", seed=cfg.seed)
    engine = build_engine(build_policy(policy_config, seed=cfg.seed), engine_cfg, 1, "cpu")
    before = held_loss(engine.module, fmt, buckets)
    rng = torch.Generator().manual_seed(cfg.seed)
    pick = random.Random(cfg.seed)
    weights = [len(b) for b in buckets]
    bar = progress_bar(range(cfg.steps), desc="SFT warm-up", enabled=progress, unit="step")
    smooth = None
    for step in bar:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        bucket = pick.choices(buckets, weights)[0]
        loss, stats = masked_loss(engine, fmt, bucket, *draw(rng, bucket, cfg.batch_size, cfg))
        engine.backward(loss)
        engine.step()
        value = float(loss.detach())
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        bar.set_postfix(loss=f"{smooth:.3f}", img=f"{stats['image_ce']:.2f}", txt=f"{stats['text_ce']:.2f}", refresh=False)
    policy = engine.module.eval()
    after = held_loss(policy, fmt, buckets)
    ModelBundle(codecs.tokenizer, fmt, codecs.image_tokenizer, policy).save(out)
    return {"loss_before": before, "loss_after": after, "steps": cfg.steps,
            "params": sum(p.numel() for p in policy.parameters())}
