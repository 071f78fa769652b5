"""A reward replica's unit: the VQ decode of one batch of snapshots at the real image size, then each
reward model's forward over those images and their texts, on fake device tensors.

The image tokenizer is the released architecture: MAGVIT-v2 from our own module (its config file when
the folder has one, the release's defaults otherwise), -A's diffusers VQModel from ``vqvae/config.json``
(without it the decode is named as not measured). open_clip reward models are built from their names
with random weights: the architecture is what costs memory, not the values.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from cluster.memory import CUDA_SLACK, Estimate
from cluster.plan.actors import ActorPlan, Context, weights_of
from cluster.plan.fake import DEVICE, build_fake, measure

TEXT = "a reasoning text of the length the sampler writes " * 40


def image_tokenizer(ctx: Context, folder: Path | None) -> tuple[Any | None, str]:
    """(a tokenizer around a fake decoder, or None, and what was built or why not)."""
    from pararl.detect import format_grid

    grid = format_grid(ctx.fmt) or [32, 32]
    if ctx.cfg.sampler.preset == "mmada-parallel-m":
        from pararl.image_tokenizers.magvit2 import Magvit2Tokenizer, MagvitConfig, MagvitV2

        file = folder / "magvitv2" / "config.json" if folder else None
        config = MagvitConfig.from_file(file) if file and file.is_file() else MagvitConfig()
        model = build_fake(lambda: MagvitV2(config).eval(), ctx.mode, DEVICE, torch.float32)
        where = "from its config.json" if file and file.is_file() else "at the release's architecture"
        return Magvit2Tokenizer.around(model, grid), f"MAGVIT-v2 {where}"
    if folder is not None and (folder / "vqvae" / "config.json").is_file():
        from diffusers import VQModel

        from pararl.image_tokenizers.vqmodel import VQModelTokenizer

        config = VQModel.load_config(str(folder / "vqvae"))
        model = build_fake(lambda: VQModel.from_config(config).eval(), ctx.mode, DEVICE, torch.float32)
        return VQModelTokenizer.around(model, grid), "VQModel from vqvae/config.json"
    return None, "the VQ decode (no vqvae/config.json: pass the released folder as model=)"


def reward_models(ctx: Context) -> tuple[dict[str, Any], list[str]]:
    from reward.clip_models import OpenClipReward

    built, skipped = {}, []
    for label, m in ctx.cfg.reward.models.items():
        if m.name != "open_clip":
            skipped.append(f"reward model {label!r} ({m.name}: only open_clip models are built on fake tensors)")
            continue
        kwargs = {k: v for k, v in m.kwargs.items() if k in ("model", "config_file", "precision")}
        dtype = PRECISION.get(kwargs.get("precision", "fp32"), torch.float32)
        try:
            with _built_in_place():
                built[label] = build_fake(lambda kw=kwargs: OpenClipReward(**kw, device=DEVICE), ctx.mode, DEVICE, dtype)
        except (RuntimeError, ValueError) as err:
            skipped.append(f"reward model {label!r} (building it on fake tensors failed: {err})")
    return built, skipped


PRECISION = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}


@contextmanager
def _built_in_place() -> Iterator[None]:
    """open_clip moves its model with ``.to(device, dtype)`` after building it. ``build_fake`` builds it on
    the device in its dtype already, and ``.to()`` would fail there: it swaps fake parameters, which
    the fake mode holds weak references to."""
    move = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.to = move


def reward_replica(ctx: Context, folder: Path | None, estimate: Estimate, share: float) -> tuple[ActorPlan, dict[str, int]]:
    """The replica's memory, and the FLOPs of its unit per image (``decode``, ``score``)."""
    r = ctx.cfg.reward
    images = r.max_batch_size * r.sampled_steps
    out = ActorPlan("reward replica", estimate=estimate.total, share=share)
    tokenizer, how = image_tokenizer(ctx, folder)
    models, skipped = reward_models(ctx)
    out.unmeasured += skipped
    flops = {"decode": 0, "score": 0}
    weights = sum(weights_of(m.model) for m in models.values())
    decoded = torch.zeros(images, 3, 512, 512)
    if tokenizer is None:
        out.unmeasured.append(how)
        out.analytic["VQ decode (estimate)"] = estimate.parts.get("VQ decode activations", 0.0)
    else:
        weights += weights_of(tokenizer.model)
        codes = torch.zeros(images, tokenizer.num_tokens, dtype=torch.long)
        holder: dict = {}
        decode = measure(lambda: holder.setdefault("images", tokenizer.decode(codes)), ctx.mode, DEVICE, [tokenizer.model])
        decoded = holder["images"]
        out.measured["VQ decode"] = decode.total - weights_of(tokenizer.model)
        flops["decode"] = decode.flops // images
    score_peak = 0.0
    for model in models.values():
        m = measure(lambda model=model: model.score(decoded, [TEXT] * images), ctx.mode, DEVICE, [model.model])
        score_peak = max(score_peak, m.total - weights_of(model.model))
        flops["score"] += m.flops // images
    out.measured["weights"] = weights
    out.measured["reward forward"] = score_peak
    out.analytic["CUDA slack"] = CUDA_SLACK
    return out, flops
