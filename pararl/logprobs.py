"""Trajectory log-probabilities of a masked-diffusion policy, two estimators behind one interface.

A masked-diffusion trajectory has no left-to-right factorisation: its likelihood is a product over
denoising steps of the probability of the tokens revealed at each step, given the partially masked
sequence before that step. Two ways to estimate it (``reference/pararl-facts.md``):

- ``trace`` (default): replay the recorded trajectory. For a window of steps ``[k, k + m)`` the
  input is the sequence as it was BEFORE step k (output positions with ``step_map >= k`` are the
  mask token) and the scored tokens are those revealed inside the window. With ``m = 1`` and every
  step this is the exact log-likelihood of what the sampler drew (at temperature 1, no CFG); sampled
  and merged windows trade exactness for compute.
- ``random_mask`` (d1 / UniGRPO): mask the output at a random ratio t, score every masked token
  weighted 1/t. The mask comes from an explicit plan (a seed, hashed with each trajectory's own seed)
  so the old, current and reference log-probs of one iteration use the same mask, on any rank and
  in any batch split.

Both return per-token values over the output columns (``TokenLogProbs``): each output token is
scored at most once, so token-mean and sequence-mean aggregation are both possible downstream.
All (trajectory, window) rows go through the policy as one batch, chunked by ``chunk_rows``; there
is no Python loop over trajectories. No DeepSpeed here: rollout workers import this module too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from pararl.formats import OutputLayout, ParallelFormat
from pararl.guidance import Scoring, replay_inputs, span_logits
from pararl.heads import span_forward
from pararl.plans import Plan, RandomMaskPlan, TracePlan, update_plans
from pararl.registry import Registry


class TrajectoryView(Protocol):
    """What an estimator reads; ``pararl.types.Trajectories`` and ``learner.batch.TrainBatch`` both have it."""

    tokens: torch.Tensor  # [R, L]
    attention_mask: torch.Tensor  # [R, L]
    step_map: torch.Tensor  # [R, L]
    seeds: torch.Tensor  # [R]
    layout: OutputLayout
    steps: int
    guidance_rows: torch.Tensor | None  # [R, U, L] the unconditional rows' prompts (a plan with ``scoring``)


def from_sampler(tr, plan: Plan) -> TokenLogProbs | None:
    """pi_old read off the sampler's own forwards (``Trajectories.policy_logp``) when the plan replays
    single steps: the state before step k is exactly what trace replay rebuilds, so no forward is
    repeated. Under the plan's ``scoring`` that is the distribution the draw came from (``sampled_logp``).
    None where that does not hold (merged windows, a random mask, a token no forward drew)."""
    if not isinstance(plan, TracePlan) or plan.merge != 1 or getattr(tr, "policy_logp", None) is None:
        return None
    sm_out = tr.step_map[:, tr.layout.output]
    mask = torch.zeros_like(sm_out, dtype=torch.bool)
    for a, b in plan.windows(tr.steps):
        mask |= (sm_out >= a) & (sm_out < b)
    values = tr.policy_logp.to(sm_out.device)
    if plan.scoring is not None:  # policy_logp's NaN marks the tokens no forward drew
        values = tr.sampled_logp.to(sm_out.device).masked_fill(values.isnan(), float("nan"))
    if not bool(torch.isfinite(values[mask]).all()):
        return None
    return TokenLogProbs(torch.where(mask, values, 0.0), mask, mask.float())


def window_index(step_map_out: torch.Tensor, plan: Plan, total_steps: int) -> torch.Tensor:
    """[R, N] the forward (replay window) that scores each output position, -1 where none does.

    A trace plan scores window ``[a, b)`` of a trajectory in one forward; a random-mask plan scores a
    trajectory in one forward (window 0). The learner's row aggregation averages within these rows.
    """
    if isinstance(plan, RandomMaskPlan):
        return torch.zeros_like(step_map_out, dtype=torch.long)
    index = torch.full_like(step_map_out, -1, dtype=torch.long)
    for w, (a, b) in enumerate(plan.windows(total_steps)):
        index = torch.where((step_map_out >= a) & (step_map_out < b), w, index)
    return index


@dataclass
class TokenLogProbs:
    """Per-token log-probs over the output columns; zero where ``mask`` is False."""

    logp: torch.Tensor  # [R, N] float32
    mask: torch.Tensor  # [R, N] bool: scored tokens
    weight: torch.Tensor  # [R, N] float32: 1 (trace) or 1/t (random mask); zero where not scored
    entropy: torch.Tensor | None = None  # [R, N] entropy of the distribution each scored token was drawn from

    @property
    def sum(self) -> torch.Tensor:
        """[R] the trajectory log-likelihood estimate: sum of weighted per-token log-probs."""
        return (self.logp * self.weight).sum(-1)

    def detach(self) -> "TokenLogProbs":
        ent = None if self.entropy is None else self.entropy.detach()
        return TokenLogProbs(self.logp.detach(), self.mask, self.weight, ent)

    def to(self, device: str | torch.device) -> "TokenLogProbs":
        ent = None if self.entropy is None else self.entropy.to(device)
        return TokenLogProbs(self.logp.to(device), self.mask.to(device), self.weight.to(device), ent)

    def rows(self, index: torch.Tensor | slice) -> "TokenLogProbs":
        ent = None if self.entropy is None else self.entropy[index]
        return TokenLogProbs(self.logp[index], self.mask[index], self.weight[index], ent)

    def per_update(self, updates: int) -> list["TokenLogProbs"]:
        """Split pi_old of a plan with one mask per inner update (``behaviour_logprobs``: [R, K * N]) into K."""
        if updates == 1:
            return [self]
        n = self.logp.shape[1] // updates
        ent = lambda u: None if self.entropy is None else self.entropy[:, u * n : (u + 1) * n]  # noqa: E731
        return [TokenLogProbs(self.logp[:, u * n : (u + 1) * n], self.mask[:, u * n : (u + 1) * n],
                              self.weight[:, u * n : (u + 1) * n], ent(u)) for u in range(updates)]

    @staticmethod
    def cat(parts: list["TokenLogProbs"]) -> "TokenLogProbs":
        ent = None if any(p.entropy is None for p in parts) else torch.cat([p.entropy for p in parts])
        return TokenLogProbs(*(torch.cat([getattr(p, k) for p in parts]) for k in ("logp", "mask", "weight")), ent)


def _device_of(policy: torch.nn.Module) -> torch.device:
    dev = getattr(policy, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(policy.parameters()).device


def check_targets(fmt: ParallelFormat, lay: OutputLayout, tokens: torch.Tensor, scoreable: torch.Tensor) -> None:
    """Scoreable columns must be image or text positions holding tokens their span may draw."""
    out = tokens[:, lay.output]
    text, image = lay.relative(lay.text), lay.relative(lay.image)
    outside = scoreable.clone()
    outside[:, text] = False
    outside[:, image] = False
    if outside.any():
        r, c = outside.nonzero()[0].tolist()
        raise ValueError(f"trajectory {r}: output column {c} has a step but is neither an image nor a text position")
    t = out[:, text]
    specials = torch.tensor(fmt.special_ids, dtype=torch.long, device=t.device)
    bad_t = scoreable[:, text] & ((t < 0) | (t >= fmt.text_vocab_size) | torch.isin(t, specials))
    bad_i = scoreable[:, image] & (fmt.image_codes(out[:, image]) < 0)
    for bad, span in ((bad_t, "text"), (bad_i, "image")):
        if bad.any():
            r, c = bad.nonzero()[0].tolist()
            raise ValueError(f"trajectory {r}: {span} position {c} holds id {int((t if span == 'text' else out[:, image])[r, c])}, "
                             f"which a {span} position cannot draw (a mask or special token left in the output?)")


def score_rows(
    policy: torch.nn.Module,
    fmt: ParallelFormat,
    layout: OutputLayout,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor | None,
    targets: torch.Tensor,
    with_entropy: bool,
    scoring: Scoring | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward; log-prob of ``targets`` [P, N] (output columns) under each span's restricted softmax.

    Text positions: ``log_softmax(restrict_text_logits)`` at the token id; image positions:
    ``log_softmax(restrict_image_logits)`` at code ``id - image_offset``; other columns get 0. With
    ``scoring``, ``inputs`` holds each unconditional row after the P conditional ones and the spans'
    logits are guided and tempered first (``pararl.guidance.span_logits``).
    """
    lay = layout
    text_block, image_block = span_forward(policy, fmt, lay, inputs, attention_mask)
    text, image = lay.relative(lay.text), lay.relative(lay.image)
    lp = torch.zeros(targets.shape, dtype=torch.float32, device=text_block.device)
    ent = torch.zeros_like(lp) if with_entropy else None
    text_logits, image_logits = span_logits(fmt, text_block, image_block, targets.shape[0], scoring)
    spans = (
        (text, text_logits, targets[:, text].clamp(0, text_logits.shape[-1] - 1)),
        (image, image_logits, (targets[:, image] - fmt.image_offset).clamp(0, fmt.codebook_size - 1)),
    )
    parts = []
    for cols, values_logits, tgt in spans:
        logsm = values_logits.float().log_softmax(-1)
        parts.append((cols, logsm.gather(-1, tgt[..., None]).squeeze(-1)))
        if with_entropy:
            with torch.no_grad():
                ent[:, cols] = -(logsm.exp() * logsm.masked_fill(torch.isinf(logsm), 0.0)).sum(-1)
    # Out-of-place index_copy so autograd flows into the span log-probs.
    for cols, values in parts:
        lp = lp.index_copy(1, torch.arange(cols.start, cols.stop, device=lp.device), values)
    return lp, ent


def _attention(mask: torch.Tensor) -> torch.Tensor | None:
    """None when there is no padding: the sampler does the same, so replayed logits match its forwards."""
    return None if bool(mask.all()) else mask


def guided_rows(scoring: Scoring | None, tr: TrajectoryView, device: torch.device) -> tuple:
    """(guidance rule, [R, U, L] unconditional rows) a replay under ``scoring`` forwards; (rule, None)
    when the rule forwards none (guidance off: temperatures only)."""
    if scoring is None:
        return None, None
    rule = scoring.rule()
    if not rule.rows:
        return rule, None
    rows = getattr(tr, "guidance_rows", None)
    if rows is None or rows.shape[:2] != (tr.tokens.shape[0], rule.rows):
        got = None if rows is None else tuple(rows.shape)
        raise ValueError(f"scoring under {scoring.guidance!r} guidance replays {rule.rows} unconditional row(s) per "
                         f"trajectory, but the trajectories carry {got} (sampled without that guidance?)")
    return rule, rows.to(device)


def trace_replay(policy: torch.nn.Module, fmt: ParallelFormat, tr: TrajectoryView, plan: TracePlan,
                 chunk_rows: int | None = None, with_entropy: bool = False) -> TokenLogProbs:
    """Which (trajectory, window) rows to forward is decided where the trajectories are; only each
    chunk's inputs go to the policy's device (the learner's batch is there already; ``pararl plan``
    keeps it on the host while the policy is on fake device tensors)."""
    lay = tr.layout
    device = _device_of(policy)
    tokens, attn, step_map = tr.tokens, tr.attention_mask, tr.step_map
    windows = torch.tensor(plan.windows(tr.steps), dtype=torch.long, device=step_map.device)  # [W, 2]
    sm_out = step_map[:, lay.output]  # [R, N]
    check_targets(fmt, lay, tokens, sm_out >= 0)
    rows, n = sm_out.shape
    # Which windows score anything in which trajectory: rows with nothing to score are not run.
    hit = (sm_out[:, None, :] >= windows[None, :, 0, None]) & (sm_out[:, None, :] < windows[None, :, 1, None])  # [R, W, N]
    counts = hit.sum(-1)
    empty = (counts.sum(1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"trajectories {empty.tolist()[:8]} reveal no token in the sampled windows {windows.tolist()}: "
            "their log-probability would be empty (check the sampled steps against the step map)"
        )
    pairs = (counts > 0).nonzero()  # [P, 2] (trajectory, window)
    chunk = chunk_rows or len(pairs)
    logp = torch.zeros((rows, n), dtype=torch.float32, device=device)
    ent = torch.zeros_like(logp) if with_entropy else None
    rule, uncond = guided_rows(plan.scoring, tr, step_map.device)
    for lo in range(0, len(pairs), chunk):
        r, w = pairs[lo : lo + chunk].unbind(1)
        start = windows[w, 0]
        inputs = tokens[r].masked_fill(step_map[r] >= start[:, None], fmt.mask_id)
        attention = _attention(attn[r])
        if uncond is not None:
            inputs = replay_inputs(rule, lay, uncond[r], tokens[r], step_map[r], start, inputs)
            attention = None if attention is None else attention.repeat(1 + rule.rows, 1)
        lp, e = score_rows(policy, fmt, lay, inputs.to(device), None if attention is None else attention.to(device),
                           tokens[r][:, lay.output].to(device), with_entropy, plan.scoring)
        score, at = hit[r, w].to(device), r.to(device)
        logp = logp.index_add(0, at, torch.where(score, lp, 0.0))
        if with_entropy:
            ent.index_add_(0, at, torch.where(score, e, 0.0))
    mask = hit.any(1).to(device)
    return TokenLogProbs(logp, mask, mask.float(), ent)


def random_mask(policy: torch.nn.Module, fmt: ParallelFormat, tr: TrajectoryView, plan: RandomMaskPlan,
                chunk_rows: int | None = None, with_entropy: bool = False) -> TokenLogProbs:
    """The mask is drawn where the trajectories are; only each chunk's inputs go to the policy's device."""
    lay = tr.layout
    device = _device_of(policy)
    tokens, attn, step_map = tr.tokens, tr.attention_mask, tr.step_map
    scoreable = step_map[:, lay.output] >= 0
    if not scoreable.any(1).all():
        empty = (~scoreable.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"trajectories {empty[:8]} have no output position that was ever masked (step map all -1)")
    check_targets(fmt, lay, tokens, scoreable)
    mask, ratio = plan.draw(tr.seeds, scoreable)
    rows, n = mask.shape
    full = torch.zeros_like(step_map, dtype=torch.bool)
    full[:, lay.output] = mask
    inputs_all = tokens.masked_fill(full, fmt.mask_id)
    chunk = chunk_rows or rows
    parts, ents = [], []
    for lo in range(0, rows, chunk):
        sl = slice(lo, lo + chunk)
        attention = _attention(attn[sl])
        lp, e = score_rows(policy, fmt, lay, inputs_all[sl].to(device), None if attention is None else attention.to(device),
                           tokens[sl, lay.output].to(device), with_entropy)
        parts.append(torch.where(mask[sl].to(device), lp, 0.0))
        ents.append(e)
    mask, weight = mask.to(device), (mask.float() / ratio[:, None]).to(device)
    ent = torch.where(mask, torch.cat(ents), 0.0) if with_entropy else None
    return TokenLogProbs(torch.cat(parts), mask, weight, ent)


Estimator = Callable[..., TokenLogProbs]
LOGPROB_ESTIMATORS: Registry[Estimator] = Registry("log-probability estimator")
LOGPROB_ESTIMATORS.add("trace", trace_replay)
LOGPROB_ESTIMATORS.add("random_mask", random_mask)


def trajectory_logprobs(policy: torch.nn.Module, fmt: ParallelFormat, trajectories: TrajectoryView, plan: Plan,
                        chunk_rows: int | None = None, with_entropy: bool = False) -> TokenLogProbs:
    """Per-token log-probs of ``trajectories`` under ``policy`` with the estimator the plan names.

    Gradients flow when called with grad enabled (the learner); rollout workers call it under
    ``torch.inference_mode`` for the behaviour log-probs. ``chunk_rows`` bounds the forward batch.
    """
    estimator = LOGPROB_ESTIMATORS.get(getattr(plan, "estimator", None))
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
    return estimator(policy, fmt, trajectories, plan, chunk_rows=chunk_rows, with_entropy=with_entropy)


def behaviour_logprobs(policy: torch.nn.Module, fmt: ParallelFormat, trajectories: TrajectoryView, plan: Plan,
                       chunk_rows: int | None = None) -> TokenLogProbs:
    """pi_old under every inner update's plan, side by side along the columns ([R, K * N] for K masks;
    ``TokenLogProbs.per_update`` splits it): the rollout worker scores each mask with the weights that
    sampled, so no update's ratio compares two policy versions."""
    parts = [trajectory_logprobs(policy, fmt, trajectories, p, chunk_rows) for p in update_plans(plan)]
    if len(parts) == 1:
        return parts[0]
    ent = None if any(p.entropy is None for p in parts) else torch.cat([p.entropy for p in parts], 1)
    return TokenLogProbs(*(torch.cat([getattr(p, k) for p in parts], 1) for k in ("logp", "mask", "weight")), ent)
