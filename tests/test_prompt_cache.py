"""The approximate prompt cache (sampler.prompt_cache_refresh): the prompt's keys and values are reused
between refreshes and the transformer runs on the output positions only."""
import pytest
import torch

from cluster.run_config import validate_run
from learner.config import LearnerConfig, behaviour_source
from learner.mismatch import gap_metrics, gap_sums
from pararl.batching import build_batch
from pararl.errors import ConfigError
from pararl.heads import cached_span_forward, span_forward
from pararl.logprobs import trajectory_logprobs
from pararl.models import build_policy
from pararl.plans import TracePlan
from rollout.config import SamplerConfig, check_sampler, scoring_of
from rollout.sampler import ParallelSampler
from tests.test_sampler import FMT, REQUESTS
from tests.tiny import tiny_config


def policy(layers: int):
    return build_policy(tiny_config(FMT, n_layers=layers), seed=4).eval()


def sample(model, refresh: int, **extra):
    cfg = SamplerConfig(steps=8, text_len=16, cfg_text=1.0, cfg_image=2.0, prompt_cache_refresh=refresh, **extra)
    return cfg, ParallelSampler(model, FMT, cfg).sample(REQUESTS, group_size=2, record_policy=True)


def test_a_forward_through_the_cache_it_just_kept_is_the_full_forward():
    """Same state: the output positions attending to the kept prompt keys give the full forward's logits
    (left padding, an attention mask); after the output changes they move, a little."""
    model = policy(2)
    batch = build_batch(FMT, REQUESTS, 16)
    lay, ids, mask = batch.layout, batch.input_ids, batch.attention_mask
    with torch.no_grad():
        exact = span_forward(model, FMT, lay, ids, mask)
        kept, cache = cached_span_forward(model, FMT, lay, ids, mask, None, refresh=True)
        reused, same = cached_span_forward(model, FMT, lay, ids, mask, cache, refresh=False)
        assert same is cache and cache.length == lay.output_start
        for a, b, c in zip(exact, kept, reused):
            assert torch.equal(a, b) and (a - c).abs().max() < 1e-5
        moved = ids.clone()
        moved[:, lay.text] = 20  # the output fills in: the prompt's keys would move, the cache does not
        full = span_forward(model, FMT, lay, moved, mask)
        stale, _ = cached_span_forward(model, FMT, lay, moved, mask, cache, refresh=False)
    gap = max(float((f - s).abs().max()) for f, s in zip(full, stale))
    assert 1e-5 < gap < 1.0


def test_with_refresh_one_or_a_one_layer_model_the_cached_sampler_is_exact():
    """r = 1 runs no cache; in a one-layer model the prompt's keys depend only on the prompt, so any r is
    exact: the cached sampler then equals the exact one token for token."""
    two = policy(2)
    _, exact = sample(two, 1)
    _, again = sample(two, 1)
    assert torch.equal(exact.tokens, again.tokens)
    one = policy(1)
    _, plain = sample(one, 1)
    _, cached = sample(one, 4)
    assert torch.equal(plain.tokens, cached.tokens) and torch.equal(plain.step_map, cached.step_map)
    assert (plain.sampled_logp - cached.sampled_logp).abs().max() < 1e-5


def test_with_refresh_above_one_it_samples_and_the_gap_to_the_exact_policy_shows():
    model = policy(2)
    cfg, tr = sample(model, 4)
    assert not bool((tr.tokens[:, tr.layout.output] == FMT.mask_id).any())
    plan = TracePlan(tuple(range(8)), scoring=scoring_of(cfg))  # exact replay of what was drawn, per step
    with torch.no_grad():
        exact = trajectory_logprobs(model, FMT, tr, plan)
    gap = gap_metrics(gap_sums(exact.logp, tr.sampled_logp, exact.mask, tr.layout, cap=2.0))
    assert gap["mismatch/text_gap"] > 1e-6 and gap["mismatch/image_gap"] > 1e-6
    # the steps that refreshed (0 and 4) drew from the exact distribution
    refreshed = (tr.step_map[:, tr.layout.output] % 4 == 0) & exact.mask
    assert (exact.logp - tr.sampled_logp).abs()[refreshed].max() < 1e-5


def test_the_cache_is_checked_and_never_gives_pi_old():
    with pytest.raises(ConfigError, match="prompt_cache_refresh=0 must be >= 1"):
        check_sampler(SamplerConfig(prompt_cache_refresh=0))
    assert behaviour_source(LearnerConfig(), approximate_sampler=True) == "replay"
    from cluster.run_config import RunConfig

    cfg = RunConfig()
    cfg.sampler.prompt_cache_refresh, cfg.learner.behaviour = 2, "sampler"
    with pytest.raises(ConfigError, match="with sampler.prompt_cache_refresh=2 they are approximate"):
        validate_run(cfg)
