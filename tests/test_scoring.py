"""learner.scoring=sampled: the learner scores a trajectory under the distribution the rollout drew it
from (each released guidance rule, its unconditional rows replayed, and the temperatures)."""
from dataclasses import replace

import pytest
import torch

from learner.batch import iteration_plan
from learner.config import LearnerConfig, validate
from learner.mismatch import gap_metrics, gap_sums
from learner.trainer import Learner
from pararl.errors import ConfigError
from pararl.logprobs import from_sampler, trajectory_logprobs
from pararl.models import LLaDAConfig, build_policy
from pararl.plans import TracePlan
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig, scoring_of
from rollout.sampler import ParallelSampler
from tests.learner_tiny import FMT as LEARNER_FMT
from tests.learner_tiny import STEPS, learner_config, policy_folder, sampled_batch
from tests.test_released_sampling import A_FMT
from tests.test_sampler import FMT, REQUESTS
from tests.tiny import tiny_policy

A_REQUESTS = [GenerationRequest([13, 14, 15], seed=3), GenerationRequest([16, 17], torch.arange(16) % 32, seed=4)]
GUIDED = {  # each rule with its guidance on, tempered, at 8 steps
    "pararl": (dict(cfg_text=1.5, cfg_image=2.0, text_temperature=0.8, image_temperature=0.7), "world"),
    "mmada-parallel-m": (dict(preset="mmada-parallel-m", cfg_text=2.5, cfg_image=4.0, text_temperature=0.9), "world"),
    "mmada-parallel-a": (dict(preset="mmada-parallel-a", cfg_prompt=1.5, cfg_image=2.0, text_temperature=0.7,
                              image_temperature=0.9, image_start=2), "a"),
}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    a = build_policy(LLaDAConfig(d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=A_FMT.vocab_size,
                                 embedding_size=A_FMT.vocab_size, mask_token_id=A_FMT.mask_id), seed=5).eval()
    return {"world": (tiny_policy(root, seed=11), FMT, REQUESTS), "a": (a, A_FMT, A_REQUESTS)}


def sample(policies, rule, **extra):
    overrides, which = GUIDED[rule]
    policy, fmt, requests = policies[which]
    cfg = SamplerConfig(steps=8, text_len=16, **{**overrides, **extra})
    return policy, fmt, cfg, ParallelSampler(policy, fmt, cfg).sample(requests, group_size=2, record_policy=True)


@pytest.mark.parametrize("rule", list(GUIDED))
def test_scoring_as_sampled_replays_the_distribution_each_rule_drew_from(policies, rule):
    """Every step replayed alone under the sampler's scoring gives back, to 1e-5, the log-prob the sampler
    recorded as it drew; the same replay without the scoring does not (the rollouts' gap)."""
    policy, fmt, cfg, tr = sample(policies, rule)
    assert tr.guidance_rows.shape == (len(tr), 1 if rule != "mmada-parallel-a" else 2, tr.tokens.shape[1])
    every = TracePlan(tuple(range(8)), scoring=scoring_of(cfg))
    with torch.no_grad():
        got = trajectory_logprobs(policy, fmt, tr, every)
        unguided = trajectory_logprobs(policy, fmt, tr, replace(every, scoring=None))
    assert torch.equal(got.mask, tr.step_map[:, tr.layout.output] >= 0)
    assert (got.logp - tr.sampled_logp).abs()[got.mask].max() < 1e-5
    assert (unguided.logp - tr.sampled_logp).abs()[got.mask].max() > 1e-2
    gap = gap_metrics(gap_sums(got.logp, tr.sampled_logp, got.mask, tr.layout, cap=2.0))
    assert gap["mismatch/text_gap"] < 1e-5 and gap["mismatch/image_gap"] < 1e-5 and abs(gap["mismatch/kl"]) < 1e-5
    # pi_old for single-step windows is then the sampler's own record, with no forward at all
    free = from_sampler(tr, every)
    assert torch.equal(free.mask, got.mask) and (free.logp - got.logp).abs().max() < 1e-5


def test_a_leftover_code_is_replayed_and_merged_windows_score_each_token_once(policies):
    policy, fmt, cfg, tr = sample(policies, "mmada-parallel-a", image_leftover="random", image_steps=4)
    plan = TracePlan(tuple(range(8)), scoring=scoring_of(cfg))
    assert from_sampler(tr, plan) is None  # the leftover's random code was drawn by no forward: replay it
    merged = TracePlan((0, 4), merge=4, scoring=scoring_of(cfg))
    with torch.no_grad():
        lp = trajectory_logprobs(policy, fmt, tr, merged, chunk_rows=3)
    assert torch.equal(lp.mask, tr.step_map[:, tr.layout.output] >= 0) and torch.isfinite(lp.logp).all()


def test_a_trajectory_without_its_unconditional_rows_is_refused_by_name(policies):
    policy, fmt, cfg, tr = sample(policies, "pararl")
    with pytest.raises(ValueError, match="replays 1 unconditional row.*carry None"):
        trajectory_logprobs(policy, fmt, replace(tr, guidance_rows=None), TracePlan((7,), scoring=scoring_of(cfg)))


def test_the_learner_trains_under_the_sampled_distribution_its_ratio_starting_at_one(tmp_path):
    """On the engine: pi_old replayed under the rollout's guidance and temperature (merged windows, padded
    prompts), the first update's ratio is 1, and the gap to what was sampled is only the windows' merge."""
    folder = policy_folder(tmp_path)
    sampler = SamplerConfig(steps=STEPS, text_len=8, cfg_text=1.0, cfg_image=2.0, text_temperature=0.8,
                            image_temperature=0.9)
    cfg = learner_config(scoring="sampled", correction="tis", coverage="all", merge_steps=2)
    plan = iteration_plan(validate(cfg), STEPS, seed=0, reward_steps=None, sampled_as=scoring_of(sampler))
    assert plan == TracePlan((0, 2), merge=2, scoring=scoring_of(sampler))
    batch = sampled_batch(folder, plan=plan, sampler=sampler)
    m = Learner(cfg, folder, LEARNER_FMT).train_batch(batch)
    first = m["updates"][0]
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert all(torch.isfinite(torch.tensor(u["loss"])) for u in m["updates"])
    single = sampled_batch(folder, plan=TracePlan(tuple(range(STEPS)), scoring=plan.scoring), sampler=sampler)
    gap = gap_metrics(gap_sums(single.old.logp, single.sampled, single.old.mask, single.layout, cap=2.0))
    assert gap["mismatch/text_gap"] < 1e-5 and gap["mismatch/image_gap"] < 1e-5


def test_scoring_is_checked_at_load():
    validate(LearnerConfig(scoring="sampled"))
    with pytest.raises(ConfigError, match="learner.scoring='both' is not one of"):
        validate(LearnerConfig(scoring="both"))
    with pytest.raises(ConfigError, match="scoring=sampled replays the sampler's own states"):
        validate(LearnerConfig(scoring="sampled", logprob_estimator="random_mask"))
    with pytest.raises(ValueError, match="needs the rollouts' distribution"):
        iteration_plan(LearnerConfig(scoring="sampled", coverage="all"), 8, seed=0)
