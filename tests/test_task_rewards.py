"""Rewards per task family (reward.tasks): which pairs the image-text models score, verifiable text rewards
of the final answer, each weighted and reported on its own; a text reward that throws or returns NaN for
one trajectory drops that trajectory (counted) or fails the step, never averaged in silently."""
import pytest
import torch

from pararl.bundle import load_codecs
from pararl.config import ConfigError
from pararl.types import GenerationRequest, PromptFacts
from reward.config import RewardConfig, RewardModelConfig, TextRewardConfig
from reward.pool.client import RewardClient, RewardError
from reward.scorer import SemanticScorer
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.tiny import IMAGE_TOKENS, tiny_bundle


def refuses_boom(texts, references):
    """A user's text reward with a bug: it raises on any batch holding the reference "boom"."""
    if "boom" in references:
        raise KeyError("boom")
    return [0.5] * len(texts)


WORDS = {"w": RewardModelConfig("tests.user_rewards:WordCountReward", standardize=False)}
STEPS = [3, 7]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder, bundle = tiny_bundle(tmp_path_factory.mktemp("task-rewards"))
    sampler = ParallelSampler(bundle.policy, bundle.fmt, SamplerConfig(steps=8, text_len=8))
    codes = torch.arange(IMAGE_TOKENS) % bundle.fmt.codebook_size

    def sample(task, prompts, image=False):
        requests = [GenerationRequest(bundle.encode_text(p), codes if image else None, seed=i, task=task)
                    for i, p in enumerate(prompts)]
        return sampler.sample(requests, group_size=2, snapshot_steps=STEPS)

    return {"codecs": load_codecs(folder), "sample": sample, "codes": codes, "fmt": bundle.fmt}


def score(world, cfg, traj, facts):
    return RewardClient(cfg, scorer=SemanticScorer(world["codecs"], cfg)).score(traj, facts)


def test_text_to_image_scores_the_prompt_against_the_output_image(world):
    prompts = ["a red square", "a green triangle top left"]
    traj = world["sample"]("t2i", prompts)
    cfg = RewardConfig(models=WORDS, tasks={"t2i": {"w": 1.0}})
    got = score(world, cfg, traj, [PromptFacts("t2i", p) for p in prompts])
    codecs, lay = world["codecs"], traj.layout
    for r in range(len(traj)):
        for i in range(len(STEPS)):
            image = codecs.decode_images(traj.snapshot_x0[r, i, lay.relative(lay.image)][None])[0]
            expected = len(prompts[int(traj.prompt_index[r])].split()) + 10 * float(image[0].mean())
            assert float(got.raw["w"][r, i]) == pytest.approx(expected, abs=1e-4)
    assert got.metrics()["reward/task/t2i/trajectories"] == 4


def test_understanding_scores_the_answer_against_the_input_image_and_its_reference(world):
    traj = world["sample"]("understand", ["how many red shapes", "what colour is the top left shape"], image=True)
    codecs, fmt, lay = world["codecs"], world["fmt"], traj.layout
    input_ids = fmt.image_ids(world["codes"])
    finals = [codecs.decode_text(traj.tokens[r, lay.text]) for r in range(len(traj))]
    # the reference is the first trajectory's own final text: it matches, its group mate may not
    refs = [finals[0], finals[2]]
    cfg = RewardConfig(models=WORDS, text_models={"answer": TextRewardConfig("answer", {"think_end": None})},
                       tasks={"understand": {"w": 0.5, "answer": 2.0}}, sampled_steps=2)
    facts = [PromptFacts("understand", "q", ref, input_ids) for ref in refs]
    got = score(world, cfg, traj, facts)
    image = codecs.decode_images(input_ids[None])[0]
    for r in range(len(traj)):
        texts = [codecs.decode_text(traj.snapshot_tokens[r, i, lay.relative(lay.text)]) for i in range(2)]
        for i, text in enumerate(texts):
            assert float(got.raw["w"][r, i]) == pytest.approx(len(text.split()) + 10 * float(image[0].mean()), abs=1e-4)
        assert texts[-1] == finals[r], "the last sampled step is the final text"
    assert got.raw["answer"][0].tolist() == [1.0, 1.0] and got.raw["answer"][2].tolist() == [1.0, 1.0]
    assert torch.allclose(got.r_t, 0.5 * got.per_model["w"] + 2.0 * got.per_model["answer"])
    metrics = got.metrics()
    assert metrics["reward/answer/mean"] == pytest.approx(float(got.raw["answer"][:, 0].mean()))


def test_a_text_reward_that_fails_for_one_trajectory_drops_it_or_fails_the_step(world):
    traj = world["sample"]("reason", ["is the square red", "how many shapes"])
    facts = [PromptFacts("reason", "q", "red"), PromptFacts("reason", "q", None)]  # no reference: cannot score
    cfg = RewardConfig(text_models={"answer": TextRewardConfig("answer")}, tasks={"reason": {"answer": 1.0}},
                       sampled_steps=2)
    got = score(world, cfg, traj, facts)
    lost = (traj.prompt_index == 1)
    assert torch.equal(~got.kept, lost) and got.dropped == 2
    assert torch.isfinite(got.rewards[got.kept]).all() and torch.isnan(got.rewards[~got.kept]).all()
    assert all("text reward 'answer'" in p for p in got.problems)
    cfg.nonfinite = "fail"
    with pytest.raises(RewardError, match="text reward 'answer' returned nan"):
        score(world, cfg, traj, facts)
    throws = RewardConfig(text_models={"x": TextRewardConfig("tests.test_task_rewards:refuses_boom")},
                          tasks={"reason": {"x": 1.0}}, sampled_steps=2)
    boom = [PromptFacts("reason", "q", "boom"), PromptFacts("reason", "q", "fine")]
    got = score(world, throws, traj, boom)
    assert torch.equal(~got.kept, traj.prompt_index == 0) and "raised" in got.problems[0]


def test_task_reward_configs_are_checked_when_they_load():
    with pytest.raises(ConfigError, match="no reward model or text model is labelled 'clip'"):
        SemanticScorer(None, RewardConfig(models=WORDS, tasks={"t2i": {"clip": 1.0}}))
    with pytest.raises(ConfigError, match="a reason trajectory has no image"):
        SemanticScorer(None, RewardConfig(models=WORDS, tasks={"reason": {"w": 1.0}}))
    with pytest.raises(ConfigError, match="reward.tasks='poem' is not a known task"):
        SemanticScorer(None, RewardConfig(models=WORDS, tasks={"poem": {"w": 1.0}}))
    with pytest.raises(ConfigError, match="needs reward.include_final=true"):
        SemanticScorer(None, RewardConfig(text_models={"a": TextRewardConfig()}, tasks={"reason": {"a": 1.0}},
                                          include_final=False))
    with pytest.raises(ConfigError, match="unknown text reward 'exact'"):
        SemanticScorer(None, RewardConfig(text_models={"a": TextRewardConfig("exact")}, tasks={"reason": {"a": 1.0}}))
