"""The parallel sampler follows both schedules, batches without changing any sample, and snapshots right."""
import math
from fractions import Fraction

import pytest
import torch

from pararl import noise
from pararl.batching import build_batch
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.tiny import CODEBOOK, IMAGE_TOKENS, tiny_format, tiny_policy

FMT = tiny_format()
REQUESTS = [
    GenerationRequest([10, 11, 12], seed=5),
    GenerationRequest([13, 14, 15, 16, 17, 18, 19], seed=6),
    GenerationRequest([20, 21], input_codes=torch.arange(IMAGE_TOKENS) % CODEBOOK, seed=7),
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("sampler"), seed=11)


def run(policy, requests=REQUESTS, group=3, snaps=(), **cfg):
    cfg = SamplerConfig(**{"steps": 8, "text_len": 16, "cfg_image": 2.0, **cfg})
    return ParallelSampler(policy, FMT, cfg).sample(requests, group_size=group, snapshot_steps=snaps)


def test_every_output_position_is_revealed_and_prompt_never_changes(policy):
    tr = run(policy)
    lay = tr.layout
    assert not (tr.output == FMT.mask_id).any()
    start = build_batch(FMT, REQUESTS, 16).input_ids.repeat_interleave(3, 0)
    assert torch.equal(tr.tokens[:, : lay.output_start], start[:, : lay.output_start])
    structural = torch.ones(lay.length, dtype=torch.bool)
    structural[lay.image] = False
    structural[lay.text] = False
    assert torch.equal(tr.tokens[:, structural], start[:, structural])
    assert (tr.step_map[:, structural] == -1).all()
    assert (tr.step_map[:, lay.image] >= 0).all() and (tr.step_map[:, lay.text] >= 0).all()
    codes = FMT.image_codes(tr.image_tokens)
    assert (codes >= 0).all(), "image positions hold codebook tokens only"
    assert ((tr.text_tokens < FMT.text_vocab_size) & ~torch.isin(tr.text_tokens, torch.tensor(FMT.special_ids))).all()


@pytest.mark.parametrize("steps,block", [(8, None), (16, None), (8, 4), (4, 8)])
def test_text_reveals_follow_the_linear_schedule(policy, steps, block):
    n = 16
    tr = run(policy, steps=steps, block_length=block, text_temperature=0.7)
    sm = tr.step_map[:, tr.layout.text]
    b = block or n
    per_block = steps // (n // b)
    for k in range(steps):
        blk, local = divmod(k, per_block)
        # after step k: later blocks fully masked, the active one int(b * (1 - (local+1)/per_block))
        expected = (n // b - blk - 1) * b + math.floor(b * (1 - Fraction(local + 1, per_block)))
        assert ((sm > k).sum(-1) == expected).all(), k
        # reveals stay inside the active block
        revealed_now = (sm == k).nonzero()[:, 1]
        assert ((revealed_now >= blk * b) & (revealed_now < (blk + 1) * b)).all()


@pytest.mark.parametrize("steps,image_steps,start", [(8, None, 0), (16, 6, 4)])
def test_image_masked_ratio_follows_the_cosine_schedule(policy, steps, image_steps, start):
    tr = run(policy, steps=steps, image_steps=image_steps, image_start=start)
    sm = tr.step_map[:, tr.layout.image]
    t_img = image_steps or steps
    updates = torch.linspace(start, steps - 1, t_img).round().long().tolist()
    assert sorted(set(sm.flatten().tolist())) <= updates
    left = IMAGE_TOKENS
    for j, s in enumerate(updates):
        # the released rule: the ratio of the GLOBAL step, each update reveals >= 1 and leaves >= 1 ...
        left = max(1, min(left - 1, math.floor(IMAGE_TOKENS * math.cos(math.pi / 2 * (s + 1) / steps))))
        expected = 0 if j == t_img - 1 else left  # ... except the last, which reveals all
        assert ((sm > s).sum(-1) == expected).all(), (j, s)


def test_cfg_logits_follow_the_formula(policy):
    cfg = SamplerConfig(steps=8, text_len=16, cfg_image=3.0, cfg_text=1.5)
    sampler = ParallelSampler(policy, FMT, cfg)
    batch = build_batch(FMT, REQUESTS, 16)
    lay = batch.layout
    with torch.no_grad():
        both = policy(torch.cat([batch.input_ids, batch.uncond_ids]), attention_mask=batch.attention_mask.repeat(2, 1)).logits
        rows = len(REQUESTS)  # what one sampler step does with that forward's logits
        text_l = FMT.restrict_text_logits(sampler.guidance.text(both[:rows, lay.text], both[rows:, lay.text]))
        image_l = sampler.image_logits(both[:, lay.image, FMT.image_offset : FMT.image_offset + CODEBOOK],
                                       batch.input_ids, [], None, lay)
        cond = policy(batch.input_ids, attention_mask=batch.attention_mask).logits
        unc = policy(batch.uncond_ids, attention_mask=batch.attention_mask).logits
    img = lambda t: t[:, lay.image, FMT.image_offset : FMT.image_offset + CODEBOOK]  # noqa: E731
    assert torch.allclose(image_l, 4.0 * img(cond) - 3.0 * img(unc), atol=1e-5)
    txt = lambda t: t[:, lay.text, : FMT.text_vocab_size]  # noqa: E731
    expected = 2.5 * txt(cond) - 1.5 * txt(unc)
    allowed = torch.ones(FMT.text_vocab_size, dtype=torch.bool)
    allowed[list(FMT.special_ids)] = False
    assert torch.allclose(text_l[..., allowed], expected[..., allowed], atol=1e-5)
    assert torch.isinf(text_l[..., ~allowed]).all()
    # the unconditional rows blank the prompt text and keep the same length
    prompt_cols = batch.input_ids[0] == 10
    assert batch.uncond_ids.shape == batch.input_ids.shape
    assert (batch.uncond_ids[0, prompt_cols] == FMT.uncond_id).all()


def test_cfg_changes_the_image_and_only_the_image_when_text_cfg_is_off(policy):
    plain = run(policy, cfg_image=0.0, text_temperature=0.0, image_temperature=0.0, image_noise=0.0)
    guided = run(policy, cfg_image=5.0, text_temperature=0.0, image_temperature=0.0, image_noise=0.0)
    assert not torch.equal(plain.image_tokens, guided.image_tokens)


def test_batched_sample_equals_the_same_sample_alone(policy):
    together = run(policy, snaps=(3, 7))
    for i, request in enumerate(REQUESTS):
        alone = run(policy, requests=[request], snaps=(3, 7))
        rows = together.prompt_index == i
        assert torch.equal(alone.output, together.output[rows])
        out = together.layout.output
        assert torch.equal(alone.step_map[:, alone.layout.output], together.step_map[rows][:, out])
        assert torch.equal(alone.snapshot_x0, together.snapshot_x0[rows])
    assert together.attention_mask[0].sum() < together.attention_mask[3].sum()  # lengths really differ


def test_seeded_and_deterministic(policy):
    a, b = run(policy), run(policy)
    assert torch.equal(a.tokens, b.tokens)
    members = a.output[a.prompt_index == 0]
    assert len({tuple(r.tolist()) for r in members}) == 3, "group members draw different trajectories"
    other = run(policy, requests=[GenerationRequest([10, 11, 12], seed=99)])
    assert not torch.equal(other.output, a.output[:3])


def test_snapshots_exist_exactly_at_requested_steps_and_match_the_step_map(policy):
    steps = (0, 3, 7)
    tr = run(policy, snaps=(7, 3, 0, 3))
    assert tr.snapshot_steps.tolist() == list(steps)
    assert tr.snapshot_tokens.shape[1] == 3
    sm = tr.step_map[:, tr.layout.output]
    final = tr.output
    for t in steps:
        revealed, x0 = tr.snapshot(t)
        known = (sm <= t) & (sm >= 0)
        assert torch.equal(revealed[known], final[known])
        assert (revealed[sm > t] == FMT.mask_id).all()
        assert torch.equal(revealed[sm == -1], final[sm == -1])
        # x̂0 keeps revealed tokens, predicts every still-masked one, and equals what step t revealed
        assert not (x0 == FMT.mask_id).any()
        assert torch.equal(x0[sm <= t], final[sm <= t])
    with pytest.raises(KeyError, match="no snapshot at step 5"):
        tr.snapshot(5)
    last_revealed, last_x0 = tr.snapshot(7)
    assert torch.equal(last_revealed, final) and torch.equal(last_x0, final)


def test_noise_depends_only_on_seed_step_and_position():
    seeds = torch.tensor([3, 4, 5])
    u = noise.uniform(seeds, noise.TEXT_SAMPLE, 2, 50)
    assert torch.equal(u[1:2], noise.uniform(seeds[1:2], noise.TEXT_SAMPLE, 2, 50))
    assert torch.equal(u[:, :20], noise.uniform(seeds, noise.TEXT_SAMPLE, 2, 20))
    assert not torch.equal(u, noise.uniform(seeds, noise.TEXT_SAMPLE, 3, 50))
    big = noise.uniform(torch.arange(200), noise.IMAGE_SAMPLE, 0, 500)
    assert 0 < big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.01


def test_bad_input_is_a_clear_error(policy):
    with pytest.raises(ValueError, match="empty prompt"):
        run(policy, requests=[GenerationRequest([], seed=1)])
    with pytest.raises(ValueError, match="input image has 9 tokens; format 'world' needs 16"):
        run(policy, requests=[GenerationRequest([10], input_codes=torch.zeros(9, dtype=torch.long))])
    with pytest.raises(ValueError, match="more steps than tokens allow"):
        run(policy, steps=17)
    with pytest.raises(ValueError, match="more steps than tokens allow"):
        run(policy, steps=24, image_steps=17, text_len=24)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        run(policy, block_length=5)
    with pytest.raises(ValueError, match=r"snapshot steps \[8\] must lie in \[0, 8\)"):
        run(policy, snaps=(8,))
