"""Rollouts on the released layouts are the released generators' rollouts, token for token.

The fixtures under ``tests/fixtures/released/`` hold only OUTPUTS of the released generators
(``generate_ti2ti`` of MMaDA-Parallel-A, ``interleave_generate`` of MMaDA-Parallel-M), run outside the
project on the tiny checkpoints that ``tests/real_tiny`` writes, with randomness off: every row of
every forward they made, and their final tokens (fixtures/released/README.md says how they were made).
Our sampler, with the variant's preset and the released text vocabulary, must make the same forwards
(so the same input rows, the same masked counts at every step) and end with the same tokens.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pararl.formats import mmada_a_format, mmada_m_format
from pararl.models import load_policy
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.real_tiny import write_a_checkpoint, write_m_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "released"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))
MASK = 126336


class Recorder(torch.nn.Module):
    """The policy, with every forward's input rows kept (what the fixtures recorded of the release)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = policy, []

    def forward(self, ids, attention_mask=None, **kw):
        assert attention_mask is None  # one request, no padding: the release passes no mask either
        self.calls.append(ids.clone())
        return self.inner(ids, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {"-A": write_a_checkpoint(root / "a", grid=4, seed=0),
            "-M": write_m_checkpoint(root / "m", image_tokens=16, seed=0, magvit=False)}


def released_run(meta, folder, fixture, seed=0, leftover="random"):
    tok = AutoTokenizer.from_pretrained(folder)
    policy = load_policy(folder).eval()
    common = dict(steps=meta["steps"], text_len=meta["text_len"], image_steps=meta["image_steps"],
                  image_start=meta["steps"] // 4, text_temperature=0.0, image_temperature=0.0, image_noise=0.0)
    if meta["variant"] == "-A":
        fmt = mmada_a_format(tok, grid=(meta["grid"], meta["grid"]), text_vocab="all")
        cfg = SamplerConfig(preset="mmada-parallel-a", cfg_prompt=meta["cfg_scale"], cfg_image=meta["cfg_img"],
                            image_leftover=leftover, **common)
    else:
        fmt = mmada_m_format(image_tokens=meta["image_tokens"], text_vocab="all")
        cfg = SamplerConfig(preset="mmada-parallel-m", cfg_text=meta["text_cfg"], cfg_image=meta["image_cfg"],
                            cfg_drop_input_image=True, **common)
    codes = fixture["input_codes"] if meta["task"] == "edit" else None
    request = GenerationRequest(tok(meta["prompt"], add_special_tokens=False)["input_ids"], codes, seed=seed)
    model = Recorder(policy)
    return fmt, model, ParallelSampler(model, fmt, cfg).sample([request])


def masked_counts(rows: torch.Tensor) -> list[int]:
    return (rows == MASK).sum(-1).tolist()


@pytest.mark.parametrize("case", CASES)
def test_sampler_makes_the_released_generators_forwards_and_tokens(case, checkpoints):
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    fixture = load_file(FIXTURES / f"{case}.safetensors")
    fmt, model, tr = released_run(meta, checkpoints[meta["variant"]], fixture)

    # every row of every forward, in order: prompt, unconditional rows, and the state at each step
    ours = torch.cat(model.calls)
    theirs = fixture["forward_rows"]
    # one forward per step, plus one for -A's two unconditional rows together at each image update
    # (the release makes them one after the other)
    sizes = fixture["forward_sizes"].tolist()
    assert len(model.calls) == meta["steps"] + (meta["image_steps"] if sizes.count(1) > meta["steps"] else 0)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert masked_counts(ours) == masked_counts(theirs)  # text and image masked counts at every step
    differ = (ours != theirs).any(1).nonzero().flatten()
    if len(differ):  # only a float-noise tie may part them, and nothing after it can be compared
        assert_first_difference_is_a_float_tie(fmt, model, tr.layout, ours, theirs, int(differ[0]))
        return

    image = fmt.span_codes(tr.image_tokens[0])
    text = tr.text_tokens[0]
    if meta["variant"] == "-M":
        assert torch.equal(image, fixture["image_codes"])
        assert torch.equal(torch.cat([torch.tensor([fmt.bos_id]), text]), fixture["text_ids"])
    else:
        assert torch.equal(text, fixture["text_ids"])
        left = fixture["image_codes"] == meta["leftover_sentinel"]
        assert int(left.sum()) == 1  # the release leaves one position masked and fills it at random
        assert torch.equal(image[~left], fixture["image_codes"][~left])


def assert_first_difference_is_a_float_tie(fmt, model, lay, ours, theirs, row: int) -> None:
    """The fixtures were recorded on another CPU. The tiny checkpoints' near-uniform logits put some
    confidences within a float32 rounding of each other, and there a CPU family's kernels can order
    them differently: the release run here would part from its own fixture the same way. So the rows
    must be equal up to ``row``; there the two sides reveal the same number of positions, and every
    position one side revealed and the other did not had, in the forward before, the same confidence
    (its most likely draw's probability in its span) to within 1e-5 relative: a tie, not a different rule."""
    assert row > 0 and torch.equal(ours[:row], theirs[:row])
    moved = (ours[row] != theirs[row]).nonzero().flatten()
    mine, other = ((r[moved] == MASK) for r in (ours[row], theirs[row]))
    assert bool((mine ^ other).all()) and int(mine.sum()) == int(other.sum()) > 0
    with torch.no_grad():
        logits = model.inner(ours[row - 1 : row]).logits[0]
    spans = {"text": (lay.text, torch.softmax(logits[lay.text].double(), -1)),
             "image": (lay.image, torch.softmax(fmt.restrict_image_logits(logits[lay.image]).double(), -1))}
    span = "text" if lay.text.start <= int(moved[0]) < lay.text.stop else "image"
    cols, probs = spans[span]
    assert all(cols.start <= int(c) < cols.stop for c in moved), "the parted positions lie in one span"
    conf = probs.max(-1).values[moved - cols.start]
    assert float((conf.max() - conf.min()) / conf.max()) < 1e-5, conf.tolist()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("a_")][:2])
def test_the_a_leftover_is_the_released_position_and_our_default_reveals_it(case, checkpoints):
    """Only the leftover position depends on the seed at temperature 0 (the release fills it at random);
    by default we reveal it at the last update instead, from the model's own draw."""
    meta = json.loads((FIXTURES / f"{case}.json").read_text())
    fixture = load_file(FIXTURES / f"{case}.safetensors")
    left = fixture["image_codes"] == meta["leftover_sentinel"]
    runs = [released_run(meta, checkpoints["-A"], fixture, seed=s) for s in (0, 1, 2)]
    images = torch.stack([fmt.span_codes(tr.image_tokens[0]) for fmt, _, tr in runs])
    varies = (images != images[0]).any(0)
    assert torch.equal(varies, left)
    fmt, _, tr = released_run(meta, checkpoints["-A"], fixture, leftover="reveal")
    default = fmt.span_codes(tr.image_tokens[0])
    assert torch.equal(default[~left], fixture["image_codes"][~left]) and int(default[left]) < 8192
