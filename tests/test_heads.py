"""The span heads (pararl.heads): logits only at the output positions and over each span's ids, equal
to the full head's slice, so sampling, the learner's log-probs and the SFT loss are unchanged.

Equal to float rounding, not to the bit: the BLAS kernel picks its blocking from the matrix's shape, and
on some CPUs (AVX-512 EPYC, CI's among them) a sliced head's dot products are summed in another order
(a few units in the last place). Tokens, step maps and snapshots are compared exactly."""
from dataclasses import replace

import pytest
import torch

from learner.sft import masked_loss
from pararl.batching import build_batch
from pararl.heads import FullHead, span_forward
from pararl.logprobs import trajectory_logprobs
from pararl.models import build_policy
from pararl.plans import TracePlan
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.test_sampler import FMT, REQUESTS
from tests.test_scoring import A_FMT, A_REQUESTS
from tests.tiny import tiny_config


def assert_rounding_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """A few float32 ulps at the logits' scale; a wrong slice (one id or position off) is orders larger."""
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def policy_for(fmt, **overrides):
    return build_policy(tiny_config(fmt, **overrides), seed=3).eval()


@pytest.mark.parametrize("head", [dict(weight_tying=False), dict(weight_tying=True), dict(include_bias=True),
                                  dict(scale_logits=True)])
@pytest.mark.parametrize("text_vocab", ["text", "all"])
def test_each_span_block_is_the_full_heads_slice_to_rounding(head, text_vocab):
    fmt = replace(FMT, text_vocab=text_vocab)
    policy = policy_for(fmt, **head)
    if head.get("include_bias"):
        with torch.no_grad():
            policy.model.transformer.ff_out.bias.normal_()
    batch = build_batch(fmt, REQUESTS, 16)  # prompts of different lengths: left padding, an attention mask
    assert not bool(batch.attention_mask.all())
    lay = batch.layout
    with torch.no_grad():
        full = policy(batch.input_ids, attention_mask=batch.attention_mask).logits
        text, image = span_forward(policy, fmt, lay, batch.input_ids, batch.attention_mask)
    assert text.shape == (len(REQUESTS), lay.text_len, full.shape[-1] if text_vocab == "all" else fmt.text_vocab_size)
    assert image.shape == (len(REQUESTS), lay.image_len, fmt.codebook_size)
    ids = full.shape[-1] if text_vocab == "all" else fmt.text_vocab_size
    assert_rounding_equal(text, full[:, lay.text, :ids], "text")
    assert_rounding_equal(image, full[:, lay.image, fmt.image_offset : fmt.image_offset + fmt.codebook_size], "image")
    shifted = full[:, lay.image, fmt.image_offset + 1 : fmt.image_offset + fmt.codebook_size + 1]
    assert not torch.allclose(image, shifted, rtol=1e-6, atol=1e-6)  # the tolerance tells slices apart


@pytest.mark.parametrize("rule", ["pararl", "mmada-parallel-a"])
def test_a_trajectory_sampled_through_the_span_heads_equals_the_full_heads_token_for_token(rule):
    """Guided and tempered, -A's second forward included; the behaviour and the learner's log-probs too."""
    if rule == "pararl":
        fmt, requests, policy = FMT, REQUESTS, policy_for(FMT)
        cfg = SamplerConfig(steps=8, text_len=16, cfg_text=1.5, cfg_image=2.0, text_temperature=0.8)
    else:
        fmt, requests = A_FMT, A_REQUESTS
        policy = build_policy(tiny_config(A_FMT, embedding_size=A_FMT.vocab_size), seed=3).eval()
        cfg = SamplerConfig(steps=8, text_len=16, preset="mmada-parallel-a", cfg_prompt=1.5, cfg_image=2.0,
                            text_temperature=0.7, image_start=2)
    runs = [ParallelSampler(p, fmt, cfg).sample(requests, group_size=2, snapshot_steps=(3, 7), record_policy=True)
            for p in (policy, FullHead(policy))]
    heads, full = runs
    for name in ("tokens", "step_map", "snapshot_x0"):
        assert torch.equal(getattr(heads, name), getattr(full, name)), name
    for name in ("sampled_logp", "policy_logp"):
        assert_rounding_equal(getattr(heads, name), getattr(full, name), name)
    plan = TracePlan((0, 4), merge=4)
    with torch.no_grad():
        a, b = (trajectory_logprobs(p, fmt, heads, plan, with_entropy=True) for p in (policy, FullHead(policy)))
    assert_rounding_equal(a.logp, b.logp, "logp")
    assert_rounding_equal(a.entropy, b.entropy, "entropy")


def test_the_sft_loss_through_the_span_heads_equals_the_full_heads():
    from learner.sft import Bucket

    policy = policy_for(FMT)
    batch = build_batch(FMT, REQUESTS, 16)
    lay, gen = batch.layout, torch.Generator().manual_seed(0)
    ids, uncond_ids = batch.input_ids.clone(), batch.uncond_ids.clone()
    for t in (ids, uncond_ids):  # targets in the output spans: codes and text ids
        t[:, lay.image] = FMT.image_offset + torch.randint(FMT.codebook_size, (len(t), lay.image_len), generator=gen)
        t[:, lay.text] = torch.randint(10, 30, (len(t), lay.text_len), generator=gen)
    bucket = Bucket(ids, uncond_ids, batch.attention_mask, lay)
    rows = torch.arange(len(REQUESTS))
    uncond = torch.tensor([False, True, False])[: len(REQUESTS)]
    t = torch.rand(len(REQUESTS), 2, generator=gen) * 0.8 + 0.2
    u = torch.rand(len(REQUESTS), batch.layout.image_len + batch.layout.text_len, generator=gen)
    losses = [masked_loss(p, FMT, bucket, rows, uncond, t, u) for p in (policy, FullHead(policy))]
    assert_rounding_equal(losses[0][0], losses[1][0], "loss")
    assert losses[0][1] == losses[1][1]


def test_the_gradients_through_the_span_heads_equal_the_full_heads_up_to_rounding():
    """The backward sums over fewer positions and ids (the rest contribute exact zeros), in another order:
    equal to float rounding, not to the bit, so a training run's figures move within their noise."""
    from learner.sft import Bucket

    policy = policy_for(FMT).train()
    batch = build_batch(FMT, REQUESTS, 16)
    lay, gen = batch.layout, torch.Generator().manual_seed(1)
    ids = batch.input_ids.clone()
    ids[:, lay.image] = FMT.image_offset + torch.randint(FMT.codebook_size, (len(ids), lay.image_len), generator=gen)
    ids[:, lay.text] = torch.randint(10, 30, (len(ids), lay.text_len), generator=gen)
    bucket = Bucket(ids, ids.clone(), batch.attention_mask, lay)
    rows, uncond = torch.arange(len(ids)), torch.zeros(len(ids), dtype=torch.bool)
    t = torch.full((len(ids), 2), 0.6)
    u = torch.rand(len(ids), lay.image_len + lay.text_len, generator=gen)
    grads = []
    for model in (policy, FullHead(policy)):
        policy.zero_grad()
        masked_loss(model, FMT, bucket, rows, uncond, t, u)[0].backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
