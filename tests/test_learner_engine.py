"""One learner rank with a real DeepSpeed engine (in-process, gloo, world of one): updates, clipping, bad input."""
import math
from dataclasses import replace

import pytest
import torch

from learner.config import LearnerConfig, validate
from learner.engine import deepspeed_config
from learner.offload import optimizer_tensors
from learner.trainer import Learner
from pararl.config import ConfigError, build_config
from pararl.logprobs import TokenLogProbs
from pararl.plans import RandomMaskPlan
from tests.learner_tiny import FMT, learner_config, policy_folder, sampled_batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return policy_folder(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def batch(folder):
    return sampled_batch(folder)


def test_second_update_moves_the_ratio_away_from_one(folder, batch):
    learner = Learner(learner_config(updates_per_batch=2), folder, FMT)
    m = learner.train_batch(batch)
    first, second = m["updates"]
    # pi_old = the behaviour log-probs: the first update sees the same weights (up to float noise).
    assert abs(first["ratio_min"] - 1) < 1e-5 and abs(first["ratio_max"] - 1) < 1e-5
    assert first["clip_fraction"] == 0 and first["kl"] == pytest.approx(0, abs=1e-9)
    assert max(abs(second["ratio_min"] - 1), abs(second["ratio_max"] - 1)) > 1e-3
    assert second["kl"] > 0 and m["optimizer_steps"] == 2 and m["global_steps"] == 2
    assert first["entropy"] > 0 and first["tokens"] == 8 * (8 + 16)  # windows [0, 2) and [2, 4): every token


def shifted(batch, by):
    """The behaviour log-probs moved by ``-by`` on scored tokens: every ratio starts at exp(by)."""
    old = batch.old
    return replace(batch, old=TokenLogProbs(torch.where(old.mask, old.logp - by, 0.0), old.mask, old.weight))


def test_clipping_engages_on_a_batch_built_to_exceed_epsilon(folder, batch):
    cfg = learner_config(updates_per_batch=1, beta=0.0, grad_accumulation=2, eps_high=0.2)
    learner = Learner(cfg, folder, FMT)
    before = learner.weights_hash()
    positive = replace(shifted(batch, 1.0), advantages=batch.advantages.abs() + 0.1)
    m = learner.train_batch(positive)
    assert m["ratio_min"] > 1.2 and m["clip_fraction"] == 1.0
    assert learner.weights_hash() == before, "fully clipped tokens carry no gradient: the weights must not move"
    negative = replace(positive, advantages=-positive.advantages)
    m = learner.train_batch(negative)
    assert m["clip_fraction"] == 0.0 and learner.weights_hash() != before


def test_random_mask_estimator_and_bf16_train(folder):
    plan = RandomMaskPlan(seed=3, ratio_min=0.3, ratio_max=0.8)
    b = sampled_batch(folder, plan=plan)
    learner = Learner(learner_config(precision="bf16", logprob_estimator="random_mask", updates_per_batch=1), folder, FMT)
    m = learner.train_batch(b)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["tokens"] == float(b.old.mask.sum())
    assert learner.module.model.transformer.wte.weight.dtype == torch.bfloat16


def test_pi_old_is_computed_when_the_batch_has_none(folder, batch):
    learner = Learner(learner_config(updates_per_batch=1), folder, FMT)
    m = learner.train_batch(replace(batch, old=None))
    assert m["ratio_min"] == pytest.approx(1.0, abs=1e-6) and m["ratio_max"] == pytest.approx(1.0, abs=1e-6)


def test_deepspeed_config_follows_the_learner_config():
    ds = deepspeed_config(learner_config(zero_stage=3, precision="bf16", micro_batch_size=2, grad_accumulation=3, grad_clip=0.5), world=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5 and ds["zero_allow_untested_optimizer"]


def test_bad_config_and_batches_are_refused_by_name(folder, batch):
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        Learner(learner_config(precision="fp16"), folder, FMT)
    with pytest.raises(ConfigError, match="learner.kl_estimator='k4' is not a known KL estimator; known: k1, k2, k3"):
        validate(learner_config(kl_estimator="k4"))
    with pytest.raises(ConfigError, match="is not a known log-probability estimator; known: random_mask, trace"):
        validate(build_config(LearnerConfig, overrides=["logprob_estimator=elbo"]))
    with pytest.raises(ConfigError, match="did you mean 'kl_estimator'"):
        build_config(LearnerConfig, overrides=["kl_estimatr=k1"])
    with pytest.raises(ConfigError, match="zero_stage=4"):
        validate(learner_config(zero_stage=4))
    learner = Learner(learner_config(micro_batch_size=3, grad_accumulation=1), folder, FMT)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x grad_accumulation = 3"):
        learner.train_batch(batch)
    learner = Learner(learner_config(), folder, FMT)
    with pytest.raises(ValueError, match="computed with a different plan"):
        learner.train_batch(replace(batch, plan=replace(batch.plan, steps=(0,), merge=1)))
    with pytest.raises(ValueError, match="reveal no token in the sampled windows"):
        never = replace(batch, step_map=torch.where(batch.step_map == 3, -1, batch.step_map),
                        plan=replace(batch.plan, steps=(3,), merge=1), old=None)
        learner.train_batch(never)


def test_kl_against_pi_old_needs_no_reference_and_checkpointing_changes_nothing(folder, batch):
    old_kl = Learner(learner_config(kl_reference="old", updates_per_batch=2), folder, FMT)
    assert old_kl.reference is None
    m = old_kl.train_batch(batch)
    assert m["updates"][0]["kl"] == pytest.approx(0, abs=1e-9) and m["updates"][1]["kl"] > 0
    plain = Learner(learner_config(updates_per_batch=1), folder, FMT)
    ckpt = Learner(learner_config(updates_per_batch=1, gradient_checkpointing=True), folder, FMT)
    assert ckpt.module.is_gradient_checkpointing
    plain.train_batch(batch)
    ckpt.train_batch(batch)
    for (name, a), (_, b) in zip(plain.module.named_parameters(), ckpt.module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_padding_rows_train_nothing_and_count_in_no_denominator(folder, batch):
    """A batch grown to whole optimizer steps with weight-0 copies (so the driver never cuts a usable
    trajectory) reports exactly its real rows' tokens and loss, and what the copies hold moves nothing."""
    real = replace(batch.select(slice(0, 3)), old=None)
    alone = Learner(learner_config(micro_batch_size=3, grad_accumulation=1, updates_per_batch=1), folder, FMT)
    m_alone = alone.train_batch(real)
    grown = real.padded(8)
    assert len(grown) == 8 and grown.row_weight.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    cfg = learner_config(micro_batch_size=2, grad_accumulation=4, updates_per_batch=1)
    padded = Learner(cfg, folder, FMT)
    m_pad = padded.train_batch(grown)
    assert m_pad["tokens"] == m_alone["tokens"] and m_pad["optimizer_steps"] == 1
    assert m_pad["loss"] == pytest.approx(m_alone["loss"], rel=1e-5, abs=1e-7)
    # other advantages in the copies: the very same update (their coefficients are exactly 0)
    other = Learner(cfg, folder, FMT)
    other.train_batch(replace(grown, advantages=torch.where(grown.row_weight > 0, grown.advantages, 50.0)))
    assert other.weights_hash() == padded.weights_hash()
    # the same rows with weight 1 would have trained: row_weight 0 is what switches the copies off
    counted = Learner(cfg, folder, FMT)
    counted.train_batch(replace(grown, row_weight=torch.ones(8)))
    assert counted.weights_hash() != padded.weights_hash()


@pytest.mark.parametrize("text_weight,image_weight", [(1.0, 1.0), (1.0, 0.25), (0.0, 2.0)])
def test_modality_weights_scale_each_tokens_term_as_computed_by_hand(folder, batch, text_weight, image_weight):
    """First update, ratio 1: the policy-gradient loss is -sum_r A_r (w_t n_text_r + w_i n_image_r) / tokens."""
    cfg = learner_config(updates_per_batch=1, beta=0.0, micro_batch_size=4, grad_accumulation=2,
                         text_weight=text_weight, image_weight=image_weight)
    m = Learner(cfg, folder, FMT).train_batch(batch)
    lay, mask = batch.layout, batch.old.mask
    n_text = mask[:, lay.relative(lay.text)].sum(1).double()
    n_image = mask[:, lay.relative(lay.image)].sum(1).double()
    expected = -(batch.advantages.double() * (text_weight * n_text + image_weight * n_image)).sum() / mask.sum()
    assert m["pg_loss"] == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "row"])
def test_each_aggregation_at_ratio_one_as_computed_by_hand(folder, batch, aggregation):
    """First update, ratio 1: token t of trajectory r contributes -A_r w_t, w = 0.5 on text and 1 on image,
    averaged over all tokens (token), within each trajectory then over trajectories (sequence), or within
    each (trajectory, replay window) row then over rows (row)."""
    from pararl.logprobs import window_index

    cfg = learner_config(updates_per_batch=1, beta=0.0, micro_batch_size=4, grad_accumulation=2, aggregation=aggregation,
                         text_weight=0.5, image_weight=1.0)
    m = Learner(cfg, folder, FMT).train_batch(batch)
    lay, mask = batch.layout, batch.old.mask
    w = torch.ones(mask.shape[1], dtype=torch.float64)
    w[lay.relative(lay.text)] = 0.5
    window = window_index(batch.step_map[:, lay.output], batch.plan, batch.steps)
    groups = {"token": [[(r, t) for r in range(len(batch)) for t in range(mask.shape[1]) if mask[r, t]]],
              "sequence": [[(r, t) for t in range(mask.shape[1]) if mask[r, t]] for r in range(len(batch))],
              "row": [[(r, t) for t in range(mask.shape[1]) if mask[r, t] and window[r, t] == k]
                      for r in range(len(batch)) for k in range(int(window.max()) + 1)]}[aggregation]
    groups = [g for g in groups if g]
    a = batch.advantages.double()
    expected = sum(sum(-a[r] * w[t] for r, t in g) / len(g) for g in groups) / len(groups)
    assert m["pg_loss"] == pytest.approx(float(expected), abs=1e-5)


def test_tis_weights_the_policy_gradient_and_a_correction_needs_the_sampled_log_probs(folder, batch):
    """First update, ratio 1: with mu = pi_old every weight is 1 (the uncorrected loss); with pi_old / mu = 3
    everywhere, TIS at cap 2 doubles the policy-gradient loss and every ratio counts as truncated."""
    cfg = dict(updates_per_batch=1, beta=0.0, micro_batch_size=4, grad_accumulation=2)
    plain = Learner(learner_config(**cfg), folder, FMT).train_batch(replace(batch, sampled=batch.old.logp.clone()))
    assert plain["mismatch/text_gap"] == 0 and plain["mismatch/truncated"] == 0
    same = Learner(learner_config(correction="tis", **cfg), folder, FMT).train_batch(replace(batch, sampled=batch.old.logp.clone()))
    assert same["pg_loss"] == pytest.approx(plain["pg_loss"], abs=1e-6)
    far = replace(batch, sampled=batch.old.logp - math.log(3))
    tis = Learner(learner_config(correction="tis", correction_cap=2.0, **cfg), folder, FMT).train_batch(far)
    assert tis["pg_loss"] == pytest.approx(2 * plain["pg_loss"], abs=1e-5)
    assert tis["mismatch/truncated"] == 1 and tis["mismatch/image_gap"] == pytest.approx(math.log(3), abs=1e-5)
    with pytest.raises(ValueError, match="needs the log-probs the rollout sampled from"):
        Learner(learner_config(correction="mis", **cfg), folder, FMT).train_batch(replace(batch, sampled=None))
    with pytest.raises(ConfigError, match="correction_cap=0.5 must be >= 1"):
        validate(LearnerConfig(correction="tis", correction_cap=0.5))


def test_modality_weights_are_checked():
    with pytest.raises(ConfigError, match="one positive"):
        validate(LearnerConfig(text_weight=0.0, image_weight=0.0))
    with pytest.raises(ConfigError, match="learner.image_weight=-1.0 must be >= 0"):
        validate(LearnerConfig(image_weight=-1.0))


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (0, "bf16")])
def test_the_optimizer_state_steps_aside_to_new_storage_and_training_goes_on_as_if_it_never_left(folder, batch, stage,
                                                                                                  precision):
    cfg = learner_config(zero_stage=stage, precision=precision, updates_per_batch=1)
    aside, stayed = Learner(cfg, folder, FMT), Learner(cfg, folder, FMT)
    aside.train_batch(batch), stayed.train_batch(batch)
    params = sum(p.numel() for p in aside.module.parameters())
    before = [t.data_ptr() for t in optimizer_tensors(aside.engine)]
    moved = aside.step_aside(copy=True)  # on CPU only a forced copy moves anything: new storage for every tensor
    assert aside.stepped_aside and 12 * params <= moved < 13 * params  # fp32 master + two Adam moments
    assert all(t.data_ptr() != p for t, p in zip(optimizer_tensors(aside.engine), before))
    assert aside.step_aside() == 0  # already aside
    aside.train_batch(batch), stayed.train_batch(batch)  # the update brings it back and uses the moved tensors
    assert not aside.stepped_aside and aside.weights_hash() == stayed.weights_hash()
    assert Learner(cfg, folder, FMT).step_aside() == 0  # a CPU rank's state is in host memory already
