"""The learner's settings, as an omegaconf structured dataclass (``pararl.config.build_config`` refuses unknown keys).

Every knob that changes what is optimised (clipping, KL, aggregation, the log-probability estimator)
lives here next to the engine knobs (ZeRO stage, precision, micro-batching), so a run's YAML says in
one place how the policy was trained. ``validate`` turns a bad value into an error that names the
key, before any DeepSpeed engine or Ray actor starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pararl.errors import ConfigError
from pararl.lora import AdapterConfig, check_adapter_config
from pararl.plans import MASK_STRUCTURES
from pararl.registry import Registry


@dataclass
class CheckpointConfig:
    folder: Optional[str] = None  # where ``step-XXXXXXXX`` folders and the ``latest`` pointer go (None: no checkpoints)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one is complete
    checksums: bool = True  # sha256 of every file in COMPLETE, checked at load (sizes are always checked)


@dataclass
class LearnerConfig:
    # Optimizer (a torch.optim.AdamW handed to DeepSpeed: nothing is compiled).
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)

    # Engine.
    zero_stage: int = 2  # 0-3
    precision: str = "fp32"  # fp32 | bf16 (fp16 only on GPU)
    device: str = "auto"  # auto | cpu | cuda
    dist_backend: Optional[str] = None  # None: gloo on CPU, nccl on GPU
    micro_batch_size: int = 4  # trajectories per forward/backward (each expands to one row per scored step window)
    grad_accumulation: int = 1  # micro-batches per optimizer step, per rank
    updates_per_batch: int = 2  # passes over each rollout batch; pi_old = the behaviour log-probs throughout
    gradient_checkpointing: bool = False
    reference_offload: bool = False  # keep the frozen reference on CPU between its forwards (GPU runs)
    seed: int = 0

    # Objective.
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.01  # KL weight (0: no reference forward at all)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_reference: str = "reference"  # reference (frozen initial policy) | old (the behaviour policy)
    # How the per-token terms are averaged (learner/loss.py): token (over all scored tokens; the image's many
    # tokens carry most of the weight) | sequence (mean of per-trajectory means) | row (mean of per
    # (trajectory, replay window) means, TraceRL's: a step that reveals few tokens weighs as one that reveals many)
    aggregation: str = "token"
    # Per-modality weights on each token's loss term. Under token-mean the image's many tokens carry most
    # of the weight (-M: 1024 image against 256 text positions); these rebalance it. 1 and 1: unweighted.
    text_weight: float = 1.0
    image_weight: float = 1.0
    # The rollout draws from guided, tempered logits; pi_old is the unguided policy at temperature 1. The
    # correction weights each token's policy-gradient term by r = pi_old / sampled (learner/mismatch.py):
    # none | tis (min(r, cap), truncated importance sampling) | mis (r, or 0 where r > cap: masked).
    correction: str = "none"
    correction_cap: float = 2.0
    # Where pi_old comes from: replay (a trace replay forward on the rollout worker) | sampler (the
    # sampler's own forwards, free; single-step windows only: coverage reward_steps, or merge_steps 1) |
    # auto (sampler where the plan's windows are single steps, replay otherwise: merged windows score a
    # token from a state no sampler forward saw). The two agree to float noise (tests/test_mismatch.py).
    behaviour: str = "auto"
    # Which distribution the learner scores (behaviour, old, current and reference alike): policy (the
    # unguided model at temperature 1: what is trained is the model; the correction above can account for
    # the rollouts' guidance) | sampled (the guided, tempered distribution the rollouts drew from, its
    # unconditional rows replayed: the learner optimises the sampler users run, and the ratio starts at the
    # sampled probability; each replay forward carries the guidance's rows too, 2-3x the rows). trace only.
    scoring: str = "policy"

    # Advantages (computed by the driver from group rewards).
    advantage: str = "grpo"  # grpo | drgrpo
    advantage_eps: float = 1e-6
    drop_constant_groups: bool = False  # drop groups whose rewards are all equal (their advantage is zero)

    # Trajectory log-probabilities.
    logprob_estimator: str = "trace"  # trace (replay the recorded steps) | random_mask (d1 / UniGRPO)
    # trace: which denoising steps' reveals get a gradient (the same plan for behaviour, old, current and
    # reference log-probs). reward_steps: the reward's sampled steps, one forward each (ParaRL's choice);
    # all: every step, in windows of merge_steps; random: sampled_steps of those windows per iteration.
    coverage: str = "reward_steps"
    sampled_steps: int = 0  # coverage=random: windows scored per iteration
    merge_steps: int = 1  # coverage=all | random: a window [k, k + merge_steps) is scored in one forward
    mask_ratio_min: float = 0.05  # random_mask: the ratio t is drawn from U(min, max) per trajectory
    mask_ratio_max: float = 1.0
    # random_mask: uniform (one mask per batch, shared by its inner updates) | stratified (UniGRPO's
    # structured masking: each inner update its own mask, a trajectory's ratios spread over the updates)
    mask_structure: str = "uniform"

    # LoRA (peft): only low-rank adapters on the blocks' linear maps train; the reference policy is the
    # base with them switched off, and a new version sends only them (pararl/lora.py)
    lora: AdapterConfig = field(default_factory=AdapterConfig)

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


COVERAGES = ("reward_steps", "all", "random")


def check_coverage(cfg: LearnerConfig) -> None:
    """Each coverage reads its own knobs; a knob that would be ignored, or a plan that scores nothing, is refused."""
    if cfg.coverage == "reward_steps" and (cfg.sampled_steps or cfg.merge_steps != 1):
        raise ConfigError(f"learner.coverage=reward_steps scores the reward's steps one forward each: "
                          f"learner.sampled_steps={cfg.sampled_steps} and merge_steps={cfg.merge_steps} apply to "
                          "coverage=random (and merge_steps to coverage=all)")
    if cfg.coverage == "all" and cfg.sampled_steps:
        raise ConfigError(f"learner.sampled_steps={cfg.sampled_steps} applies to coverage=random; "
                          "coverage=all scores every step")
    if cfg.coverage == "random" and cfg.sampled_steps < 1:
        raise ConfigError("learner.coverage=random with sampled_steps=0 would score nothing; set "
                          "learner.sampled_steps >= 1 (or coverage=all for every step)")


def uses_reference(cfg: LearnerConfig) -> bool:
    """Whether the KL term reads a frozen reference policy (under LoRA: the base with its adapters off)."""
    return cfg.beta > 0 and cfg.kl_reference == "reference"


def behaviour_source(cfg: LearnerConfig, approximate_sampler: bool = False) -> str:
    """``learner.behaviour`` resolved: "sampler" or "replay" (what the rollout workers do). An approximate
    sampler (the prompt cache) never gives pi_old: its forwards are not the policy's."""
    single = cfg.logprob_estimator == "trace" and cfg.merge_steps == 1 and not approximate_sampler
    return "sampler" if cfg.behaviour == "sampler" or (cfg.behaviour == "auto" and single) else "replay"


def validate(cfg: LearnerConfig) -> LearnerConfig:
    """Refuse values that would fail later (inside an actor) or silently train something else."""
    from learner.advantages import ADVANTAGE_ESTIMATORS
    from learner.loss import AGGREGATIONS, KL_ESTIMATORS
    from learner.mismatch import CORRECTIONS
    from pararl.logprobs import LOGPROB_ESTIMATORS

    def choose(key: str, value: str, known) -> None:
        if isinstance(known, Registry):
            known.check(value, f"learner.{key}")
        elif value not in known:
            raise ConfigError(f"learner.{key}={value!r} is not one of: {', '.join(sorted(known))}")

    choose("precision", cfg.precision, ("fp32", "bf16", "fp16"))
    choose("device", cfg.device, ("auto", "cpu", "cuda"))
    choose("kl_estimator", cfg.kl_estimator, KL_ESTIMATORS)
    choose("kl_reference", cfg.kl_reference, ("reference", "old"))
    choose("aggregation", cfg.aggregation, AGGREGATIONS)
    choose("advantage", cfg.advantage, ADVANTAGE_ESTIMATORS)
    choose("logprob_estimator", cfg.logprob_estimator, LOGPROB_ESTIMATORS)
    choose("coverage", cfg.coverage, COVERAGES)
    choose("correction", cfg.correction, CORRECTIONS)
    choose("behaviour", cfg.behaviour, ("replay", "sampler", "auto"))
    choose("scoring", cfg.scoring, ("policy", "sampled"))
    if cfg.scoring == "sampled" and cfg.logprob_estimator != "trace":
        raise ConfigError("learner.scoring=sampled replays the sampler's own states under its guidance: it needs "
                          f"logprob_estimator=trace (got {cfg.logprob_estimator}: its masks are states no step saw)")
    if cfg.behaviour == "sampler" and (cfg.logprob_estimator != "trace" or cfg.merge_steps != 1):
        raise ConfigError(f"learner.behaviour=sampler reads pi_old off the sampler's forwards, one step each: it needs "
                          f"logprob_estimator=trace and merge_steps=1 (got {cfg.logprob_estimator}, {cfg.merge_steps})")
    if cfg.correction_cap < 1:
        raise ConfigError(f"learner.correction_cap={cfg.correction_cap} must be >= 1 (it truncates ratios above it)")
    if cfg.dist_backend is not None:
        choose("dist_backend", cfg.dist_backend, ("gloo", "nccl"))
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"learner.zero_stage={cfg.zero_stage} must be 0, 1, 2 or 3")
    for key in ("micro_batch_size", "grad_accumulation", "updates_per_batch", "merge_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"learner.{key}={getattr(cfg, key)} must be >= 1")
    for key in ("lr", "eps_low", "eps_high", "beta", "weight_decay", "grad_clip", "sampled_steps", "advantage_eps",
                "text_weight", "image_weight"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"learner.{key}={getattr(cfg, key)} must be >= 0")
    check_coverage(cfg)
    check_adapter_config(cfg.lora)
    if cfg.text_weight < 0 or cfg.image_weight < 0 or cfg.text_weight + cfg.image_weight == 0:
        raise ConfigError(f"learner.text_weight={cfg.text_weight}, image_weight={cfg.image_weight}: both must be "
                          ">= 0 and one positive")
    if cfg.eps_low >= 1:
        raise ConfigError(f"learner.eps_low={cfg.eps_low} must be < 1 (the ratio's lower clip is 1 - eps_low)")
    if not 0 < cfg.mask_ratio_min <= cfg.mask_ratio_max <= 1:
        raise ConfigError(
            f"learner.mask_ratio_min={cfg.mask_ratio_min}, mask_ratio_max={cfg.mask_ratio_max}: need 0 < min <= max <= 1"
        )
    if cfg.mask_structure not in MASK_STRUCTURES:
        raise ConfigError(f"learner.mask_structure={cfg.mask_structure!r} is not one of {', '.join(MASK_STRUCTURES)}")
    if cfg.mask_structure != "uniform" and cfg.logprob_estimator != "random_mask":
        raise ConfigError(f"learner.mask_structure={cfg.mask_structure!r} shapes the random mask; with "
                          f"logprob_estimator={cfg.logprob_estimator!r} there is none")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"learner.checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    return cfg
