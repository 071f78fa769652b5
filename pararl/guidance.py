"""Classifier-free guidance as each generator does it: which unconditional rows, when, and the formula.

The released generators disagree on all three. pararl's own and -M's unconditional row rides in the
same forward as the conditional rows at every step. The -A generator builds its two unconditional
rows only at image updates, from the sequence AFTER that step's text reveal, so they need a second
forward (batched over every trajectory); at the other steps it runs the conditional rows alone.

A core contract, not the sampler's own: the learner can score a trajectory under the distribution
the rollout drew it from (``Scoring``, ``learner.scoring=sampled``), which replays these rows and
applies these formulas, so sampler and learner read one definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pararl.registry import Registry

GUIDANCE: Registry[type["Guidance"]] = Registry("guidance rule")
register_guidance = GUIDANCE.register


class Guidance:
    """``with_cond``: unconditional rows per trajectory in every step's forward (0 or 1).
    ``after_text``: which of the batch's unconditional rows (0: ``uncond_ids``, 1: ``uncond_image_ids``)
    are forwarded after the text reveal at image updates, in this order."""

    with_cond: int = 0
    after_text: tuple[int, ...] = ()

    def __init__(self, cfg: Any) -> None:
        """``cfg``: anything with the guidance weights (a resolved ``SamplerConfig``, a ``Scoring``)."""
        self.cfg = cfg

    @property
    def rows(self) -> int:
        """Unconditional rows per trajectory: what a replay under this guidance forwards besides the trajectory."""
        return self.with_cond + len(self.after_text)

    def text(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        return cond

    def image(self, cond: torch.Tensor, uncond: list[torch.Tensor]) -> torch.Tensor:
        return cond


@register_guidance("pararl")
class ParaRLGuidance(Guidance):
    """``(1 + w) cond - w uncond`` on both spans, one unconditional row (MUSE's form)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.with_cond = int(cfg.cfg_text > 0 or cfg.cfg_image > 0)

    def text(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        w = self.cfg.cfg_text
        return (1 + w) * cond - w * uncond if w > 0 else cond

    def image(self, cond: torch.Tensor, uncond: list[torch.Tensor]) -> torch.Tensor:
        w = self.cfg.cfg_image
        return (1 + w) * cond - w * uncond[0] if w > 0 else cond


@register_guidance("mmada-parallel-m")
class MmadaMGuidance(ParaRLGuidance):
    """The released -M text formula ``cond + w (uncond - cond)``: it pushes AWAY from the condition
    for w > 0, and -M's inference passes w = 2.5. Kept because it is what -M's users run."""

    def text(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        w = self.cfg.cfg_text
        return cond + w * (uncond - cond) if w > 0 else cond


@register_guidance("mmada-parallel-a")
class MmadaAGuidance(Guidance):
    """Image only: ``cond + cfg_prompt (cond - uncond_text) + cfg_image (cond - uncond_img)``, summed in
    the release's order; the text is never guided."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.after_text = tuple(i for i, w in enumerate((cfg.cfg_prompt, cfg.cfg_image)) if w > 0)

    def image(self, cond: torch.Tensor, uncond: list[torch.Tensor]) -> torch.Tensor:
        rows = dict(zip(self.after_text, uncond))
        logits = cond
        if 0 in rows:
            logits = logits + self.cfg.cfg_prompt * (cond - rows[0])
        if 1 in rows:
            logits = logits + self.cfg.cfg_image * (cond - rows[1])
        return logits


def make_guidance(cfg: Any) -> Guidance:
    return GUIDANCE.get(cfg.guidance, "sampler.guidance")(cfg)


@dataclass(frozen=True)
class Scoring:
    """The distribution a rollout drew its tokens from, for a learner that scores under it: the
    guidance rule and weights, and each span's temperature (0, a greedy draw, is recorded at 1)."""

    guidance: str
    cfg_text: float = 0.0
    cfg_image: float = 0.0
    cfg_prompt: float = 0.0
    text_temperature: float = 1.0
    image_temperature: float = 1.0

    def rule(self) -> Guidance:
        return make_guidance(self)

    def tempered(self, logits: torch.Tensor, span: str) -> torch.Tensor:
        t = self.text_temperature if span == "text" else self.image_temperature
        return logits.float() / (t or 1.0)


def replay_inputs(g: Guidance, lay: Any, uncond: torch.Tensor, tokens: torch.Tensor, step_map: torch.Tensor,
                  start: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """[P * (1 + U), L] the conditional states and, after them, each unconditional row as the sampler
    forwarded it at step ``start``: the trajectory's output before that step, and for the rows a rule
    forwards after the text reveal (-A) that step's text as well. ``uncond`` [P, U, L] holds the rows'
    prompts (``Trajectories.guidance_rows``); ``state`` [P, L] the conditional rows' inputs."""
    out = state[:, lay.output]
    if g.after_text:
        now = torch.zeros_like(step_map, dtype=torch.bool)
        now[:, lay.text] = step_map[:, lay.text] == start[:, None]
        out = torch.where(now[:, lay.output], tokens[:, lay.output], out)
    rows = uncond.clone()
    rows[:, :, lay.output] = out[:, None]
    return torch.cat([state, rows.transpose(0, 1).reshape(-1, state.shape[1])])


def span_logits(fmt: Any, text: torch.Tensor, image: torch.Tensor, rows: int,
                scoring: "Scoring | None") -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) logits over each span's own vocabulary, as the scored distribution defines them,
    from the span heads (``pararl.heads.span_forward``): the policy's (``scoring`` None), or the guided,
    tempered logits the rollout drew from, with the conditional rows first and each unconditional row's
    after them."""
    if scoring is None:
        return fmt.restrict_text_logits(text[:rows]), image[:rows]
    g = scoring.rule()
    unc_text, unc_image = (list(t[rows:].split(rows)) if g.rows else [] for t in (text, image))
    guided_text = fmt.restrict_text_logits(g.text(text[:rows], unc_text[0] if g.with_cond else None))
    guided_image = g.image(image[:rows], unc_image)
    return scoring.tempered(guided_text, "text"), scoring.tempered(guided_image, "image")
