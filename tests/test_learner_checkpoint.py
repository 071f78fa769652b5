"""Checkpoints resume exactly, a half-written one is never loaded, export gives a loadable model folder,
and weight buckets / hashes agree with it (real DeepSpeed, in-process, world of one)."""
import argparse
import json

import pytest
import torch

import learner.checkpoint as ckpt
from learner.checkpoint import CheckpointError, RunState, latest_checkpoint, resolve_checkpoint
from learner.cli import export_main
from learner.trainer import Learner
from learner.weights import iter_weight_buckets, weights_hash
from pararl.models import load_policy
from tests.learner_tiny import FMT, learner_config, policy_folder, sampled_batch

# DeepSpeed's ZeRO-3 calls torch.distributed functions that torch has deprecated: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.*is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return policy_folder(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture(scope="module")
def batches(folder):
    return [sampled_batch(folder, seed=s) for s in range(3)]


def full_weights(learner):
    return {n: t for bucket in iter_weight_buckets(learner.engine, 1 << 20) for n, t in bucket}


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_takes_exactly_the_uninterrupted_next_step(folder, batches, tmp_path, stage):
    cfg = learner_config(zero_stage=stage)
    straight = Learner(cfg, folder, FMT)
    for b in batches:
        straight.train_batch(b)

    first = Learner(cfg, folder, FMT)
    for b in batches[:2]:
        first.train_batch(b)
    saved = first.save_checkpoint(RunState(step=2, policy_version=2, data_position=16, reward_stats_path="stats.json"), tmp_path)
    del first

    resumed = Learner(cfg, folder, FMT)
    state = resumed.load_checkpoint(tmp_path)  # the run folder: follows 'latest'
    assert state == RunState(step=2, policy_version=2, data_position=16, reward_stats_path="stats.json")
    assert latest_checkpoint(tmp_path) == saved
    resumed.train_batch(batches[2])
    assert resumed.engine.global_steps == straight.engine.global_steps == 6
    a, b = full_weights(straight), full_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_checkpoint_cut_off_mid_write_is_never_loaded(folder, batches, tmp_path, monkeypatch):
    learner = Learner(learner_config(), folder, FMT)
    learner.train_batch(batches[0])
    good = learner.save_checkpoint(RunState(step=1), tmp_path)
    before = full_weights(learner)
    learner.train_batch(batches[1])

    def crash(*args, **kwargs):
        raise OSError("disk full")  # the process dies after DeepSpeed wrote its files, before COMPLETE

    monkeypatch.setattr(ckpt, "_finalize", crash)
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(RunState(step=2), tmp_path)
    monkeypatch.undo()
    partial = tmp_path / ".tmp-step-00000002"
    assert partial.is_dir() and not (tmp_path / "step-00000002").exists()
    assert (tmp_path / "latest").read_text() == "step-00000001" and resolve_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        learner.load_checkpoint(partial)

    # A complete folder whose file was truncated afterwards is refused, naming the file; weights untouched.
    victim = next(good.rglob("mp_rank_00_model_states.pt"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    after_step = full_weights(learner)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt has .* bytes.*truncated"):
        learner.load_checkpoint(tmp_path)
    assert all(torch.equal(after_step[k], t) for k, t in full_weights(learner).items())
    victim.write_bytes(data)
    assert learner.load_checkpoint(tmp_path).step == 1
    assert all(torch.equal(before[k], t) for k, t in full_weights(learner).items())

    # The next save removes the crash's leftovers; only the newest keep_last remain.
    for step in (2, 3, 4, 5):
        learner.save_checkpoint(RunState(step=step), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004", "step-00000005"]


@pytest.mark.parametrize("stage", [0, 3])  # ZeRO-0: the module's own (flattened) parameters are saved
def test_export_writes_a_model_folder_that_load_policy_reads(folder, batches, tmp_path, stage):
    (folder / "pararl.json").write_text(json.dumps({"format": FMT.to_dict()}))  # a bundle file to carry along
    (folder / "vqvae").mkdir(exist_ok=True)  # an image tokenizer's folder (as -A checkpoints have) to carry along
    (folder / "vqvae" / "config.json").write_text("{}")
    learner = Learner(learner_config(zero_stage=stage), folder, FMT)
    learner.train_batch(batches[0])
    learner.save_checkpoint(RunState(step=1), tmp_path / "run")
    args = argparse.Namespace(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "model"), dtype=None, max_shard_size="20KB")
    assert export_main(args) == 0
    out = tmp_path / "model"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "sharded"
    assert "model.transformer.blocks.0.q_proj.weight" in index["weight_map"]
    assert (out / "pararl.json").is_file() and (out / "vqvae" / "config.json").is_file()
    exported = load_policy(out)
    live = full_weights(learner)
    state = exported.state_dict()
    assert set(state) == set(live) and all(torch.equal(state[k], live[k]) for k in live)
    # The sync hash is the same from the engine (ZeRO-3 gathered), from the export, and for any bucketing.
    assert learner.weights_hash() == weights_hash(exported.named_parameters())
    buckets = list(iter_weight_buckets(learner.engine, 4096))
    assert len(buckets) > 1 and all(sum(t.numel() * t.element_size() for _, t in b) <= 4096 or len(b) == 1 for b in buckets)
    assert weights_hash(p for b in buckets for p in b) == learner.weights_hash()
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_main(args)


def _packed(named):
    from pararl.sync.buckets import pack_flat

    return pack_flat([t for _, t in named], named[0][1].dtype, torch.device("cpu"))


def test_zero0_weights_travel_as_contiguous_runs_and_arrive_whole(folder):
    """Under ZeRO-0 the learner lays its parameters out back to back, so a sync bucket is one array
    (one copy into the object store); the worker side splits it back into the named tensors."""
    from pararl.sync.buckets import contiguous_runs
    from pararl.sync.wire import SyncError, TensorRun, decode_bucket, encode_bucket

    learner = Learner(learner_config(zero_stage=0), folder, FMT)
    before = load_policy(folder).state_dict()
    assert all(torch.equal(before[k], v) for k, v in full_weights(learner).items()), "flattening changed a value"
    buckets = list(iter_weight_buckets(learner.engine, 1 << 30))
    runs = contiguous_runs(buckets[0])
    assert len(buckets) == 1 and len(runs) == 1 and len(runs[0]) == len(buckets[0]) > 10
    wire = encode_bucket(buckets[0])
    assert len(wire) == 1 and isinstance(wire[0], TensorRun)
    arrived = decode_bucket(wire)
    assert [n for n, _ in arrived] == [n for n, _ in buckets[0]]
    assert weights_hash(arrived) == learner.weights_hash()
    # a run whose array does not match its names and shapes is refused, never loaded off by some elements
    short = TensorRun(wire[0].names, wire[0].shapes, wire[0].data[:-1], wire[0].dtype)
    with pytest.raises(SyncError, match="weight sync run of"):
        decode_bucket([short])
    # bf16 travels as its bits and comes back exactly
    bf16 = [(n, t.to(torch.bfloat16)) for n, t in buckets[0][:3]]
    back = decode_bucket([TensorRun.pack([(n, t) for n, t in zip([n for n, _ in bf16], _packed(bf16))])])
    assert all(torch.equal(a[1], b[1]) and b[1].dtype == torch.bfloat16 for a, b in zip(bf16, back))
    # ZeRO-3 gathers are copied out into one buffer per bucket: one run as well, the same weights
    zero3 = Learner(learner_config(zero_stage=3), folder, FMT)
    z3_buckets = list(iter_weight_buckets(zero3.engine, 1 << 30))
    assert len(contiguous_runs(z3_buckets[0])) == 1
    assert weights_hash(p for b in z3_buckets for p in b) == zero3.weights_hash() == learner.weights_hash()
