"""The sampler's config, and the released generators' behaviour as named presets.

A preset fills the behaviour fields a config leaves unset (None); a field set by hand wins, so a
user can take a released generator and change one thing. Everything here is checked when the run
config loads, before any actor starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from pararl.errors import ConfigError
from pararl.guidance import Scoring


@dataclass
class SamplerConfig:
    """The dual schedulers: linear text reveal by confidence, cosine MaskGIT image reveal.

    ``preset`` names a released generator (``mmada-parallel-a``, ``mmada-parallel-m``): it supplies
    the behaviour fields left unset (None) here; docs/released-models.md lists what each one does.
    """

    steps: int = 32  # denoising steps; one forward of the whole batch each
    text_len: int = 32  # output text positions
    block_length: Optional[int] = None  # semi-autoregressive text blocks (None: one block)
    image_steps: Optional[int] = None  # image updates (None: one per step)
    image_start: int = 0  # first step at which the image is updated
    text_temperature: float = 1.0  # 0 is greedy
    image_temperature: float = 1.0  # of the image draw (0: argmax)
    image_noise: float = 1.0  # scale of the annealed noise on image confidence
    cfg_image: float = 0.0  # image guidance weight (-A: cfg_img, the input-image term)
    cfg_text: float = 0.0  # text guidance weight
    cfg_prompt: float = 0.0  # -A only: cfg_scale, the weight of its prompt term on the image
    cfg_drop_input_image: bool = False  # unconditional rows also blank the input image (editing)
    # The approximate prompt cache: the prompt's (and input image's) keys and values are recomputed every
    # r steps and reused in between, when the transformer runs on the output positions only. 1: exact (no
    # cache). The bidirectional prompt's keys move a little as the output fills in: r > 1 samples from a
    # slightly different distribution, which the learner's mismatch metrics show and its correction weighs.
    prompt_cache_refresh: int = 1
    preset: Optional[str] = None  # a released generator's behaviour (None: pararl's)
    guidance: Optional[str] = None  # pararl | mmada-parallel-m | mmada-parallel-a
    text_schedule: Optional[str] = None  # linear | even
    confidence_noise: Optional[str] = None  # gumbel | gaussian
    image_leftover: Optional[str] = None  # reveal (all revealed at the last update) | random (the release's -A flaw)
    image_ties: Optional[str] = None  # topk (pararl) | rank (-A: a stable sort) | reveal (-M: all tied at the cut)
    text_confidence: Optional[str] = None  # float32 (pararl) | float64 (the releases rank text confidence in float64)


PARARL = dict(guidance="pararl", text_schedule="linear", confidence_noise="gumbel", image_leftover="reveal",
              image_ties="topk", text_confidence="float32")
PRESETS: dict[str, dict[str, str]] = {
    # generate_ti2ti of MMaDA-Parallel-A: two unconditional rows for the image, unguided text,
    # Gaussian confidence noise, the text schedule in floating point.
    "mmada-parallel-a": dict(guidance="mmada-parallel-a", text_schedule="linear", confidence_noise="gaussian",
                             image_leftover="reveal", image_ties="rank", text_confidence="float64"),
    # interleave_generate of MMaDA-Parallel-M: one unconditional row, its text formula, LLaDA's even
    # text split, Gumbel confidence noise and MaskGIT's cut (every position tied with it is revealed).
    "mmada-parallel-m": dict(guidance="mmada-parallel-m", text_schedule="even", confidence_noise="gumbel",
                             image_leftover="reveal", image_ties="reveal", text_confidence="float64"),
}
CHOICES = {
    "guidance": ("pararl", "mmada-parallel-m", "mmada-parallel-a"),
    "text_schedule": ("linear", "even"),
    "confidence_noise": ("gumbel", "gaussian"),
    "image_leftover": ("reveal", "random"),
    "image_ties": ("topk", "rank", "reveal"),
    "text_confidence": ("float32", "float64"),
}


def resolve_sampler(cfg: Any) -> SamplerConfig:
    """A SamplerConfig with every behaviour field filled in from its preset (or pararl's defaults)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SamplerConfig)}
    preset = fields["preset"]
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"sampler.preset {preset!r} is not a released generator; known: {', '.join(PRESETS)}")
    for key, value in (PRESETS[preset] if preset else PARARL).items():
        if fields[key] is None:
            fields[key] = value
        elif fields[key] not in CHOICES[key]:
            raise ConfigError(f"sampler.{key} {fields[key]!r} is not one of {', '.join(CHOICES[key])}")
    if fields["guidance"] == "mmada-parallel-a" and fields["cfg_text"] > 0:
        raise ConfigError("sampler.cfg_text must be 0 with guidance mmada-parallel-a: the -A generator never "
                          "guides the text (its cfg_scale is sampler.cfg_prompt, a term on the image)")
    if fields["guidance"] == "mmada-parallel-a" and fields["cfg_drop_input_image"]:
        raise ConfigError("sampler.cfg_drop_input_image has no effect with guidance mmada-parallel-a: its two "
                          "unconditional rows are the released ones (one keeps the input image, one drops it)")
    if fields["guidance"] != "mmada-parallel-a" and fields["cfg_prompt"] > 0:
        raise ConfigError(f"sampler.cfg_prompt is the -A generator's cfg_scale; guidance {fields['guidance']!r} "
                          "has no such term (use cfg_image / cfg_text)")
    resolved = SamplerConfig(**fields)
    check_sampler(resolved)
    return resolved


def check_sampler(cfg: SamplerConfig, image_tokens: int | None = None) -> None:
    """The schedule's arithmetic; ``image_tokens`` (known once a model folder is loaded) adds its bound."""
    n, steps = cfg.text_len, cfg.steps
    if steps < 1 or n < 1:
        raise ConfigError(f"sampler.steps ({steps}) and sampler.text_len ({n}) must be positive")
    if cfg.prompt_cache_refresh < 1:
        raise ConfigError(f"sampler.prompt_cache_refresh={cfg.prompt_cache_refresh} must be >= 1 (1: no cache, exact)")
    block = cfg.block_length or n
    if block < 1 or n % block:
        raise ConfigError(f"sampler.text_len {n} is not a multiple of block_length {block}")
    blocks = n // block
    if steps % blocks:
        raise ConfigError(f"sampler.steps {steps} is not a multiple of the {blocks} text blocks")
    if steps // blocks > block:
        raise ConfigError(f"sampler: {steps} steps over {blocks} block(s) of {block} text tokens: more steps than "
                          f"tokens allow (at most {block * blocks})")
    image_steps = cfg.image_steps or steps - cfg.image_start
    if not 0 <= cfg.image_start < steps:
        raise ConfigError(f"sampler.image_start {cfg.image_start} must lie in [0, steps={steps})")
    if image_steps > steps - cfg.image_start:
        raise ConfigError(f"sampler.image_steps {image_steps} exceed the {steps - cfg.image_start} steps from image_start")
    if image_tokens is not None and image_steps > image_tokens:
        raise ConfigError(f"sampler.image_steps {image_steps} exceed the {image_tokens} image tokens: "
                          "more steps than tokens allow")
    for name in ("text_temperature", "image_temperature", "image_noise", "cfg_image", "cfg_text", "cfg_prompt"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"sampler.{name} must be >= 0")


def scoring_of(cfg: Any) -> Scoring:
    """The distribution this sampler draws from (guidance rule, weights, temperatures), for a learner
    that scores trajectories under it (``learner.scoring=sampled``)."""
    cfg = resolve_sampler(cfg)
    return Scoring(cfg.guidance, cfg.cfg_text, cfg.cfg_image, cfg.cfg_prompt, cfg.text_temperature, cfg.image_temperature)
