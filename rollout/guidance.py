"""Classifier-free guidance as each generator does it: which unconditional rows, when, and the formula.

The released generators disagree on all three. pararl's own and -M's unconditional row rides in the
same forward as the conditional rows at every step. The -A generator builds its two unconditional
rows only at image updates, from the sequence AFTER that step's text reveal, so they need a second
forward (batched over every trajectory); at the other steps it runs the conditional rows alone.
"""
from __future__ import annotations

import torch

from pararl.registry import Registry
from rollout.config import SamplerConfig

GUIDANCE: Registry[type["Guidance"]] = Registry("guidance rule")
register_guidance = GUIDANCE.register


class Guidance:
    """``with_cond``: unconditional rows per trajectory in every step's forward (0 or 1).
    ``after_text``: which of the batch's unconditional rows (0: ``uncond_ids``, 1: ``uncond_image_ids``)
    are forwarded after the text reveal at image updates, in this order."""

    with_cond: int = 0
    after_text: tuple[int, ...] = ()

    def __init__(self, cfg: SamplerConfig) -> None:
        self.cfg = cfg

    def text(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        return cond

    def image(self, cond: torch.Tensor, uncond: list[torch.Tensor]) -> torch.Tensor:
        return cond


@register_guidance("pararl")
class ParaRLGuidance(Guidance):
    """``(1 + w) cond - w uncond`` on both spans, one unconditional row (MUSE's form)."""

    def __init__(self, cfg: SamplerConfig) -> None:
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

    def __init__(self, cfg: SamplerConfig) -> None:
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


def make_guidance(cfg: SamplerConfig) -> Guidance:
    return GUIDANCE.get(cfg.guidance, "sampler.guidance")(cfg)
