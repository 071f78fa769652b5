"""The parallel sampler: B prompts x G group members denoise text and image in one batched loop.

Each step is ONE forward over every trajectory (the unconditional CFG rows ride in the same batch),
computing logits only at the output positions and only over each span's ids (``pararl.heads``); then
both schedulers act on that step's logits: the text reveals its most confident masked positions
on a linear schedule (optionally block by block), the image reveals on MaskGIT's cosine schedule
with annealed Gumbel noise. All selection is tensor-wide top-k with a per-step scalar count, so no
Python code runs per sample; randomness is counter-based (``pararl.noise``), so a trajectory is the
same alone or inside any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from pararl import noise
from pararl.batching import build_batch
from pararl.errors import ConfigError
from pararl.formats import OutputLayout, ParallelFormat
from pararl.guidance import make_guidance
from pararl.heads import cached_span_forward, span_forward
from pararl.progress import progress as progress_bar
from pararl.types import GenerationRequest, Trajectories
from rollout.config import SamplerConfig, resolve_sampler
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


def softmax_at(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``softmax(logits.double())[ids]`` without a float64 copy of the logits: the normaliser is summed
    over vocabulary chunks. The released generators rank text confidence in float64, where float32
    probabilities of neighbouring positions often tie and a top-k would break the tie differently."""
    top = logits.amax(-1, keepdim=True).double()
    total = sum(torch.exp(part.double() - top).sum(-1) for part in logits.split(chunk, -1))
    return torch.exp(logits.gather(-1, ids[..., None]).double() - top).squeeze(-1) / total


def logp_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[ids]`` in float32, as the learner's trace replay scores a token."""
    return logits.float().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)


def put(out: torch.Tensor, cols: slice, where: torch.Tensor, values: torch.Tensor) -> None:
    """``out[:, cols]`` takes ``values`` where ``where`` holds (a step's reveals), and keeps the rest."""
    out[:, cols] = torch.where(where, values, out[:, cols])


def top_k_mask(score: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k best-scoring candidates in each row (every row has at least k)."""
    chosen = torch.zeros_like(candidates)
    if k == 0:
        return chosen
    idx = score.masked_fill(~candidates, float("-inf")).topk(k, dim=-1).indices
    return chosen.scatter_(1, idx, True)


@dataclass
class SamplingState:
    """One batch between denoising steps (``ParallelSampler.begin`` / ``step`` / ``finish``)."""

    buf: torch.Tensor  # [R (+ R x conditional-riding unconditional rows), L] the model's input; rows [0, R) are x
    attn: torch.Tensor  # [R, L] attention mask of the conditional rows
    extra: list  # [R, L] rows the guidance forwards after the text reveal (-A's two)
    seeds: torch.Tensor  # [R]
    lay: OutputLayout
    plan: RevealPlan
    rows: int
    group_size: int
    snaps: list[int]
    attn_1: torch.Tensor | None  # None without padding
    model_attn: torch.Tensor | None  # the forward's mask over every row of ``buf``
    guidance_rows: torch.Tensor | None  # [R, U, L]
    step_map: torch.Tensor  # [R, L]
    snap_tokens: torch.Tensor  # [R, S, L_out]
    snap_x0: torch.Tensor  # [R, S, L_out]
    sampled: torch.Tensor  # [R, L_out] log-probs of the distribution each token was drawn from
    policy_logp: torch.Tensor | None  # [R, L_out] unguided, temperature 1
    cache: object = None  # the prompt cache between steps


class ParallelSampler:
    def __init__(self, model: torch.nn.Module, fmt: ParallelFormat, cfg: SamplerConfig) -> None:
        self.model, self.fmt, self.cfg = model, fmt, resolve_sampler(cfg)
        self.plan: RevealPlan = reveal_plan(self.cfg, fmt.image_tokens)  # the plan of a layout with both spans
        self.guidance = make_guidance(self.cfg)
        self.confidence_noise = noise.CONFIDENCE_NOISE[self.cfg.confidence_noise]

    def plan_for(self, lay) -> RevealPlan:
        """The reveal plan of a batch's layout: a task family without an image or a text span reveals
        none of it (``pararl.tasks``)."""
        if lay.image_len and lay.text_len == self.cfg.text_len:
            return self.plan
        return reveal_plan(self.cfg, self.fmt.image_tokens if lay.image_len else 0, lay.text_len)

    def text_step(self, text_l: torch.Tensor, cur: torch.Tensor, seeds: torch.Tensor, s: int,
                  plan: RevealPlan | None = None) -> tuple:
        """x̂0 of the text span, the positions step ``s`` reveals (most confident masked, in the window),
        and the log-probability of each draw under the distribution it was drawn from."""
        cfg, fmt, plan = self.cfg, self.fmt, plan or self.plan
        masked = cur == fmt.mask_id
        allowed = fmt.restrict_text_logits(text_l)
        u = noise.uniform(seeds, noise.TEXT_SAMPLE, s, cur.shape[1])
        draw, probs = sample_categorical(allowed, u, cfg.text_temperature)
        drawn_logp = prob_of(probs, draw).log()
        # Confidence: the untempered probability of the draw; with the releases' "all" vocabulary, over
        # every id the head scores (the mask included), as they compute it.
        base = text_l if fmt.text_vocab == "all" else allowed
        if cfg.text_confidence == "float64":
            conf = softmax_at(base, draw)
        else:
            if base is not allowed or cfg.text_temperature not in (0.0, 1.0):
                probs = torch.softmax(base.float(), -1)
            conf = prob_of(probs, draw)
        position = torch.arange(cur.shape[1], device=cur.device)
        lo, hi = plan.text_window[s]
        window = (position >= lo) & (position < hi)
        reveal = top_k_mask(conf, masked & window, plan.text_reveal[s])
        return torch.where(masked, draw, cur), reveal, drawn_logp

    def image_logits(self, image_b: torch.Tensor, x: torch.Tensor, extra: list[torch.Tensor],
                     attn: torch.Tensor | None, lay) -> torch.Tensor:
        """Guided codebook logits of the image span, from the image head of this step's forward. Rows that
        the guidance forwards after the text reveal get the current output (this step's text included)
        and go through one more forward, of the image head only."""
        rows, g = x.shape[0], self.guidance
        unc = [image_b[rows:]] if g.with_cond else []
        if g.after_text:
            for buf in extra:
                buf[:, lay.output] = x[:, lay.output]
            mask = None if attn is None else attn.repeat(len(extra), 1)
            (more,) = span_forward(self.model, self.fmt, lay, torch.cat(extra), mask, ("image",))
            unc = list(more.split(rows))
        return g.image(image_b[:rows], unc)

    def image_step(self, image_l: torch.Tensor, cur: torch.Tensor, seeds: torch.Tensor, s: int,
                   plan: RevealPlan | None = None) -> tuple:
        """x̂0 of the image span, the draws, at an image update the positions it reveals (MaskGIT), and
        the draws' probabilities under the (guided, tempered) distribution they were drawn from."""
        cfg, fmt, plan = self.cfg, self.fmt, plan or self.plan
        masked = cur == fmt.mask_id
        u = noise.uniform(seeds, noise.IMAGE_SAMPLE, s, cur.shape[1])
        draw_c, probs = sample_categorical(image_l, u, cfg.image_temperature)
        draw = fmt.image_ids(draw_c)
        reveal = None
        p = prob_of(probs, draw_c)
        if plan.image_update[s]:
            # The -A generator jitters log(p + 1e-10) with Gaussian noise; MaskGIT (-M) log(max(p, 1e-20)) with Gumbel.
            logp = (p + 1e-10).log() if cfg.confidence_noise == "gaussian" else p.clamp_min(1e-20).log()
            scale = cfg.image_noise * (1.0 - plan.image_ratio[s])
            conf = logp + scale * self.confidence_noise(seeds, noise.IMAGE_CONFIDENCE, s, cur.shape[1])
            if cfg.image_ties == "topk":  # pararl: the planned count, ties as top-k breaks them
                reveal = top_k_mask(conf, masked, plan.image_reveal[s])
            else:
                reveal = masked & ~self.keep_masked(conf, masked, plan.image_target[s])
        return torch.where(masked, draw, cur), draw, reveal, p

    def keep_masked(self, conf: torch.Tensor, masked: torch.Tensor, target: int) -> torch.Tensor:
        """The positions an image update leaves masked, per row as the released generators choose them:
        ``clamp(target, 1, still_masked - 1)`` of the least confident (all revealed when ``target`` is -1).

        ``rank`` keeps exactly that many (ties by position, a stable sort); ``reveal`` is MaskGIT's cut
        (-M): below the k-th smallest confidence stays masked, so every position tied with it is revealed.
        """
        if target < 0:
            return torch.zeros_like(masked)
        keep = (masked.sum(-1, keepdim=True) - 1).clamp(max=target).clamp(min=1)
        conf = conf.masked_fill(~masked, float("inf"))  # revealed and structural positions never stay masked
        if self.cfg.image_ties == "reveal":
            return conf < conf.sort(-1).values.gather(1, keep)
        rank = conf.argsort(dim=-1, stable=True).argsort(dim=-1)
        return rank < keep

    def step_logits(self, buf: torch.Tensor, attn: torch.Tensor | None, lay, s: int, cache) -> tuple:
        """Step ``s``'s span logits of every row, and the prompt cache to pass to the next step (None without one)."""
        r = self.cfg.prompt_cache_refresh
        if r == 1:
            return span_forward(self.model, self.fmt, lay, buf, attn), None
        return cached_span_forward(self.model, self.fmt, lay, buf, attn, cache, refresh=s % r == 0)

    @torch.inference_mode()
    def sample(
        self,
        requests: Sequence[GenerationRequest],
        group_size: int = 1,
        snapshot_steps: Sequence[int] = (),
        progress: bool = False,
        record_policy: bool = False,
    ) -> Trajectories:
        """``record_policy``: also keep each token's unguided, temperature-1 log-prob (``Trajectories.policy_logp``,
        pi_old for ``learner.behaviour=sampler``); one more log-softmax per span and step, so only when asked."""
        state = self.begin(requests, group_size, snapshot_steps, record_policy)
        for s in progress_bar(range(self.cfg.steps), desc="sampling", enabled=progress, leave=False):
            self.step(state, s)
        return self.finish(state)

    def begin(self, requests: Sequence[GenerationRequest], group_size: int = 1, snapshot_steps: Sequence[int] = (),
              record_policy: bool = False) -> SamplingState:
        """The batch before step 0: every output position masked, the unconditional rows beside it.
        Whether the batch has padding is read on the host batch, before anything moves to the model's
        device (a GPU sync less, and ``pararl plan`` runs this on fake device tensors)."""
        cfg, fmt, g = self.cfg, self.fmt, self.guidance
        snaps = sorted(set(int(s) for s in snapshot_steps))
        if snaps and not (0 <= snaps[0] and snaps[-1] < cfg.steps):
            raise ConfigError(f"snapshot steps {snaps} must lie in [0, {cfg.steps})")
        if group_size < 1:
            raise ConfigError("group_size must be >= 1")
        device = next(self.model.parameters()).device
        batch = build_batch(fmt, requests, cfg.text_len, cfg.cfg_drop_input_image, released_rows=bool(g.after_text))
        padded = not bool(batch.attention_mask.all())
        lay = batch.layout
        rows = len(requests) * group_size
        rep = lambda t: t.repeat_interleave(group_size, 0).to(device)  # noqa: E731

        # State lives in the model's input buffer: rows [0, R) conditional, then any unconditional rows
        # that ride in the same forward; rows the guidance forwards after the text reveal have their own.
        cond, attn = rep(batch.input_ids), rep(batch.attention_mask)
        buf = torch.cat([cond, rep(batch.uncond_ids)]) if g.with_cond else cond
        extra = [rep((batch.uncond_ids, batch.uncond_image_ids)[i]) for i in g.after_text]
        unconditional = ([buf[rows:]] if g.with_cond else []) + extra
        seeds = noise.derive_seeds(
            torch.tensor([r.seed for r in requests], dtype=torch.long).repeat_interleave(group_size),
            torch.arange(group_size).repeat(len(requests)),
        ).to(device)
        n_out = lay.length - lay.output_start
        sampled = torch.zeros((rows, n_out), dtype=torch.float32, device=device)  # [R, L_out] drawn-from log-probs
        return SamplingState(
            buf=buf, attn=attn, extra=extra, seeds=seeds, lay=lay, plan=self.plan_for(lay), rows=rows,
            group_size=group_size, snaps=snaps,
            attn_1=attn if padded else None,  # no padding: let SDPA take its unmasked fast path
            model_attn=attn.repeat(1 + g.with_cond, 1) if padded else None,
            guidance_rows=torch.stack(unconditional, 1).clone() if unconditional else None,  # their prompts, for replay
            step_map=torch.full((rows, lay.length), -1, dtype=torch.long, device=device),
            snap_tokens=torch.empty((rows, len(snaps), n_out), dtype=torch.long, device=device),
            snap_x0=torch.empty((rows, len(snaps), n_out), dtype=torch.long, device=device),
            sampled=sampled, policy_logp=torch.zeros_like(sampled) if record_policy else None,
        )

    def step(self, st: SamplingState, s: int) -> None:
        """Denoising step ``s``: one forward of every row, then the text and the image schedulers."""
        fmt, g, lay, plan, rows = self.fmt, self.guidance, st.lay, st.plan, st.rows
        snap = s in st.snaps
        if not (plan.text_reveal[s] or plan.image_update[s] or snap):
            return  # a family without text (t2i) between image updates: nothing to reveal or keep
        x, text, image = st.buf[:rows], lay.text, lay.image
        rtext, rimage = lay.relative(text), lay.relative(image)
        (text_b, image_b), st.cache = self.step_logits(st.buf, st.model_attn, lay, s, st.cache)
        text_l = g.text(text_b[:rows], text_b[rows:] if g.with_cond else None)
        x0_t, reveal_t, logp_t = self.text_step(text_l, x[:, text], st.seeds, s, plan)
        x[:, text] = torch.where(reveal_t, x0_t, x[:, text])  # text first: -A's rows see it
        st.step_map[:, text].masked_fill_(reveal_t, s)
        put(st.sampled, rtext, reveal_t, logp_t.float())
        if st.policy_logp is not None:
            put(st.policy_logp, rtext, reveal_t, logp_at(fmt.restrict_text_logits(text_b[:rows]), x0_t))
        if plan.image_update[s] or snap:
            image_l = self.image_logits(image_b, x, st.extra, st.attn_1, lay)
            x0_i, draw_i, reveal_i, p_i = self.image_step(image_l, x[:, image], st.seeds, s, plan)
            if reveal_i is not None:
                x[:, image] = torch.where(reveal_i, draw_i, x[:, image])
                st.step_map[:, image].masked_fill_(reveal_i, s)
                put(st.sampled, rimage, reveal_i, p_i.log().float())
                if st.policy_logp is not None:
                    put(st.policy_logp, rimage, reveal_i, logp_at(image_b[:rows], fmt.image_codes(draw_i)))
        if g.with_cond:
            st.buf[rows:, lay.output] = x[:, lay.output]
        if snap:
            i = st.snaps.index(s)
            st.snap_tokens[:, i] = x[:, lay.output]
            st.snap_x0[:, i] = x[:, lay.output]
            st.snap_x0[:, i, rtext] = x0_t
            st.snap_x0[:, i, rimage] = x0_i

    def finish(self, st: SamplingState) -> Trajectories:
        """The trajectories after the last step, the released -A leftover filled."""
        fmt, lay, rows = self.fmt, st.lay, st.rows
        x, image, rimage = st.buf[:rows], lay.image, lay.relative(lay.image)
        left = x[:, image] == fmt.mask_id
        self.fill_leftover(x[:, image], st.step_map[:, image], st.seeds)
        st.sampled[:, rimage] = torch.where(left, -math.log(fmt.codebook_size), st.sampled[:, rimage])  # a uniform code
        if st.policy_logp is not None:
            st.policy_logp[:, rimage] = st.policy_logp[:, rimage].masked_fill(left, float("nan"))
        if bool((x[:, lay.output] == fmt.mask_id).any()):
            raise RuntimeError("sampler finished with masked output positions: the reveal plan is inconsistent")
        device, n_prompts = x.device, rows // st.group_size
        return Trajectories(
            tokens=x.clone(),
            attention_mask=st.attn,
            step_map=st.step_map,
            prompt_index=torch.arange(n_prompts, device=device).repeat_interleave(st.group_size),
            member=torch.arange(st.group_size, device=device).repeat(n_prompts),
            seeds=st.seeds,
            layout=lay,
            steps=self.cfg.steps,
            snapshot_steps=torch.tensor(st.snaps, dtype=torch.long),
            snapshot_tokens=st.snap_tokens,
            snapshot_x0=st.snap_x0,
            sampled_logp=st.sampled,
            policy_logp=st.policy_logp,
            guidance_rows=st.guidance_rows,
        )

    def fill_leftover(self, image: torch.Tensor, step_map: torch.Tensor, seeds: torch.Tensor) -> None:
        """``image_leftover: random``, the released -A flaw: the last image update leaves one position
        masked and it is filled with a uniformly random code, counted as revealed at the last step."""
        if self.cfg.image_leftover != "random":
            return
        left = image == self.fmt.mask_id
        u = noise.uniform(seeds, noise.IMAGE_LEFTOVER, 0, image.shape[1])
        codes = (u * self.fmt.codebook_size).long().clamp_(max=self.fmt.codebook_size - 1)
        image.copy_(torch.where(left, self.fmt.image_ids(codes), image))
        step_map.masked_fill_(left, self.cfg.steps - 1)
