"""The released generators' schedules, noise and config fields, where equality with a fixture cannot
say it: at the shipped step counts, with randomness on (statistically), and for the model's flags."""
import math

import pytest
import torch
from scipy import stats

from pararl.config import ConfigError
from pararl.formats import DimooFormat, world_format
from pararl.models import LLaDAConfig, build_policy
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig, resolve_sampler
from rollout.sampler import ParallelSampler
from rollout.schedules import reveal_plan

A_FMT = DimooFormat(name="tiny-a", mask_id=1, pad_id=0, uncond_id=2, newline_id=3, boi_id=4, eoi_id=5,
                    answer_start_id=6, answer_end_ids=(7,), generate_prefix=(8, 9, 10), edit_prefix=(8, 11, 10),
                    prompt_suffix=(12,), text_vocab_size=40, image_offset=40, codebook_size=32, grid=(4, 4))


def test_the_a_schedule_at_the_shipped_steps_reveals_83_at_its_first_update():
    cfg = resolve_sampler(SamplerConfig(preset="mmada-parallel-a", steps=128, text_len=256, image_start=32, image_steps=64))
    plan = reveal_plan(cfg, 1024)
    updates = [s for s in range(128) if plan.image_update[s]]
    assert len(updates) == 64 and updates[0] == 32 and updates[-1] == 127
    assert plan.image_reveal[32] == 1024 - math.floor(1024 * math.cos(math.pi / 2 * 33 / 128)) == 83
    assert all(plan.image_ratio[s] == (s + 1) / 128 for s in updates)  # the global step, not the update index
    assert sum(plan.image_reveal) == 1024 and sum(plan.text_reveal) == 256


def test_the_m_text_schedule_is_llada_s_even_split():
    cfg = resolve_sampler(SamplerConfig(preset="mmada-parallel-m", steps=128, text_len=250, image_start=32, image_steps=30))
    plan = reveal_plan(cfg, 1024)
    assert plan.text_reveal == [2] * 122 + [1] * 6  # 250 // 128 per step, the remainder on the first steps
    linear = reveal_plan(resolve_sampler(SamplerConfig(steps=128, text_len=250)), 1024)
    assert linear.text_reveal != plan.text_reveal and sum(linear.text_reveal) == 250


def uniform_image_policy(fmt, seed=0):
    """A tiny policy whose image logits are all equal, so an image confidence is log(1/C) + scale * noise."""
    model = build_policy(LLaDAConfig(d_model=16, n_heads=2, n_layers=1, mlp_hidden_size=32, vocab_size=fmt.vocab_size,
                                     embedding_size=fmt.vocab_size, mask_token_id=fmt.mask_id), seed=seed).eval()
    with torch.no_grad():
        model.model.transformer.ff_out.weight[fmt.image_offset : fmt.image_offset + fmt.codebook_size] = 0
    return model


@pytest.mark.parametrize("preset,fmt,kind", [("mmada-parallel-a", A_FMT, stats.norm),
                                             ("mmada-parallel-m", world_format(40, 32, 16), stats.gumbel_r)])
def test_image_confidence_noise_has_the_released_kind_and_scale_per_step(preset, fmt, kind):
    steps, noise_scale = 16, 0.8
    cfg = SamplerConfig(preset=preset, steps=steps, text_len=16, image_start=4, image_steps=6, image_noise=noise_scale,
                        text_temperature=1.0, image_temperature=1.0)
    sampler = ParallelSampler(uniform_image_policy(fmt), fmt, cfg)
    draws, confs = [], []
    noise_fn, keep = sampler.confidence_noise, sampler.keep_masked
    sampler.confidence_noise = lambda *a: draws.append(noise_fn(*a)) or draws[-1]
    sampler.keep_masked = lambda conf, masked, target: confs.append((conf, masked)) or keep(conf, masked, target)
    requests = [GenerationRequest([20 + i % 5, 21], seed=i) for i in range(64)]
    sampler.sample(requests)
    updates = [s for s in range(steps) if sampler.plan.image_update[s]]
    assert len(draws) == len(updates) == 6
    logp = math.log(1 / 32 + 1e-10) if preset == "mmada-parallel-a" else math.log(1 / 32)
    for s, noise, (conf, masked) in zip(updates, draws, confs):
        scale = noise_scale * (1 - (s + 1) / steps)  # the ratio of the global step
        assert torch.allclose(conf[masked] - logp, scale * noise[masked], atol=1e-5), s
    sample = torch.cat([d.flatten() for d in draws]).double().numpy()
    assert stats.kstest(sample, kind.cdf).pvalue > 1e-3
    other = stats.gumbel_r if kind is stats.norm else stats.norm
    assert stats.kstest(sample, other.cdf).pvalue < 1e-6


def test_scale_logits_and_input_emb_norm_follow_the_reference_computation():
    fields = dict(d_model=16, n_heads=2, n_layers=2, mlp_hidden_size=32, vocab_size=50, embedding_size=50)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = build_policy(LLaDAConfig(**fields), seed=3).eval()
    flagged = build_policy(LLaDAConfig(**fields, scale_logits=True, input_emb_norm=True), seed=3).eval()
    with torch.no_grad():
        got = flagged(ids).logits
        # reference: embeddings times sqrt(d_model) in, logits over sqrt(d_model) out
        plain.model.transformer.wte.weight.mul_(4.0)
        expected = plain(ids).logits / 4.0
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("field", ["clip_qkv", "attention_layer_norm", "multi_query_attention"])
def test_unimplemented_reference_fields_are_refused_by_name(field):
    with pytest.raises(ValueError, match=field):
        LLaDAConfig(d_model=16, n_heads=2, **{field: 8.0 if field == "clip_qkv" else True})


@pytest.mark.parametrize("overrides,match", [
    (dict(preset="mmada-parallel-x"), "not a released generator"),
    (dict(preset="mmada-parallel-a", cfg_text=1.0), "never guides the text"),
    (dict(preset="mmada-parallel-a", cfg_drop_input_image=True), "no effect"),
    (dict(cfg_prompt=2.5), "cfg_scale"),
    (dict(confidence_noise="laplace"), "gumbel, gaussian"),
])
def test_sampler_configs_that_cannot_mean_what_they_say_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_sampler(SamplerConfig(**overrides))


def test_a_hand_set_field_wins_over_the_preset():
    cfg = resolve_sampler(SamplerConfig(preset="mmada-parallel-a", image_leftover="random", confidence_noise="gumbel"))
    assert (cfg.guidance, cfg.image_leftover, cfg.confidence_noise, cfg.text_schedule) == \
        ("mmada-parallel-a", "random", "gumbel", "linear")
