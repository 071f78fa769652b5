"""The default run's preparation on tiny sizes: SFT warm-up on the DeepSpeed engine, the CLIP reward,
the cached prepare step, and the held-out evaluation."""
import json
import random

import pytest
import torch

from learner.sft import SFTConfig, encode_records, held_loss, train_sft
from pararl.bundle import Codecs, load_bundle
from pararl.data import CodeCache, read_records
from pararl.models import LLaDAConfig
from pararl.types import GenerationRequest
from reward.clip_models import OpenClipReward
from reward.train_clip import ClipTrainConfig, drop_words, train_clip
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from shapeworld import EOS, WorldConfig, world_token_format, world_tokenizer, write_world
from shapeworld.prepare import PolicyArch, PrepareConfig, prepare_default

WORLD = WorldConfig(train_size=64, eval_size=8)
ARCH = PolicyArch(d_model=32, n_heads=2, n_layers=1, mlp_hidden_size=48)
TINY_CLIP = ClipTrainConfig(name="pararl-test-world-clip", embed_dim=16, vision_width=16, vision_layers=1,
                            vision_head_width=8, text_width=16, text_layers=1, text_heads=2, context_length=16,
                            steps=4, batch_size=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = write_world(root / "data", WORLD)
    spec = WORLD.spec
    tok = world_tokenizer(spec)
    return root, paths, Codecs(tok, world_token_format(spec, tok), spec.codec())


def policy_config(codecs: Codecs, arch: PolicyArch = ARCH) -> LLaDAConfig:
    fmt = codecs.fmt
    return LLaDAConfig(vocab_size=fmt.vocab_size, embedding_size=fmt.vocab_size, mask_token_id=fmt.mask_id,
                       max_sequence_length=256, d_model=arch.d_model, n_heads=arch.n_heads, n_layers=arch.n_layers,
                       mlp_hidden_size=arch.mlp_hidden_size, rope_theta=arch.rope_theta)


def test_sft_lowers_the_loss_and_saves_a_bundle_the_sampler_uses(world):
    root, paths, codecs = world
    records = read_records(paths["train"])
    spec = WORLD.spec
    figures = train_sft(root / "sft", records, codecs, policy_config(codecs),
                        SFTConfig(steps=40, batch_size=16, lr=1e-2, warmup=4), spec.text_len, root / "codes",
                        progress=False)
    assert figures["loss_after"] < 0.8 * figures["loss_before"]
    bundle = load_bundle(root / "sft")
    assert bundle.fmt == codecs.fmt and bundle.tokenizer.convert_tokens_to_ids(EOS) == codecs.tokenizer.convert_tokens_to_ids(EOS)
    cache = CodeCache(root / "codes", bundle.image_tokenizer)
    rec = next(r for r in records if r.task == "edit")
    req = GenerationRequest(bundle.encode_text(rec.prompt), cache.codes(rec.input_image), seed=1)
    traj = ParallelSampler(bundle.policy, bundle.fmt, SamplerConfig(steps=4, text_len=spec.text_len)).sample([req], 2, [1, 3])
    assert traj.tokens.shape[0] == 2 and (traj.image_tokens >= bundle.fmt.image_offset).all()
    assert held_loss(bundle.policy, bundle.fmt, encode_records(records, codecs, cache, spec.text_len)) == pytest.approx(
        figures["loss_after"], rel=1e-4)


def test_sft_refuses_texts_longer_than_the_text_span(world):
    root, paths, codecs = world
    records = read_records(paths["train"])
    with pytest.raises(ValueError, match="exceeds text_len"):
        encode_records(records, codecs, CodeCache(root / "codes", codecs.image_tokenizer), text_len=3)


def test_clip_training_saves_what_the_reward_service_loads(world, tmp_path):
    root, paths, codecs = world
    records = read_records(paths["train"])
    cache = CodeCache(root / "codes", codecs.image_tokenizer)
    images = codecs.image_tokenizer.decode(torch.stack([cache.codes(r.output_image) for r in records[:32]]))
    texts = [r.output_text for r in records[:32]]
    result = train_clip(tmp_path / "clip", images, texts, TINY_CLIP, progress=False)
    model = OpenClipReward(**result["kwargs"])
    scores = model.score(images[:5], texts[:5])
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    state = torch.load(result["kwargs"]["pretrained"])
    assert torch.equal(state["logit_scale"], model.model.logit_scale.detach())
    assert json.loads((tmp_path / "clip" / f"{TINY_CLIP.name}.json").read_text())["vision_cfg"]["image_size"] == 16


def test_partial_texts_keep_word_order_and_at_least_one_word():
    rng = random.Random(0)
    text = "red square top left and blue plus bottom right"
    for _ in range(50):
        part = drop_words(text, rng).split()
        assert part and all(w in text.split() for w in part)
        assert [text.split().index(w) for w in part if text.split().count(w) == 1] == sorted(
            text.split().index(w) for w in part if text.split().count(w) == 1)


def test_prepare_default_builds_once_then_skips(tmp_path):
    cfg = PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)
    first = prepare_default(tmp_path / "cache", cfg=cfg, progress=False, log=lambda *_: None)
    assert first["built"] == ["world", "policy", "clip"]
    files = [tmp_path / "cache" / stage / "DONE.json" for stage in ("world", "policy", "clip")]
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = prepare_default(tmp_path / "cache", cfg=cfg, progress=False, log=lambda *_: None)
    assert second["built"] == [] and [f.stat().st_mtime_ns for f in files] == mtimes
    assert second["clip_kwargs"] == first["clip_kwargs"] and second["model"] == first["model"]
    load_bundle(second["model"])
    OpenClipReward(**second["clip_kwargs"])
    stats = json.loads((tmp_path / "cache" / "clip" / "reward_stats.json").read_text())["models"]
    assert list(stats) == [first["reward_label"]] and stats["clip"]["std"] > 0
    # Other SFT settings rebuild the policy (and only it).
    third = prepare_default(tmp_path / "cache", cfg=PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=4, batch_size=8),
                                                                   clip=TINY_CLIP, stats_batch=32),
                            progress=False, log=lambda *_: None)
    assert third["built"] == ["policy"]


def _weights(cache) -> dict[str, str]:
    import hashlib
    files = [p for stage in ("policy", "clip") for p in sorted((cache / stage).iterdir()) if p.suffix in (".pt", ".safetensors", ".bin")]
    assert files
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_gives_the_same_weights_whatever_the_callers_threads(tmp_path, monkeypatch):
    import shapeworld.prepare as prepare

    cfg = PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)
    hashes = []
    for i, caller_threads in enumerate((1, 2)):
        torch.set_num_threads(caller_threads)
        prepare_default(tmp_path / f"cache{i}", cfg=cfg, progress=False, log=lambda *_: None)
        assert torch.get_num_threads() == caller_threads  # the preparation's own count, restored after
        hashes.append(_weights(tmp_path / f"cache{i}"))
    assert hashes[0] == hashes[1]
    # The code that builds a stage is part of its key: another version of the SFT's code rebuilds the
    # warm-up (and only it), never reuses it.
    monkeypatch.setitem(prepare.STAGE_CODE, "policy", (*prepare.STAGE_CODE["policy"], "tests.user_rewards"))
    again = prepare_default(tmp_path / "cache0", cfg=cfg, progress=False, log=lambda *_: None)
    assert again["built"] == ["policy"]
    with pytest.raises(ValueError, match="threads must be at least 1"):
        prepare_default(tmp_path / "cache2", cfg=PrepareConfig(world=WORLD, threads=0), progress=False)


def test_evaluation_reports_reward_alignment_and_their_errors(tmp_path):
    from cluster.evaluate import evaluate
    from reward.config import RewardConfig, RewardModelConfig
    from reward.judges import RewardJudge
    from reward.pool.client import RewardClient
    from reward.scorer import SemanticScorer
    from shapeworld.judge import WorldJudge, world_figures

    cfg = PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)
    paths = prepare_default(tmp_path / "cache", cfg=cfg, progress=False, log=lambda *_: None)
    bundle = load_bundle(paths["model"])
    rcfg = RewardConfig(models={paths["reward_label"]: RewardModelConfig(name="open_clip", kwargs=paths["clip_kwargs"])},
                        stats_file=paths["reward_stats"], sampled_steps=2)
    records = read_records(paths["eval"])
    scfg = SamplerConfig(steps=4, text_len=paths["text_len"])
    cache = CodeCache(paths["codes"], bundle.image_tokenizer)

    def run(batch_prompts: int):
        judges = [RewardJudge(RewardClient(rcfg, scorer=SemanticScorer(bundle, rcfg)), scfg.steps), WorldJudge(paths["world"])]
        res = evaluate(bundle.policy, bundle, scfg, records, cache, judges, samples=2, batch_prompts=batch_prompts,
                       progress=False)
        return res, world_figures(res.tasks, res.judgments), judges[0].steps

    res, figures, steps = run(3)
    assert res.n == 2 * len(records) == len(res.judgments["world"]) == len(res.judgments["reward"])
    assert 0 <= figures["reward"] <= 1 and figures["reward_se"] >= 0 and 0 <= figures["aligned"] <= 1
    assert {"aligned", "aligned_se", "agreement", "follows", "follows_se"} <= set(figures)
    assert steps == [0, 3]  # evenly spaced, ending at the last step
    again, _, _ = run(5)
    # Same seeds in any batching: two evaluations compare sample by sample.
    order = {key: n for n, key in enumerate(again.keys)}
    assert [again.judgments["world"][order[key]] for key in res.keys] == res.judgments["world"]
    assert [again.judgments["reward"][order[key]]["reward"] for key in res.keys] == pytest.approx(
        [j["reward"] for j in res.judgments["reward"]], abs=1e-5)
