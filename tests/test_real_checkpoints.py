"""Tiny checkpoints in each released variant's on-disk layout load, sample with CFG, and decode images
through the code a real checkpoint uses (format detection, the image tokenizer, span decoding)."""
import json
import shutil

import pytest
import torch

from pararl.bundle import load_bundle, load_codecs
from pararl.detect import detect
from pararl.formats import DimooFormat, ParallelFormat
from pararl.image_tokenizers import Magvit2Tokenizer, VQModelTokenizer
from pararl.logprobs import trajectory_logprobs
from pararl.models import CheckpointError
from pararl.plans import TracePlan
from pararl.snapshots import snapshot_grid
from pararl.types import GenerationRequest
from reward.config import RewardConfig, RewardModelConfig
from reward.scorer import SemanticScorer, requests_from
from rollout.config import SamplerConfig
from rollout.sampler import ParallelSampler
from tests.real_tiny import write_a_checkpoint, write_m_checkpoint

NEWLINE, MASK = 126084, 126336
SNAPS = (1, 3)


def sample(bundle, **cfg):
    cfg = SamplerConfig(**{"steps": 4, "text_len": 8, "cfg_image": 2.0, "cfg_text": 1.0, **cfg})
    codes = bundle.image_tokenizer.encode(torch.rand(1, 3, *bundle.image_tokenizer.image_size,
                                                     generator=torch.Generator().manual_seed(0)))[0]
    requests = [GenerationRequest(bundle.encode_text("a red square"), seed=1),
                GenerationRequest(bundle.encode_text("make the circle blue"), codes, seed=2)]
    return ParallelSampler(bundle.policy, bundle.fmt, cfg).sample(requests, group_size=2, snapshot_steps=SNAPS)


def check_decodes(bundle, traj):
    """Final images and every snapshot's x̂0 decode; the reward and the learner take the same spans."""
    images = bundle.decode_images(traj.image_tokens)
    size = bundle.image_tokenizer.image_size
    assert images.shape == (len(traj), 3, *size) and 0 <= images.min() and images.max() <= 1
    lay = traj.layout
    reward = RewardConfig(models={"words": RewardModelConfig("tests.user_rewards:WordCountReward", standardize=False)})
    results = SemanticScorer(bundle, reward).score_batch(requests_from(traj))
    assert len(results) == len(traj) and all(torch.isfinite(r.combined).all() for r in results)
    x0 = traj.snapshot_x0[0, -1, lay.relative(lay.image)]
    assert torch.allclose(bundle.decode_images(x0[None])[0], bundle.image_tokenizer.decode(bundle.fmt.span_codes(x0[None]))[0])
    lp = trajectory_logprobs(bundle.policy, bundle.fmt, traj, TracePlan(SNAPS))
    assert torch.isfinite(lp.sum).all() and lp.mask.any(1).all()
    snapshot_grid(traj, bundle.fmt, bundle.image_tokenizer, bundle.decode_text)  # the picture MLflow gets
    return lp


@pytest.fixture(scope="module")
def a_folder(tmp_path_factory):
    return write_a_checkpoint(tmp_path_factory.mktemp("ckpt") / "mmada-parallel-a")


def test_a_checkpoint_loads_samples_and_decodes(a_folder):
    bundle = load_bundle(a_folder)
    assert isinstance(bundle.fmt, DimooFormat) and bundle.fmt.grid == (4, 4)
    assert isinstance(bundle.image_tokenizer, VQModelTokenizer) and bundle.image_tokenizer.codebook_size == 8192
    assert "model.transformer.blocks.0.q_proj.weight" in bundle.policy.state_dict()
    traj = sample(bundle)
    lay = traj.layout
    assert lay.image_len == 20 and not (traj.output == MASK).any()
    span = traj.image_tokens.view(-1, 4, 5)
    assert (span[..., 4] == NEWLINE).all(), "newline columns are fixed"
    assert (traj.step_map[:, lay.image].view(-1, 4, 5)[..., 4] == -1).all()
    assert (traj.step_map[:, lay.image].view(-1, 4, 5)[..., :4] >= 0).all(), "every code position was revealed"
    assert (span[..., :4] >= 126356).all() and (span[..., :4] < 126356 + 8192).all()
    assert (traj.snapshot_x0[:, :, lay.relative(lay.image)].view(len(traj), len(SNAPS), 4, 5)[..., 4] == NEWLINE).all()
    lp = check_decodes(bundle, traj)
    out_cols = lay.relative(lay.image)
    assert not lp.mask[:, out_cols].view(-1, 4, 5)[..., 4].any(), "the learner never scores a newline"


def test_a_folder_is_detected_from_its_files_alone(a_folder, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(a_folder, bare)
    (bare / "pararl.json").unlink()
    codecs = load_codecs(bare)  # the released layout as is: 32x32 images
    assert codecs.fmt.name == "mmada-parallel-a" and codecs.fmt.image_span_len == 1056
    assert codecs.image_tokenizer.image_size == (64, 64)  # this tiny VQ downsamples by 2
    found = detect(bare, codecs.tokenizer)
    assert found.preset == "mmada-parallel-a" and any("vqvae/" in line for line in found.how)
    shutil.rmtree(bare / "vqvae")
    with pytest.raises(CheckpointError, match="vqvae/ .*missing"):
        load_codecs(bare)  # still -A by its architecture, but the image tokenizer is gone


@pytest.fixture(scope="module")
def m_folder(tmp_path_factory):
    return write_m_checkpoint(tmp_path_factory.mktemp("ckpt") / "mmada-parallel-m")


def test_m_checkpoint_loads_samples_and_decodes(m_folder):
    config = json.loads((m_folder / "config.json").read_text())
    assert config["model_type"] == "mmada" and config["llm_vocab_size"] == 126464 and config["num_vq_tokens"] == 16
    bundle = load_bundle(m_folder)  # no pararl.json: everything from the files
    fmt = bundle.fmt
    assert isinstance(fmt, ParallelFormat) and fmt.name == "mmada-parallel-m"
    assert fmt.image_offset == 126464 and fmt.image_tokens == 16 and fmt.codebook_size == 8192
    assert (fmt.soi_id, fmt.eoi_id, fmt.edit_id, fmt.generate_id) == (126084, 126085, 126095, 126088)
    assert isinstance(bundle.image_tokenizer, Magvit2Tokenizer) and bundle.image_tokenizer.grid == (4, 4)
    traj = sample(bundle)
    lay = traj.layout
    assert lay.image_len == 16 and not (traj.output == MASK).any()
    assert (traj.image_tokens >= 126464).all() and (traj.step_map[:, lay.image] >= 0).all()
    check_decodes(bundle, traj)


def test_m_folder_without_magvit_says_where_to_put_it(tmp_path):
    folder = write_m_checkpoint(tmp_path / "m", magvit=False)
    with pytest.raises(CheckpointError, match="do not ship their image tokenizer: put the MAGVIT-v2 weights"):
        load_codecs(folder)
    from transformers import AutoTokenizer

    found = detect(folder, AutoTokenizer.from_pretrained(str(folder)), image_tokenizer={"type": "magvit2", "path": "elsewhere"})
    assert found.image_tokenizer == {"type": "magvit2", "path": str(folder / "elsewhere"), "grid": [4, 4]}


def test_a_format_named_in_the_run_config_overrides_detection(tmp_path):
    """A -A folder whose config says nothing recognisable (no vqvae/ name, plain architecture) is refused by
    detection, and loads once the run config names ``model_format.preset`` and its image tokenizer."""
    import json
    import shutil

    import pytest

    from cluster.run_config import load_run_config
    from pararl.bundle import load_codecs
    from pararl.models import CheckpointError
    from tests.real_tiny import write_a_checkpoint

    folder = write_a_checkpoint(tmp_path / "a")
    (tmp_path / "vq-elsewhere").mkdir()
    shutil.move(str(folder / "vqvae"), str(tmp_path / "vq-elsewhere" / "vqvae"))
    (folder / "pararl.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LLaDAModelLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        load_codecs(folder)
    cfg = load_run_config(None, ["model_format.preset=mmada-parallel-a", "model_format.options.grid=[4,4]",
                                 "model_format.image_tokenizer.type=vqmodel",
                                 f"model_format.image_tokenizer.path={tmp_path / 'vq-elsewhere'}"])
    codecs = load_codecs(folder, cfg.model_format.named())
    assert codecs.fmt.name.startswith("mmada-parallel-a") and codecs.image_tokenizer.num_tokens == 16
