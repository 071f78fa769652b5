"""The semantic reward, swappable reward models, and reward statistics (in process)."""
import random

import pytest
import torch

from pararl.bundle import load_codecs
from pararl.types import GenerationRequest
from reward import build_reward_model
from reward.config import RewardConfig, RewardModelConfig
from reward.pool.client import RewardClient, RewardError
from reward.scorer import SemanticScorer, requests_from
from reward.semantic import choose_steps, clipped_shares, standardise, trajectory_reward
from reward.stats import RewardStatsError, compute_stats, load_stats, save_stats
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.tiny import tiny_bundle, tiny_clip


def test_formula_against_hand_computed_values():
    scores = torch.tensor([0.30, 0.35, 0.25, 0.50, 0.05, 0.10])
    r = standardise(scores, mean=0.30, z=0.10)
    # 1/2 + (s - 0.3) / 0.2: 0.5, 0.75, 0.25, 1.5 -> 1, -0.75 -> 0, 0.0
    assert torch.allclose(r, torch.tensor([0.5, 0.75, 0.25, 1.0, 0.0, 0.0]))
    assert torch.allclose(trajectory_reward(r.view(2, 3)), torch.tensor([0.5, 1 / 3]))
    assert clipped_shares(r) == pytest.approx((2 / 6, 1 / 6))
    with pytest.raises(ValueError, match="Z"):
        standardise(scores, 0.3, 0.0)


def test_sampled_steps_from_config():
    rng = random.Random(0)
    for _ in range(20):
        steps = choose_steps(16, 3, True, "random", rng)
        assert len(set(steps)) == 3 and steps[-1] == 15 and steps == sorted(steps)
    assert choose_steps(16, 4, True, "uniform", rng) == [0, 5, 10, 15]
    assert 15 not in choose_steps(16, 3, False, "random", rng)
    for _ in range(20):  # the earliest step drawn is first_step x steps
        assert min(choose_steps(16, 3, True, "random", rng, first=0.75)) >= 12
    assert choose_steps(16, 3, True, "uniform", rng, first=0.5) == [8, 12, 15]
    with pytest.raises(ValueError, match=r"steps 14..15"):
        choose_steps(16, 3, True, "random", rng, first=0.9)
    with pytest.raises(ValueError, match="exceed"):
        choose_steps(4, 5, True, "random", rng)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, trajectories with snapshots from the real sampler, a tiny open_clip."""
    tmp = tmp_path_factory.mktemp("reward")
    folder, bundle = tiny_bundle(tmp)
    sampler = ParallelSampler(bundle.policy, bundle.fmt, SamplerConfig(steps=8, text_len=8))
    prompts = ["add a red square", "make the circle blue", "a green triangle top left"]
    traj = sampler.sample([GenerationRequest(bundle.encode_text(p), seed=i) for i, p in enumerate(prompts)],
                          group_size=4, snapshot_steps=[2, 5, 7])
    return {"tmp": tmp, "folder": folder, "traj": traj, "clip": tiny_clip(tmp)}


def _pairs(codecs, traj, batch=4):
    x0 = traj.snapshot_x0[:, -1]
    lay = traj.layout
    images = codecs.decode_images(x0[:, lay.relative(lay.image)])
    texts = [codecs.decode_text(t) for t in traj.snapshot_tokens[:, -1, lay.relative(lay.text)]]
    return [(images[i : i + batch], texts[i : i + batch]) for i in range(0, len(texts), batch)]


def test_stats_computed_saved_reloaded_and_mismatch_refused(world):
    codecs = load_codecs(world["folder"])
    clip = build_reward_model("open_clip", world["clip"])
    stats = compute_stats(clip, _pairs(codecs, world["traj"]), total=12)
    all_scores = torch.cat([clip.score(i, t) for i, t in _pairs(codecs, world["traj"])]).double()
    assert stats.count == 12 and abs(stats.mean - float(all_scores.mean())) < 1e-6
    assert abs(stats.std - float(all_scores.std(unbiased=False))) < 1e-6
    path = save_stats(world["tmp"] / "stats.json", {"clip": stats})
    assert load_stats(path)["clip"] == stats

    cfg = RewardConfig(models={"clip": RewardModelConfig("open_clip", world["clip"])}, stats_file=str(path))
    scorer = SemanticScorer(codecs, cfg)
    result = RewardClient(cfg, scorer=scorer).score(world["traj"])
    assert result.rewards.shape == (12,) and ((result.rewards >= 0) & (result.rewards <= 1)).all()
    expected = standardise(result.raw["clip"], stats.mean, stats.std).mean(-1)
    assert torch.allclose(result.rewards, expected)

    (world["tmp"] / "other").mkdir(exist_ok=True)
    other = dict(world["clip"], pretrained=tiny_clip(world["tmp"] / "other", seed=1)["pretrained"])
    cfg_other = RewardConfig(models={"clip": RewardModelConfig("open_clip", other)}, stats_file=str(path))
    with pytest.raises(RewardStatsError, match="was computed with reward model 'open_clip:pararl-test-clip:"):
        SemanticScorer(codecs, cfg_other)
    with pytest.raises(RewardStatsError, match="does not exist; run `pararl reward-stats"):
        SemanticScorer(codecs, RewardConfig(models=cfg.models, stats_file=str(world["tmp"] / "none.json")))


def test_reward_model_swapped_by_config_to_a_user_class(world):
    codecs = load_codecs(world["folder"])
    cfg = RewardConfig(models={
        "words": RewardModelConfig("tests.user_rewards:WordCountReward", standardize=False),
        "bright": RewardModelConfig("function", {"fn": "tests.user_rewards:brightness", "scale": 2.0},
                                    weight=0.5, standardize=False),
    })
    result = RewardClient(cfg, scorer=SemanticScorer(codecs, cfg)).score(world["traj"])
    lay, traj = world["traj"].layout, world["traj"]
    for r in range(len(traj)):
        for i in range(3):
            text = codecs.decode_text(traj.snapshot_tokens[r, i, lay.relative(lay.text)])
            image = codecs.decode_images(traj.snapshot_x0[r, i, lay.relative(lay.image)][None])[0]
            words = len(text.split()) + 10 * float(image[0].mean())
            assert abs(float(result.raw["words"][r, i]) - words) < 1e-4
            assert abs(float(result.per_model["bright"][r, i]) - 2 * float(image.mean())) < 1e-5
    combined = result.per_model["words"] + 0.5 * result.per_model["bright"]
    assert torch.allclose(result.r_t, combined) and torch.allclose(result.rewards, combined.mean(-1))
    metrics = result.metrics()
    assert {"reward/words/mean", "reward/bright/mean", "reward/R_t/step_5", "reward/words/clipped_at_0"} <= set(metrics)


def test_nonfinite_scores_are_dropped_and_counted_or_fail(world):
    codecs = load_codecs(world["folder"])
    traj = world["traj"]
    texts = [r.texts for r in SemanticScorer(codecs, RewardConfig(models={"w": RewardModelConfig(
        "tests.user_rewards:WordCountReward", standardize=False)})).score_batch(requests_from(traj))]
    word = next(t.split()[0] for ts in texts for t in ts if t)
    hit = sum(any(word in t for t in ts) for ts in texts)
    models = {"w": RewardModelConfig("tests.user_rewards:WordCountReward", {"nan_word": word}, standardize=False)}
    cfg = RewardConfig(models=models, nonfinite="drop")
    result = RewardClient(cfg, scorer=SemanticScorer(codecs, cfg)).score(traj)
    assert result.dropped == hit > 0 and torch.isnan(result.rewards[~result.kept]).all()
    assert torch.isfinite(result.rewards[result.kept]).all() and result.metrics()["reward/dropped"] == hit
    cfg = RewardConfig(models=models, nonfinite="fail")
    with pytest.raises(RewardError, match="reward model 'w' returned a non-finite score at step"):
        RewardClient(cfg, scorer=SemanticScorer(codecs, cfg)).score(traj)


def test_unknown_reward_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown reward model 'clipp'; known: .*open_clip.*, or use module:Class"):
        build_reward_model("clipp")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        build_reward_model("tests.user_rewards:Nope")
    with pytest.raises(FileNotFoundError, match="weights file /nowhere/w.pt does not exist"):
        build_reward_model("open_clip", {"model": "ViT-B-32", "pretrained": "/nowhere/w.pt"})


def test_reward_stats_command_measures_the_training_data(world, capsys):
    import json
    import random

    import yaml
    from PIL import Image

    from pararl.cli import main
    from pararl.snapshots import to_pil
    from reward.stats import drop_words

    codecs = load_codecs(world["folder"])
    data = world["tmp"] / "data"
    data.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i in range(10):
        codes = torch.randint(0, 8, (1, 16), generator=gen)
        to_pil(codecs.image_tokenizer.decode(codes)[0], size=32).save(data / f"out{i}.png")
        lines.append(json.dumps({"prompt": "add a red square", "output_image": f"out{i}.png",
                                 "output_text": ["a red square", "blue circle top left", "green triangle"][i % 3]}))
    (data / "train.jsonl").write_text("\n".join(lines))
    run_dir = world["tmp"] / "run"
    config = world["tmp"] / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir), "model": str(world["folder"]), "data": {"train": str(data / "train.jsonl")},
        "reward": {"models": {"clip": {"name": "open_clip", "kwargs": world["clip"]}}},
    }))
    assert main(["reward-stats", str(config), "reward.stats_texts=full"]) == 0
    stats = load_stats(run_dir / "reward_stats.json")["clip"]
    clip = build_reward_model("open_clip", world["clip"])
    pixels = [__import__("numpy").asarray(Image.open(data / f"out{i}.png"), dtype="float32") / 255 for i in range(10)]
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in pixels])
    texts = [json.loads(line)["output_text"] for line in lines]
    seen = codecs.image_tokenizer.decode(codecs.image_tokenizer.encode(images))  # as the reward service sees them
    direct = clip.score(seen, texts).double()
    assert stats.count == 10 and stats.identity == clip.identity
    assert abs(stats.mean - float(direct.mean())) < 1e-5 and abs(stats.std - float(direct.std(unbiased=False))) < 1e-5
    assert len(list((run_dir / "codes").rglob("*.pt"))) == 10  # codes cached once per image
    assert "mean" in capsys.readouterr().out
    # The default: the texts as the reward sees them at a sampled step, words dropped with the run's seed
    # (seed 3 here), the same in any batch size; what the default run's preparation measures.
    assert main(["reward-stats", str(config), "seed=3"]) == 0
    partial = load_stats(run_dir / "reward_stats.json")["clip"]
    rng = random.Random(3 + 1)
    dropped = [drop_words(t, rng) for t in texts]
    assert dropped != texts and all(set(d.split()) <= set(t.split()) for d, t in zip(dropped, texts))
    assert abs(partial.mean - float(clip.score(seen, dropped).double().mean())) < 1e-5

    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "model": str(world["folder"]),
                                      "data": {"train": str(data / "train.jsonl")}, "reward": {"modles": {}}}))
    assert main(["reward-stats", str(config)]) == 2
    assert "unknown config key 'reward.modles' (did you mean 'models'?)" in capsys.readouterr().err
