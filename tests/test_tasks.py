"""Task families with their own output layouts: text only, image only, and both (pararl.tasks).

The sampler, the snapshots, trace replay and the random-mask estimator work on each, and their
log-probs equal a plain per-trajectory loop as the parallel layout's do (tests/test_learner_logprobs.py).
"""
import pytest
import torch

from pararl.batching import build_batch
from pararl.errors import DataError
from pararl.formats import mmada_a_format
from pararl.image_tokenizers.palette import PaletteCodec
from pararl.logprobs import trajectory_logprobs
from pararl.plans import RandomMaskPlan, TracePlan
from pararl.tasks import TASKS
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.real_tiny import a_tokenizer
from tests.test_learner_logprobs import loop_logprob, token_logp
from tests.tiny import CODEBOOK, IMAGE_TOKENS, tiny_format, tiny_policy

FMT = tiny_format()
STEPS, TEXT_LEN = 8, 12
CODES = torch.arange(IMAGE_TOKENS) % CODEBOOK


def requests(task: str) -> list[GenerationRequest]:
    image = TASKS[task].input_image
    return [GenerationRequest([10, 11, 12], CODES if image else None, seed=3, task=task),
            GenerationRequest([13, 14, 15, 16, 17], CODES.flip(0) if image else None, seed=4, task=task)]


class Counter(torch.nn.Module):
    """The policy, counting its forwards."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, input_ids, attention_mask=None, **kw):
        self.calls += 1
        return self.model(input_ids, attention_mask=attention_mask, **kw)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("tasks"), seed=5)


def sample(policy, task, snapshots=(STEPS - 1,), **overrides):
    cfg = SamplerConfig(**{"steps": STEPS, "text_len": TEXT_LEN, "image_start": 2, "image_steps": 4} | overrides)
    return ParallelSampler(policy, FMT, cfg).sample(requests(task), group_size=2, snapshot_steps=snapshots,
                                                    record_policy=True)


def test_each_family_has_its_own_output_layout():
    both = build_batch(FMT, requests("generate"), TEXT_LEN).layout
    image = build_batch(FMT, requests("t2i"), TEXT_LEN).layout
    text = build_batch(FMT, requests("understand"), TEXT_LEN).layout
    reason = build_batch(FMT, requests("reason"), TEXT_LEN)
    assert (both.image_len, both.text_len) == (IMAGE_TOKENS, TEXT_LEN)
    assert (image.image_len, image.text_len) == (IMAGE_TOKENS, 0)
    assert (text.image_len, text.text_len) == (0, TEXT_LEN)
    assert image.length - image.output_start == IMAGE_TOKENS + 2  # <soi> codes <eoi>
    out = reason.input_ids[0, reason.layout.output].tolist()
    assert out == [FMT.bos_id] + [FMT.mask_id] * TEXT_LEN
    # understanding carries its input image in the prompt; text reasoning has none
    ids = build_batch(FMT, requests("understand"), TEXT_LEN).input_ids[1]
    assert FMT.soi_id in ids[: text.output_start].tolist()
    assert FMT.soi_id not in reason.input_ids[1, : reason.layout.output_start].tolist()


def test_families_never_share_a_batch_and_bad_requests_are_refused():
    with pytest.raises(ValueError, match="sample them in separate batches"):
        build_batch(FMT, requests("generate") + requests("reason"), TEXT_LEN)
    build_batch(FMT, requests("generate") + requests("edit"), TEXT_LEN)  # same outputs: one batch
    with pytest.raises(DataError, match="task 'understand' needs an input image"):
        build_batch(FMT, [GenerationRequest([10], None, task="understand")], TEXT_LEN)
    with pytest.raises(DataError, match="takes no input image"):
        build_batch(FMT, [GenerationRequest([10], CODES, task="t2i")], TEXT_LEN)
    with pytest.raises(Exception, match="not a known task"):
        build_batch(FMT, [GenerationRequest([10], None, task="poem")], TEXT_LEN)
    a = mmada_a_format(a_tokenizer(), grid=(4, 4))
    with pytest.raises(DataError, match="builds no sequences for task 'reason'"):
        a.encode_prompt([5, 6], None, "reason")


@pytest.mark.parametrize("task", ["t2i", "understand", "reason"])
def test_a_family_samples_every_output_position_and_its_snapshots(policy, task):
    tr = sample(policy, task, snapshots=(3, STEPS - 1))
    lay, out = tr.layout, tr.output
    assert not (out == FMT.mask_id).any()
    sm = tr.step_map[:, lay.output]
    scored = sm >= 0
    assert scored.sum(1).tolist() == [lay.image_len + lay.text_len] * len(tr)
    text, image = lay.relative(lay.text), lay.relative(lay.image)
    if lay.text_len:
        assert (FMT.restrict_text_logits(torch.zeros(1, FMT.vocab_size))[0, out[:, text]] == 0).all()
    if lay.image_len:
        assert (FMT.image_codes(out[:, image]) >= 0).all()
        assert sm[:, image].min() >= 2, "no image position is revealed before image_start"
    revealed, x0 = tr.snapshot(STEPS - 1)
    assert torch.equal(revealed, out) and torch.equal(x0, out)
    early, early_x0 = tr.snapshot(3)
    assert (early == FMT.mask_id).any() and not (early_x0 == FMT.mask_id).any()
    # batch invariance: the second request alone samples the same trajectories
    alone = ParallelSampler(policy, FMT, SamplerConfig(steps=STEPS, text_len=TEXT_LEN, image_start=2, image_steps=4))
    solo = alone.sample(requests(task)[1:], group_size=2)
    assert torch.equal(solo.output, out[2:])


def test_an_image_only_family_runs_no_forward_where_nothing_is_revealed(policy):
    counter = Counter(policy)
    cfg = SamplerConfig(steps=STEPS, text_len=TEXT_LEN, image_start=2, image_steps=4)
    ParallelSampler(counter, FMT, cfg).sample(requests("t2i"), snapshot_steps=(STEPS - 1,))
    assert counter.calls == 4  # the image updates (the last one is also the snapshot)
    counter.calls = 0
    ParallelSampler(counter, FMT, cfg).sample(requests("reason"))
    assert counter.calls == STEPS


@pytest.mark.parametrize("task", ["t2i", "understand", "reason"])
@torch.no_grad()
def test_trace_replay_of_a_family_equals_the_plain_loop_and_what_the_sampler_drew(policy, task):
    tr = sample(policy, task)
    got = trajectory_logprobs(policy, FMT, tr, TracePlan(tuple(range(STEPS))))
    lay = tr.layout
    assert got.mask.sum(1).tolist() == [lay.image_len + lay.text_len] * len(tr)
    loop = loop_logprob(policy, tr, [(k, k + 1) for k in range(STEPS)])
    torch.testing.assert_close(got.sum.double(), loop, atol=1e-4, rtol=0)
    # the sampler's own forwards (temperature 1, no guidance) drew exactly these log-probs
    torch.testing.assert_close(got.logp, torch.where(got.mask, tr.policy_logp, 0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["t2i", "reason"])
@torch.no_grad()
def test_random_mask_of_a_family_scores_the_masked_output_against_the_loop(policy, task):
    tr = sample(policy, task)
    got = trajectory_logprobs(policy, FMT, tr, RandomMaskPlan(seed=7, ratio_min=0.3, ratio_max=0.9))
    lay = tr.layout
    assert got.mask.any(1).all()
    for r in range(len(tr)):  # one trajectory at a time
        x = tr.tokens[r : r + 1].clone()
        x[:, lay.output] = x[:, lay.output].masked_fill(got.mask[r : r + 1], FMT.mask_id)
        attn = tr.attention_mask[r : r + 1]
        lp = token_logp(policy(x, attention_mask=None if attn.all() else attn).logits, FMT, lay, tr.tokens[r : r + 1])
        torch.testing.assert_close(got.logp[r], torch.where(got.mask[r], lp[0], 0.0), atol=1e-5, rtol=0)


def test_a_dataset_of_several_families_gives_each_step_one_family_in_turn_and_resumes_exactly(tmp_path):
    import json

    from pararl.data import PromptSource, read_records
    from pararl.seeds import EPOCH_STRIDE, derive

    rows = [{"prompt": f"draw {i}", "task": "t2i"} for i in range(5)]
    rows += [{"prompt": f"why {i}", "task": "reason", "answer": str(i)} for i in range(3)]
    rows += [{"prompt": f"paint {i}", "task": "generate"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = read_records(tmp_path / "d.jsonl")
    src = PromptSource(records, lambda t: [len(t)], cache=None, seed=3, step_size=2)
    steps = [[src.record(p).task for p in range(s * 2, s * 2 + 2)] for s in range(9)]
    families = [set(s) for s in steps]
    assert all(len(f) == 1 for f in families), "a step never mixes families"
    assert [f.pop() for f in families][:3] == ["t2i", "generate", "reason"]  # sorted by their outputs, in turn
    # each family goes through its own records once per epoch before repeating
    reason = [src.record(p).prompt for s in range(9) if steps[s][0] == "reason" for p in range(s * 2, s * 2 + 2)]
    assert sorted(reason[:3]) == ["why 0", "why 1", "why 2"]
    again = PromptSource(records, lambda t: [len(t)], cache=None, seed=3, step_size=2)
    again.position = 8
    assert [r.prompt_ids for r in again.next_batch(2)] == [src.request(8).prompt_ids, src.request(9).prompt_ids]
    assert src.request(9).task == src.record(9).task and src.request(4).prompt_ids == [len(src.record(4).prompt)]
    with pytest.raises(Exception, match="mixes task families"):
        PromptSource(records, lambda t: [len(t)], cache=None, seed=3)
    # one family: the order every earlier run drew (a seeded permutation per epoch)
    one = [r for r in records if r.task == "t2i"]
    single = PromptSource(one, lambda t: [len(t)], cache=None, seed=3)
    for p in range(12):
        epoch, offset = divmod(p, 5)
        order = torch.randperm(5, generator=torch.Generator().manual_seed(derive(3, epoch, EPOCH_STRIDE)))
        assert single.record(p) is one[int(order[offset])]


def test_records_name_their_task_and_bad_ones_are_refused(tmp_path):
    from pararl.data import read_records

    for row, message in (({"prompt": "how many", "task": "understand"}, "a understand record needs input_image"),
                         ({"prompt": "a cat", "task": "t2i", "input_image": "x.png"}, "takes no input_image"),
                         ({"prompt": "x", "task": "poem"}, "task 'poem' is not one of edit, generate, reason, t2i, understand")):
        (tmp_path / "d.jsonl").write_text(__import__("json").dumps(row))
        with pytest.raises(DataError, match=message):
            read_records(tmp_path / "d.jsonl")


@pytest.mark.parametrize("task,estimator", [("t2i", "trace"), ("reason", "random_mask")])
def test_a_family_trains_on_the_learner(policy, tmp_path, task, estimator):
    from learner.batch import TrainBatch
    from learner.trainer import Learner
    from pararl.logprobs import behaviour_logprobs
    from pararl.models import build_policy
    from tests.learner_tiny import learner_config
    from tests.tiny import tiny_config

    folder = tmp_path / "policy"
    build_policy(tiny_config(FMT), seed=5).save_pretrained(folder)
    tr = sample(policy, task)
    plan = (TracePlan((0, 4), merge=4) if estimator == "trace"
            else RandomMaskPlan(seed=1, ratio_min=0.3, ratio_max=0.9))
    with torch.no_grad():
        old = behaviour_logprobs(policy, FMT, tr, plan)
    batch = TrainBatch.from_trajectories(tr, torch.tensor([1.0, -1.0, 0.5, -0.5]), plan, old)
    learner = Learner(learner_config(logprob_estimator=estimator, coverage="all", merge_steps=4, micro_batch_size=2,
                                     grad_accumulation=2, updates_per_batch=2), folder, FMT)
    before = learner.weights_hash()
    first, second = learner.train_batch(batch)["updates"]
    assert first["tokens"] == float(old.mask.sum()) and abs(first["ratio_max"] - 1) < 1e-5
    assert learner.weights_hash() != before and max(abs(second["ratio_min"] - 1), abs(second["ratio_max"] - 1)) > 1e-4


@pytest.mark.parametrize("task", ["t2i", "reason"])
def test_a_familys_snapshots_draw_as_a_picture(policy, task):
    from pararl.snapshots import snapshot_grid

    tr = sample(policy, task, snapshots=(3, STEPS - 1))
    grid = snapshot_grid(tr, FMT, PaletteCodec(grid=(4, 4), patch=2, codebook_size=CODEBOOK), lambda ids: " ".join(map(str, ids.tolist())),
                         rows=(0, 1))
    assert grid.width > 0 and grid.height > 0
