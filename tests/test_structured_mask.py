"""UniGRPO's structured masking (learner.mask_structure=stratified): each inner update of a batch scores
its own random mask of the response, the prompt never masked, a trajectory's ratios spread over the
updates; pi_old comes for every mask from the weights that sampled, and the learner uses each in turn."""
from dataclasses import replace

import pytest
import torch

from learner.batch import iteration_plan
from learner.trainer import Learner
from pararl.config import ConfigError
from pararl.logprobs import behaviour_logprobs, trajectory_logprobs
from pararl.models import load_policy
from pararl.plans import RandomMaskPlan, update_plans
from tests.learner_tiny import FMT, learner_config, policy_folder, sampled_batch

PLAN = RandomMaskPlan(seed=5, ratio_min=0.2, ratio_max=1.0, structure="stratified", updates=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return policy_folder(tmp_path_factory.mktemp("structured"))


@pytest.fixture(scope="module")
def batch(folder):
    b = sampled_batch(folder, plan=PLAN, behaviour=False)
    with torch.inference_mode():
        old = behaviour_logprobs(load_policy(folder), FMT, b, PLAN)
    return replace(b, old=type(old)(old.logp.clone(), old.mask.clone(), old.weight.clone()))


class Inputs(torch.nn.Module):
    """The policy, keeping every forward's input."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, input_ids, attention_mask=None, **kw):
        self.seen.append(input_ids.clone())
        return self.model(input_ids, attention_mask=attention_mask, **kw)


def test_each_update_has_its_own_mask_with_the_ratio_in_its_stratum_and_the_prompt_intact(folder, batch):
    plans = update_plans(PLAN)
    assert [p.update for p in plans] == [0, 1]
    assert update_plans(RandomMaskPlan(seed=5)) == (RandomMaskPlan(seed=5),)  # uniform: one mask for every update
    scoreable = batch.step_map[:, batch.layout.output] >= 0
    (m0, r0), (m1, r1) = (p.draw(batch.seeds, scoreable) for p in plans)
    assert not torch.equal(m0, m1)
    assert ((r0 >= 0.2) & (r0 < 0.6)).all() and ((r1 >= 0.6) & (r1 < 1.0)).all()
    assert torch.allclose(r1 - r0, torch.full_like(r0, 0.4)), "one offset per trajectory, spread over the strata"
    # batch invariance: the second half alone draws the same masks
    half = plans[1].draw(batch.seeds[4:], scoreable[4:])[0]
    assert torch.equal(half, m1[4:])
    spy = Inputs(load_policy(folder))
    with torch.inference_mode():
        trajectory_logprobs(spy, FMT, batch, plans[1])
    (seen,) = spy.seen
    prompt = slice(0, batch.layout.output_start)
    assert torch.equal(seen[:, prompt], batch.tokens[:, prompt])
    assert torch.equal(seen[:, batch.layout.output] == FMT.mask_id, m1)


def test_pi_old_holds_every_masks_log_probs_side_by_side(folder, batch):
    n_out = batch.layout.length - batch.layout.output_start
    assert batch.old.logp.shape == (len(batch), 2 * n_out)
    policy = load_policy(folder)
    with torch.no_grad():
        for u, (plan, old) in enumerate(zip(update_plans(PLAN), batch.old.per_update(2))):
            alone = trajectory_logprobs(policy, FMT, batch, plan)
            assert torch.equal(alone.mask, old.mask)
            torch.testing.assert_close(alone.logp, old.logp, atol=1e-5, rtol=0)


def test_the_learner_scores_each_inner_update_on_its_own_mask(folder, batch):
    cfg = learner_config(logprob_estimator="random_mask", mask_structure="stratified", updates_per_batch=2)
    learner = Learner(cfg, folder, FMT)
    first, second = learner.train_batch(batch)["updates"]
    masks = batch.old.per_update(2)
    assert first["tokens"] == float(masks[0].mask.sum()) and second["tokens"] == float(masks[1].mask.sum())
    assert first["tokens"] != second["tokens"]
    # update 0 against its own pi_old: the same weights, ratio 1; update 1 after two optimizer steps
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert max(abs(second["ratio_min"] - 1), abs(second["ratio_max"] - 1)) > 1e-3
    # without pi_old the rank computes every mask's from its weights before updating: the same first update
    again = Learner(cfg, folder, FMT).train_batch(replace(batch, old=None))["updates"][0]
    assert again["tokens"] == first["tokens"] and abs(again["ratio_max"] - 1) < 1e-5


def test_the_plan_follows_the_config_and_mismatches_are_refused(folder, batch):
    cfg = learner_config(logprob_estimator="random_mask", mask_structure="stratified", updates_per_batch=3,
                         mask_ratio_min=0.2)
    plan = iteration_plan(cfg, 4, seed=9)
    assert plan == RandomMaskPlan(9, 0.2, 1.0, "stratified", 3)
    with pytest.raises(ValueError, match="2 inner-update masks; learner.updates_per_batch is 3"):
        Learner(cfg, folder, FMT).train_batch(batch)
    with pytest.raises(ValueError, match=r"x 2 mask\(s\)"):
        replace(batch, old=batch.old.per_update(2)[0]).validate()
    with pytest.raises(ConfigError, match="mask_structure='stratified' shapes the random mask"):
        Learner(learner_config(mask_structure="stratified"), folder, FMT)
    with pytest.raises(ConfigError, match="not one of uniform, stratified"):
        Learner(learner_config(logprob_estimator="random_mask", mask_structure="cosine"), folder, FMT)
