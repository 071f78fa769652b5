"""Trajectory log-probabilities: trace replay against a plain per-step loop and against what the sampler drew."""
import pytest
import torch

from pararl.logprobs import trajectory_logprobs
from pararl.plans import RandomMaskPlan, TracePlan, make_plan, sample_trace_plan
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.tiny import tiny_format, tiny_policy

FMT = tiny_format()
STEPS = 8
REQUESTS = [GenerationRequest([10, 11, 12], seed=3), GenerationRequest([13, 14, 15, 16, 17, 18], seed=4)]


class Recorder(torch.nn.Module):
    """Wraps the policy and keeps every forward's input and logits: the sampler's own per-step view."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids, attention_mask=attention_mask)
        self.calls.append((input_ids.clone(), out.logits.clone()))
        return out


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    policy = tiny_policy(tmp_path_factory.mktemp("logprobs"), seed=21)
    rec = Recorder(policy)
    cfg = SamplerConfig(steps=STEPS, text_len=16, text_temperature=1.0, image_temperature=1.0, cfg_image=0, cfg_text=0)
    tr = ParallelSampler(rec, FMT, cfg).sample(REQUESTS, group_size=2)
    return policy, tr, rec.calls


def token_logp(logits, fmt, lay, tokens):
    """Per output column log-prob of ``tokens`` under the restricted softmaxes (the sampler's distributions)."""
    out = torch.zeros(tokens.shape[0], lay.length - lay.output_start)
    text_lp = torch.log_softmax(fmt.restrict_text_logits(logits[:, lay.text]).float(), -1)
    image_lp = torch.log_softmax(fmt.restrict_image_logits(logits[:, lay.image]).float(), -1)
    out[:, lay.relative(lay.text)] = text_lp.gather(-1, tokens[:, lay.text, None]).squeeze(-1)
    out[:, lay.relative(lay.image)] = image_lp.gather(-1, (tokens[:, lay.image] - fmt.image_offset)[..., None]).squeeze(-1)
    return out


def loop_logprob(policy, tr, windows):
    """Plain Python loop over trajectories and recorded steps: one forward per (trajectory, window)."""
    lay = tr.layout
    total = torch.zeros(len(tr), dtype=torch.float64)
    for r in range(len(tr)):
        for start, stop in windows:
            x = tr.tokens[r : r + 1].clone()
            x[tr.step_map[r : r + 1] >= start] = FMT.mask_id
            attn = tr.attention_mask[r : r + 1]
            logits = policy(x, attention_mask=None if attn.all() else attn).logits
            lp = token_logp(logits, FMT, lay, tr.tokens[r : r + 1])[0]
            sm = tr.step_map[r, lay.output]
            total[r] += lp[(sm >= start) & (sm < stop)].double().sum()
    return total


@torch.no_grad()
def test_trace_replay_equals_plain_loop_and_what_the_sampler_drew(sampled):
    policy, tr, calls = sampled
    lay = tr.layout
    assert not tr.attention_mask.all(), "the batch should exercise left padding"
    got = trajectory_logprobs(policy, FMT, tr, TracePlan(tuple(range(STEPS))))
    assert got.mask.sum(1).tolist() == [lay.text_len + lay.image_len] * len(tr), "every output token scored once"
    loop = loop_logprob(policy, tr, [(k, k + 1) for k in range(STEPS)])
    torch.testing.assert_close(got.sum.double(), loop, atol=1e-4, rtol=0)

    # The sampler's own forwards: the replayed input of step k is exactly what it fed the model at k, and
    # the replayed log-prob is log p(token it drew) under the softmax it drew from.
    assert len(calls) == STEPS
    drawn = torch.zeros(len(tr), dtype=torch.float64)
    for k, (inputs, logits) in enumerate(calls):
        assert torch.equal(inputs, tr.tokens.masked_fill(tr.step_map >= k, FMT.mask_id))
        lp = token_logp(logits, FMT, lay, tr.tokens)
        drawn += torch.where(tr.step_map[:, lay.output] == k, lp, 0.0).double().sum(1)
    torch.testing.assert_close(got.sum.double(), drawn, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampled_and_merged_windows_match_the_loop_and_chunking(sampled):
    policy, tr, _ = sampled
    plan = TracePlan((1, 4, 6), merge=2)
    whole = trajectory_logprobs(policy, FMT, tr, plan)
    chunked = trajectory_logprobs(policy, FMT, tr, plan, chunk_rows=5, with_entropy=True)
    loop = loop_logprob(policy, tr, [(1, 3), (4, 6), (6, 8)])
    torch.testing.assert_close(whole.sum.double(), loop, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.logp, whole.logp, atol=1e-5, rtol=0)
    sm = tr.step_map[:, tr.layout.output]
    expected_mask = ((sm >= 1) & (sm < 3)) | ((sm >= 4) & (sm < 8))
    assert torch.equal(whole.mask, expected_mask)
    assert (chunked.entropy[chunked.mask] > 0).all() and (chunked.entropy[~chunked.mask] == 0).all()


def test_trace_replay_gradient_flows(sampled):
    policy, tr, _ = sampled
    lp = trajectory_logprobs(policy, FMT, tr, TracePlan((0, 5)))
    lp.sum.sum().backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    policy.zero_grad(set_to_none=True)


@torch.no_grad()
def test_random_mask_shares_one_mask_per_plan_and_weights_by_inverse_ratio(sampled):
    policy, tr, _ = sampled
    plan = RandomMaskPlan(seed=7, ratio_min=0.2, ratio_max=0.9)
    a = trajectory_logprobs(policy, FMT, tr, plan)
    b = trajectory_logprobs(policy, FMT, tr, plan)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.logp, b.logp)
    # The mask depends on (plan seed, trajectory seed) only: the second half alone gets the same mask.
    from dataclasses import replace
    half = replace(tr, **{k: getattr(tr, k)[2:] for k in ("tokens", "attention_mask", "step_map", "seeds")})
    c = trajectory_logprobs(policy, FMT, half, plan)
    assert torch.equal(c.mask, a.mask[2:])
    other = trajectory_logprobs(policy, FMT, tr, RandomMaskPlan(seed=8, ratio_min=0.2, ratio_max=0.9))
    assert not torch.equal(other.mask, a.mask)
    # Scored = the masked positions, each weighted 1/t with t the row's ratio; values are log-probs
    # of the true token given the masked input.
    weights = a.weight[a.mask]
    assert (weights >= 1 / 0.9 - 1e-5).all() and (weights <= 1 / 0.2 + 1e-5).all()
    lay = tr.layout
    x = tr.tokens.clone()
    x[:, lay.output] = x[:, lay.output].masked_fill(a.mask, FMT.mask_id)
    lp = token_logp(policy(x, attention_mask=tr.attention_mask).logits, FMT, lay, tr.tokens)
    torch.testing.assert_close(a.logp, torch.where(a.mask, lp, 0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sum, (lp * a.weight).sum(1), atol=1e-4, rtol=0)


def test_plans_cover_every_step_once_and_sample_without_overlap():
    assert sample_trace_plan(8, 0).steps == tuple(range(8))
    merged = sample_trace_plan(9, 0, merge=2)
    assert merged.windows(9) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    plan = sample_trace_plan(32, 3, merge=4, seed=5)
    assert len(plan.steps) == 3 and all(s % 4 == 0 for s in plan.steps)
    assert plan == sample_trace_plan(32, 3, merge=4, seed=5)
    assert isinstance(make_plan("random_mask", 8, seed=1), RandomMaskPlan)


def test_bad_plans_and_batches_are_refused_by_name(sampled):
    policy, tr, _ = sampled
    with pytest.raises(ValueError, match="known: random_mask, trace"):
        make_plan("elbo", 8, seed=0)
    with pytest.raises(ValueError, match="no sampled steps"):
        trajectory_logprobs(policy, FMT, tr, TracePlan(()))
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        trajectory_logprobs(policy, FMT, tr, TracePlan((3, 8)))
    with pytest.raises(ValueError, match="overlap"):
        trajectory_logprobs(policy, FMT, tr, TracePlan((2, 3), merge=2))
    from dataclasses import replace
    never = replace(tr, step_map=torch.where(tr.step_map == 3, -1, tr.step_map))  # nothing revealed at step 3
    with pytest.raises(ValueError, match="reveal no token in the sampled windows"):
        trajectory_logprobs(policy, FMT, never, TracePlan((3,)))
    masked_left = replace(tr, tokens=tr.tokens.clone())
    masked_left.tokens[0, tr.layout.text.start] = FMT.mask_id
    with pytest.raises(ValueError, match="trajectory 0: text position 0 holds id"):
        trajectory_logprobs(policy, FMT, masked_left, TracePlan((0,)))


def test_iteration_plan_follows_the_learner_config():
    from learner.batch import iteration_plan
    from learner.config import LearnerConfig, validate

    plan = iteration_plan(LearnerConfig(coverage="random", sampled_steps=2, merge_steps=2), total_steps=8, seed=3)
    assert isinstance(plan, TracePlan) and len(plan.steps) == 2 and plan.merge == 2
    # the default: the reward's steps, one forward each; every step in merged windows; refusals by name
    assert iteration_plan(LearnerConfig(), 8, seed=3, reward_steps=[5, 7]) == TracePlan((5, 7))
    full = iteration_plan(LearnerConfig(coverage="all", merge_steps=3), 8, seed=3, reward_steps=[5, 7])
    assert full.windows(8) == [(0, 3), (3, 6), (6, 8)]
    for bad, why in [({"sampled_steps": 2}, "coverage=reward_steps scores the reward's steps"),
                     ({"coverage": "all", "sampled_steps": 2}, "applies to coverage=random"),
                     ({"coverage": "random"}, "would score nothing")]:
        with pytest.raises(ValueError, match=why):
            validate(LearnerConfig(**bad))
    mask_plan = iteration_plan(LearnerConfig(logprob_estimator="random_mask", mask_ratio_min=0.3), 8, seed=4)
    assert mask_plan == RandomMaskPlan(4, 0.3, 1.0)


@torch.no_grad()
def test_full_coverage_scores_every_revealed_token_exactly_once(sampled):
    """coverage=all: every output token gets its log-prob once, whatever the window size; the default
    scores only the tokens revealed at the reward's steps."""
    from learner.batch import iteration_plan, rows_per_trajectory
    from learner.config import LearnerConfig

    policy, tr, _ = sampled
    lay = tr.layout
    for merge in (1, 3):
        cfg = LearnerConfig(coverage="all", merge_steps=merge)
        got = trajectory_logprobs(policy, FMT, tr, iteration_plan(cfg, STEPS, seed=0))
        assert got.mask.sum(1).tolist() == [lay.text_len + lay.image_len] * len(tr), merge
        assert rows_per_trajectory(cfg, 2, STEPS) == -(-STEPS // merge)
    default = LearnerConfig()
    got = trajectory_logprobs(policy, FMT, tr, iteration_plan(default, STEPS, seed=0, reward_steps=[STEPS - 2, STEPS - 1]))
    assert torch.equal(got.mask, tr.step_map[:, lay.output] >= STEPS - 2) and rows_per_trajectory(default, 2, STEPS) == 2
