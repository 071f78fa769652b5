"""The generated world's UniGRPO tasks: questions with checkable answers, image-only generation, their
records, the warm-up's buckets, the world's t2i reward and the per-task checks."""
import random

import torch

from cluster.evaluate import batch_samples
from learner.sft import encode_records
from pararl.bundle import Codecs
from pararl.data import CodeCache, read_records
from pararl.tasks import TASKS
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from shapeworld import EOS, Obj, WorldConfig, make_scene, make_splits, world_token_format, world_tokenizer, write_world
from shapeworld.judge import WorldJudge, world_figures
from shapeworld.questions import ask, sample_question_task
from shapeworld.rewards import FollowsReward
from shapeworld.scene import WorldSpec
from shapeworld.tasks import follows, sample_example

SPEC = WorldSpec()
SHARES = {"t2i": 0.2, "understand": 0.2, "reason": 0.2}
SCENE = make_scene([Obj(0, 0, "red", "square"), Obj(1, 1, "red", "bar")])


def test_questions_have_the_answers_the_scene_gives():
    rng = random.Random(0)
    seen = {}
    for _ in range(200):
        q, a = ask(SPEC, SCENE, rng)
        seen[q] = a
    assert seen["how many red shapes"] == "two" and seen["how many blue shapes"] == "zero"
    assert seen["what colour is the top left shape"] == "red" and seen["what colour is the top right shape"] == "none"
    assert seen["what shape is the bottom right shape"] == "bar"
    ex = sample_question_task(SPEC, random.Random(1), "reason", 0.5)
    description, question = ex.prompt.split(" question ")
    assert SPEC.parse_text(description).exact and ask(SPEC, ex.output, random.Random(0)) is not None
    t2i = sample_question_task(SPEC, random.Random(2), "t2i", 0.5)
    assert follows(SPEC, t2i.prompt, None, t2i.output) and t2i.answer is None


def test_a_world_with_task_shares_writes_every_family_and_a_drawing_world_is_unchanged(tmp_path):
    plain = WorldConfig(train_size=60, eval_size=10, seed=3)
    before, _ = make_splits(plain)
    rng = random.Random(3)  # the drawing world's draws are those it always made
    assert before[0] == next(e for e in iter(lambda: sample_example(SPEC, rng), None))
    assert "many" not in SPEC.words() and "many" in SPEC.words(questions=True)
    cfg = WorldConfig(train_size=200, eval_size=30, seed=3, task_shares=SHARES)
    paths = write_world(tmp_path / "w", cfg)
    records = read_records(paths["train"])
    by_task = {t: [r for r in records if r.task == t] for t in TASKS}
    assert all(by_task[t] for t in TASKS), {t: len(v) for t, v in by_task.items()}
    assert all(r.answer == r.output_text for t in ("understand", "reason") for r in by_task[t])
    assert all(r.input_image for r in by_task["understand"]) and not any(r.input_image for r in by_task["reason"])
    tok = world_tokenizer(SPEC, questions=True)
    assert all(tok.convert_tokens_to_ids(w) != tok.unk_token_id for r in records for w in r.prompt.split())
    # the warm-up: one bucket per task, each with its family's layout and targets
    codecs = Codecs(tok, world_token_format(SPEC, tok), SPEC.codec())
    buckets = encode_records(records, codecs, CodeCache(tmp_path / "codes", SPEC.codec()), SPEC.text_len, EOS)
    layouts = {t: b.layout for t, b in zip(sorted(by_task), buckets)}
    assert layouts["t2i"].text_len == 0 and layouts["reason"].image_len == 0 and layouts["understand"].image_len == 0
    b = buckets[sorted(by_task).index("understand")]
    first = codecs.decode_text(b.ids[0, b.layout.text])
    assert first == by_task["understand"][0].answer


def test_the_worlds_t2i_reward_and_checks_score_each_task(tmp_path):
    cfg = WorldConfig(train_size=200, eval_size=30, seed=3, task_shares=SHARES)
    paths = write_world(tmp_path / "w", cfg)
    reward = FollowsReward(str(paths["world"]))
    image = SPEC.codec().decode(SPEC.render(SCENE)[None])
    assert reward.score(image.repeat(2, 1, 1, 1), ["draw a red square at top left and a red bar at bottom right",
                                                   "draw a blue shape at any place"]).tolist() == [1.0, 0.0]
    tok = world_tokenizer(SPEC, questions=True)
    codecs = Codecs(tok, world_token_format(SPEC, tok), SPEC.codec())
    from pararl.models import build_policy
    from tests.tiny import tiny_config

    policy = build_policy(tiny_config(codecs.fmt, max_sequence_length=128), seed=0)
    records = [r for r in read_records(paths["eval"]) if r.task in ("understand", "reason")][:3]
    cache = CodeCache(tmp_path / "codes", SPEC.codec())
    requests = [GenerationRequest(codecs.encode_text(r.prompt), cache.codes(r.input_image) if r.input_image else None,
                                  seed=i, task=r.task) for i, r in enumerate(records)]
    traj = ParallelSampler(policy, codecs.fmt, SamplerConfig(steps=4, text_len=SPEC.text_len)).sample(requests)
    traj.tokens = traj.tokens.clone()  # the reference answer as the first trajectory's text
    ids = codecs.encode_text(records[0].answer)
    traj.tokens[0, traj.layout.text] = torch.tensor(ids + [tok.convert_tokens_to_ids(EOS)] * (SPEC.text_len - len(ids)))
    samples = batch_samples(codecs, records, requests, [0, 1, 2], traj)
    judged = WorldJudge(str(paths["world"])).judge(samples)
    assert judged[0] == {"answer_correct": 1.0} and all(set(j) == {"answer_correct"} for j in judged)
    out = world_figures([s.task for s in samples], {"world": judged})
    assert {k for k in out if k.endswith("_correct")} <= {"understand_correct", "reason_correct"}
    assert out[f"{records[0].task}_correct"] >= 1 / 3 and "aligned" not in out
