"""The sampled distribution: what the sampler records as it draws, its gap to pi_old, and the corrections."""
import math
from dataclasses import replace

import pytest
import torch

from learner.mismatch import correction_weights, gap_metrics, gap_sums
from pararl.batching import build_batch
from pararl.guidance import make_guidance
from pararl.logprobs import trajectory_logprobs
from pararl.plans import TracePlan
from rollout.config import SamplerConfig, resolve_sampler
from rollout.sampler import ParallelSampler
from tests.test_sampler import FMT, REQUESTS
from tests.tiny import tiny_policy

GROUP = 2


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("mismatch"), seed=11)


def guided_replay(policy, tr, cfg: SamplerConfig) -> torch.Tensor:
    """[R, L_out] the log-prob of each revealed token under guidance and temperature, from a replay of the
    state before the step that revealed it: the conditional rows and one unconditional row per
    trajectory (the sampler's pararl guidance), written out here step by step."""
    lay, g = tr.layout, make_guidance(resolve_sampler(cfg))
    uncond = build_batch(FMT, REQUESTS, cfg.text_len).uncond_ids.repeat_interleave(GROUP, 0)
    out = torch.zeros(len(tr), lay.length - lay.output_start)
    rtext, rimage = lay.relative(lay.text), lay.relative(lay.image)
    for s in range(tr.steps):
        state = tr.tokens.masked_fill(tr.step_map >= s, FMT.mask_id)
        unc = uncond.clone()
        unc[:, lay.output] = state[:, lay.output]
        with torch.no_grad():
            logits = policy(torch.cat([state, unc]), attention_mask=tr.attention_mask.repeat(2, 1)).logits
        cond_l, unc_l = logits[: len(tr)], logits[len(tr):]
        text = FMT.restrict_text_logits(g.text(cond_l[:, lay.text], unc_l[:, lay.text]))
        text_lp = torch.log_softmax(text.float() / cfg.text_temperature, -1).gather(-1, tr.text_tokens[..., None])[..., 0]
        image = g.image(FMT.restrict_image_logits(cond_l[:, lay.image]), [FMT.restrict_image_logits(unc_l[:, lay.image])])
        codes = FMT.image_codes(tr.image_tokens)
        image_lp = torch.log_softmax(image.float() / cfg.image_temperature, -1).gather(-1, codes[..., None])[..., 0]
        at = tr.step_map[:, lay.output] == s
        out[:, rtext] = torch.where(at[:, rtext], text_lp, out[:, rtext])
        out[:, rimage] = torch.where(at[:, rimage], image_lp, out[:, rimage])
    return out


def test_the_recorded_log_prob_is_the_guided_tempered_distribution_it_was_drawn_from(policy):
    cfg = SamplerConfig(steps=8, text_len=16, cfg_text=1.5, cfg_image=2.0, text_temperature=0.8, image_temperature=0.7)
    tr = ParallelSampler(policy, FMT, cfg).sample(REQUESTS, group_size=GROUP)
    revealed = tr.step_map[:, tr.layout.output] >= 0  # structural output columns are never drawn
    assert tr.sampled_logp.shape == revealed.shape and (tr.sampled_logp[revealed] < 0).all()
    assert (tr.sampled_logp - guided_replay(policy, tr, cfg)).abs().max() < 1e-5


def test_without_guidance_at_temperature_one_it_is_the_learners_log_prob_and_the_gap_is_zero(policy):
    cfg = SamplerConfig(steps=8, text_len=16, cfg_text=0.0, cfg_image=0.0, text_temperature=1.0, image_temperature=1.0)
    tr = ParallelSampler(policy, FMT, cfg).sample(REQUESTS, group_size=GROUP)
    with torch.no_grad():
        learner = trajectory_logprobs(policy, FMT, tr, TracePlan(tuple(range(8))))  # every step, one forward each
    assert torch.equal(learner.mask, tr.step_map[:, tr.layout.output] >= 0)  # every revealed token
    assert (learner.logp - tr.sampled_logp).abs().max() < 1e-5
    metrics = gap_metrics(gap_sums(learner.logp, tr.sampled_logp, learner.mask, tr.layout, cap=2.0))
    assert all(abs(v) < 1e-5 for v in metrics.values()), metrics
    # with guidance on, the same policy's log-probs are not what was sampled from: the gap shows
    guided = SamplerConfig(steps=8, text_len=16, cfg_text=1.5, cfg_image=2.0, text_temperature=0.8)
    tg = ParallelSampler(policy, FMT, guided).sample(REQUESTS, group_size=GROUP)
    with torch.no_grad():
        lg = trajectory_logprobs(policy, FMT, tg, TracePlan(tuple(range(8))))
    shown = gap_metrics(gap_sums(lg.logp, tg.sampled_logp, lg.mask, tg.layout, cap=2.0))
    assert shown["mismatch/text_gap"] > 1e-3 and shown["mismatch/image_gap"] > 1e-3 and shown["mismatch/kl"] > 0


def test_tis_and_mis_weights_are_one_without_a_gap_and_truncate_at_the_cap():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))
    mask = torch.tensor([[True, True, False]])
    for kind in ("none", "tis", "mis"):
        assert torch.allclose(correction_weights(old, old, mask, kind, cap=2.0), torch.ones(1, 3))
    sampled = old - torch.log(torch.tensor([[5.0, 1.5, 9.0]]))  # ratios pi_old / mu = 5, 1.5 (and 9, unscored)
    assert torch.allclose(correction_weights(old, sampled, mask, "tis", 2.0), torch.tensor([[2.0, 1.5, 1.0]]))
    assert torch.allclose(correction_weights(old, sampled, mask, "mis", 2.0), torch.tensor([[0.0, 1.5, 1.0]]))
    from pararl.formats import OutputLayout

    lay = OutputLayout(length=3, output_start=0, image_start=0, image_len=1, text_start=1, text_len=2)
    m = gap_metrics(gap_sums(old, sampled, mask, lay, cap=2.0))
    assert m["mismatch/truncated"] == pytest.approx(0.5)
    assert m["mismatch/image_gap"] == pytest.approx(math.log(5)) and m["mismatch/text_gap"] == pytest.approx(math.log(1.5))
    assert m["mismatch/kl"] == pytest.approx(((5 - 1 - math.log(5)) + (1.5 - 1 - math.log(1.5))) / 2)


@pytest.mark.parametrize("steps", [tuple(range(8)), (5, 7)])
def test_the_samplers_own_forwards_give_pi_old_for_single_step_windows(policy, steps):
    """Guided, tempered sampling; pi_old (unguided, temperature 1) read off the sampler's forwards equals a
    trace replay of the same single-step windows, and merged windows or a leftover code fall back to replay."""
    from pararl.logprobs import from_sampler

    cfg = SamplerConfig(steps=8, text_len=16, cfg_text=1.5, cfg_image=2.0, text_temperature=0.8)
    assert ParallelSampler(policy, FMT, cfg).sample(REQUESTS, group_size=GROUP).policy_logp is None  # only when asked
    tr = ParallelSampler(policy, FMT, cfg).sample(REQUESTS, group_size=GROUP, record_policy=True)
    plan = TracePlan(steps)
    with torch.no_grad():
        replayed = trajectory_logprobs(policy, FMT, tr, plan)
    free = from_sampler(tr, plan)
    assert torch.equal(free.mask, replayed.mask) and free.mask.any()
    assert (free.logp - replayed.logp).abs().max() < 1e-5
    assert from_sampler(tr, TracePlan((0, 4), merge=4)) is None
    left = ParallelSampler(policy, FMT, replace(cfg, image_leftover="random", image_steps=4)).sample(
        REQUESTS, group_size=GROUP, record_policy=True)
    assert torch.isnan(left.policy_logp).any()  # the leftover's random code was drawn by no forward
    assert from_sampler(left, TracePlan(tuple(range(8)))) is None


def test_learner_behaviour_sampler_is_checked_at_load():
    from learner.config import LearnerConfig, validate
    from pararl.errors import ConfigError

    validate(LearnerConfig(behaviour="sampler"))
    with pytest.raises(ConfigError, match="behaviour=sampler reads pi_old off the sampler's forwards"):
        validate(LearnerConfig(behaviour="sampler", coverage="all", merge_steps=4))


def test_auto_behaviour_reads_the_sampler_only_where_windows_are_single_steps():
    from learner.config import LearnerConfig, behaviour_source

    assert behaviour_source(LearnerConfig()) == "sampler"  # the reward's steps, one forward each
    assert behaviour_source(LearnerConfig(coverage="all", merge_steps=4)) == "replay"
    assert behaviour_source(LearnerConfig(logprob_estimator="random_mask")) == "replay"
    assert behaviour_source(LearnerConfig(behaviour="replay")) == "replay"


def test_the_rollout_worker_reads_pi_old_off_its_sampler_as_a_replay_would_compute_it(tmp_path):
    """On the worker, guided and tempered: pi_old from the sampler's forwards equals the replay forward's,
    for the unguided policy and under the sampled distribution (learner.scoring=sampled) alike."""
    from pararl.types import GenerationRequest
    from rollout.config import scoring_of
    from rollout.worker import RolloutWorker
    from tests.tiny import tiny_bundle

    folder, _ = tiny_bundle(tmp_path)
    cfg = SamplerConfig(steps=8, text_len=16, cfg_text=1.5, cfg_image=2.0, text_temperature=0.8)
    requests = [GenerationRequest([3, 4, 5], seed=1), GenerationRequest([6, 7], seed=2)]
    workers = {b: RolloutWorker(str(folder), cfg, behaviour=b) for b in ("replay", "sampler")}
    for scoring in (None, scoring_of(cfg)):
        plan = TracePlan((5, 7), scoring=scoring)
        (tr, replayed), (ts, free) = (workers[b].sample(requests, 2, (), plan=plan) for b in ("replay", "sampler"))
        assert torch.equal(tr.tokens, ts.tokens) and ts.policy_logp is not None and tr.policy_logp is None
        assert torch.equal(replayed.mask, free.mask) and (replayed.logp - free.logp).abs().max() < 1e-5
