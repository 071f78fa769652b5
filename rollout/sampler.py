"""The parallel sampler: B prompts x G group members denoise text and image in one batched loop.

Each step is ONE forward over every trajectory (the unconditional CFG rows ride in the same batch),
then both schedulers act on that step's logits: the text reveals its most confident masked positions
on a linear schedule (optionally block by block), the image reveals on MaskGIT's cosine schedule
with annealed Gumbel noise. All selection is tensor-wide top-k with a per-step scalar count, so no
Python code runs per sample; randomness is counter-based (``rollout.noise``), so a trajectory is the
same alone or inside any batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from pararl.config import SamplerConfig
from pararl.formats import ParallelFormat
from pararl.types import GenerationRequest, Trajectories
from rollout import noise
from rollout.batching import build_batch
from rollout.schedules import RevealPlan, reveal_plan


def sample_categorical(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw with one given uniform per position, and the probabilities it drew from.

    At temperature 0 the draw is the argmax and the probabilities are the untempered softmax.
    """
    probs = torch.softmax(logits.float() / (temperature or 1.0), dim=-1)
    if temperature == 0:
        return logits.argmax(-1), probs
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return idx.clamp_(max=logits.shape[-1] - 1), probs


def prob_of(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return probs.gather(-1, ids[..., None]).squeeze(-1)


def top_k_mask(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k best-scoring candidates in each row (every row has at least k)."""
    chosen = torch.zeros_like(candidates)
    if k == 0:
        return chosen
    idx = score.masked_fill(~candidates, float("-inf")).topk(k, dim=-1).indices
    return chosen.scatter_(1, idx, True)


class ParallelSampler:
    def __init__(self, model: torch.nn.Module, fmt: ParallelFormat, cfg: SamplerConfig) -> None:
        self.model, self.fmt, self.cfg = model, fmt, cfg
        self.plan: RevealPlan = reveal_plan(cfg, fmt.image_tokens)

    @property
    def uses_cfg(self) -> bool:
        return self.cfg.cfg_image > 0 or self.cfg.cfg_text > 0

    def guide(self, logits: torch.Tensor, rows: int, text: slice, image: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Span logits after CFG ``(1 + w) cond - w uncond`` (uncond rows follow the ``rows`` cond rows),
        restricted to what each span may draw: text ids for text, codebook entries for the image."""
        cond = logits[:rows]
        text_l, image_l = cond[:, text], cond[:, image]
        if self.cfg.cfg_text > 0:
            w = self.cfg.cfg_text
            text_l = (1 + w) * text_l - w * logits[rows:, text]
        if self.cfg.cfg_image > 0:
            w = self.cfg.cfg_image
            image_l = (1 + w) * image_l - w * logits[rows:, image]
        return self.fmt.restrict_text_logits(text_l), self.fmt.restrict_image_logits(image_l)

    @torch.inference_mode()
    def sample(
        self,
        requests: Sequence[GenerationRequest],
        group_size: int = 1,
        snapshot_steps: Sequence[int] = (),
        progress: bool = False,
    ) -> Trajectories:
        cfg, fmt, plan = self.cfg, self.fmt, self.plan
        snaps = sorted(set(int(s) for s in snapshot_steps))
        if snaps and not (0 <= snaps[0] and snaps[-1] < cfg.steps):
            raise ValueError(f"snapshot steps {snaps} must lie in [0, {cfg.steps})")
        if group_size < 1:
            raise ValueError("group_size must be >= 1")
        device = next(self.model.parameters()).device
        batch = build_batch(fmt, requests, cfg.text_len, cfg.cfg_drop_input_image)
        lay = batch.layout
        rows = len(requests) * group_size

        # State lives in the model's input buffer: rows [0, R) conditional, [R, 2R) unconditional.
        cond = batch.input_ids.repeat_interleave(group_size, 0)
        attn = batch.attention_mask.repeat_interleave(group_size, 0)
        if self.uses_cfg:
            buf = torch.cat([cond, batch.uncond_ids.repeat_interleave(group_size, 0)]).to(device)
            model_attn = torch.cat([attn, attn]).to(device)
        else:
            buf, model_attn = cond.to(device), attn.to(device)
        if bool(model_attn.all()):
            model_attn = None  # no padding: let SDPA take its unmasked fast path
        x = buf[:rows]
        out, text, image = lay.output, lay.text, lay.image
        rtext, rimage = lay.relative(text), lay.relative(image)

        seeds = noise.derive_seeds(
            torch.tensor([r.seed for r in requests], dtype=torch.long).repeat_interleave(group_size),
            torch.arange(group_size).repeat(len(requests)),
        ).to(device)
        step_map = torch.full((rows, lay.length), -1, dtype=torch.long, device=device)
        n_out = lay.length - lay.output_start
        snap_tokens = torch.empty((rows, len(snaps), n_out), dtype=torch.long, device=device)
        snap_x0 = torch.empty_like(snap_tokens)
        position = torch.arange(lay.text_len, device=device)

        for s in tqdm(range(cfg.steps), desc="sampling", disable=not progress, leave=False):
            snap = s in snaps
            logits = self.model(buf, attention_mask=model_attn).logits
            text_l, image_l = self.guide(logits, rows, text, image)

            # Text: draw x̂0 for masked positions, reveal the most confident inside the active block.
            cur_t = x[:, text]
            masked_t = cur_t == fmt.mask_id
            u = noise.uniform(seeds, noise.TEXT_SAMPLE, s, lay.text_len)
            draw_t, probs_t = sample_categorical(text_l, u, cfg.text_temperature)
            if cfg.text_temperature not in (0.0, 1.0):  # confidence is always the untempered probability
                probs_t = torch.softmax(text_l.float(), -1)
            conf_t = prob_of(probs_t, draw_t)
            lo, hi = plan.text_window[s]
            window = (position >= lo) & (position < hi)
            reveal_t = top_k_mask(conf_t, masked_t & window, plan.text_reveal[s])
            x0_t = torch.where(masked_t, draw_t, cur_t)

            # Image: MaskGIT step at image updates (and x̂0 for snapshots).
            cur_i = x[:, image]
            masked_i = cur_i == fmt.mask_id
            if plan.image_update[s] or snap:
                u = noise.uniform(seeds, noise.IMAGE_SAMPLE, s, lay.image_len)
                draw_c, probs_i = sample_categorical(image_l, u, cfg.image_temperature)
                draw_i = fmt.image_ids(draw_c)
                x0_i = torch.where(masked_i, draw_i, cur_i)
            if plan.image_update[s]:
                logp = prob_of(probs_i, draw_c).clamp_min(1e-30).log()
                scale = cfg.image_noise * (1.0 - plan.image_ratio[s])
                conf_i = logp + scale * noise.gumbel(seeds, noise.IMAGE_CONFIDENCE, s, lay.image_len)
                reveal_i = top_k_mask(conf_i, masked_i, plan.image_reveal[s])
                x[:, image] = torch.where(reveal_i, draw_i, cur_i)
                step_map[:, image].masked_fill_(reveal_i, s)

            x[:, text] = torch.where(reveal_t, draw_t, cur_t)
            step_map[:, text].masked_fill_(reveal_t, s)
            if self.uses_cfg:
                buf[rows:, out] = x[:, out]
            if snap:
                i = snaps.index(s)
                snap_tokens[:, i] = x[:, out]
                snap_x0[:, i] = x[:, out]
                snap_x0[:, i, rtext] = x0_t
                snap_x0[:, i, rimage] = x0_i

        if bool((x[:, out] == fmt.mask_id).any()):
            raise RuntimeError("sampler finished with masked output positions: the reveal plan is inconsistent")
        return Trajectories(
            tokens=x.clone(),
            attention_mask=attn.to(device),
            step_map=step_map,
            prompt_index=torch.arange(len(requests), device=device).repeat_interleave(group_size),
            member=torch.arange(group_size, device=device).repeat(len(requests)),
            seeds=seeds,
            layout=lay,
            steps=cfg.steps,
            snapshot_steps=torch.tensor(snaps, dtype=torch.long),
            snapshot_tokens=snap_tokens,
            snapshot_x0=snap_x0,
        )
