"""LoRA (peft) in the learner, the rollout worker and export: only adapters train and travel, the
reference is the base, the exported merged policy is base + adapters (real DeepSpeed, in-process)."""
import argparse

import pytest
import torch

from learner.batch import TrainBatch
from learner.checkpoint import RunState
from learner.cli import export_main
from learner.offload import optimizer_tensors
from learner.trainer import Learner
from pararl.config import ConfigError
from pararl.logprobs import trajectory_logprobs
from pararl.lora import AdapterConfig, is_adapter
from pararl.models import load_policy
from pararl.plans import TracePlan
from pararl.sync.buckets import weights_hash
from pararl.sync.wire import encode_bucket
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.worker import RolloutWorker
from tests.learner_tiny import FMT, learner_config, policy_folder, sampled_batch
from tests.tiny import tiny_bundle

LORA = AdapterConfig(enabled=True, rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return policy_folder(tmp_path_factory.mktemp("lora"), seed=3)


@pytest.fixture(scope="module")
def batches(folder):
    return [sampled_batch(folder, seed=s) for s in range(3)]


def _named(learner, adapters: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.module.named_parameters() if is_adapter(n) == adapters}


def _adapter_count(learner) -> int:
    return sum(p.numel() for n, p in learner.module.named_parameters() if is_adapter(n))


@pytest.mark.parametrize("stage", [0, 2])
def test_only_the_adapters_train_and_the_reference_is_the_base_model(folder, batches, stage):
    learner = Learner(learner_config(zero_stage=stage, lora=LORA, beta=0.1), folder, FMT)
    base = load_policy(folder)
    assert learner.reference is None, "no second copy of the weights"
    base_before, adapters_before = _named(learner, False), _named(learner, True)
    n = _adapter_count(learner)
    assert 0 < n < 0.5 * sum(p.numel() for p in base.parameters())
    for b in batches:
        m = learner.train_batch(b)
        assert m["kl"] == m["kl"]
    held = sum(t.numel() for t in optimizer_tensors(learner.engine))
    assert held == 2 * n + (n if stage else 0), "Adam moments (and the ZeRO master copy) of the adapters only"
    after = _named(learner, False)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before), "the base weights never change"
    assert any(not torch.equal(p, adapters_before[k]) for k, p in _named(learner, True).items())
    with torch.no_grad():  # the reference log-probs are the base model's, after the adapters moved
        plain = trajectory_logprobs(base, FMT, batches[0], batches[0].plan)
        ref = learner.reference_logprobs(batches[0])
        cur = trajectory_logprobs(learner.module, FMT, batches[0], batches[0].plan)
    assert torch.allclose(ref.logp, plain.logp, atol=1e-6) and not torch.allclose(cur.logp, plain.logp, atol=1e-4)


def test_a_version_sends_only_the_adapters_and_a_worker_on_the_same_base_then_equals_the_learner(folder, batches,
                                                                                                 tmp_path):
    learner = Learner(learner_config(zero_stage=0, lora=LORA), folder, FMT)
    learner.train_batch(batches[0])
    buckets = list(learner.weight_buckets(1 << 20))
    sent = [(name, t) for b in buckets for name, t in b]
    assert sent and all(is_adapter(name) for name, _ in sent)
    assert sum(t.numel() * t.element_size() for _, t in sent) == 4 * _adapter_count(learner)
    bundle_folder, bundle = tiny_bundle(tmp_path)  # a rollout worker needs the whole bundle: the same base
    learner = Learner(learner_config(zero_stage=0, lora=LORA, grad_accumulation=1), bundle_folder, bundle.fmt)
    worker = RolloutWorker(str(bundle_folder), SamplerConfig(steps=4, text_len=8), adapters=LORA)
    plan = TracePlan((0, 2))
    traj, old = worker.sample([GenerationRequest([5, 6, 7], seed=s) for s in range(2)], 2, (0, 2), 0, plan)
    learner.train_batch(TrainBatch.from_trajectories(traj, torch.tensor([1.0, -1.0, 0.5, -0.5]), plan, old))
    assert worker.weights_hash() != learner.weights_hash()
    for bucket in learner.weight_buckets(1 << 20):
        worker.load_bucket(encode_bucket(bucket))
    worker.finish_sync(1)  # it expects exactly the adapters: a base tensor missing from the buckets is no error
    assert worker.weights_hash() == learner.weights_hash()


def test_export_merges_the_adapters_into_a_policy_that_loads_like_any_other(folder, batches, tmp_path):
    learner = Learner(learner_config(zero_stage=2, lora=LORA), folder, FMT)
    for b in batches[:2]:
        learner.train_batch(b)
    learner.save_checkpoint(RunState(step=2), tmp_path / "run")
    args = argparse.Namespace(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "model"), dtype=None, max_shard_size="2GB")
    assert export_main(args) == 0
    merged = load_policy(tmp_path / "model")  # the policy's own names: no adapter, no base_layer
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    ids = torch.randint(0, FMT.text_vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = learner.module(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert weights_hash(merged.named_parameters()) != weights_hash(load_policy(folder).named_parameters())


def test_bad_lora_settings_are_refused_by_name(folder):
    with pytest.raises(ConfigError, match="learner.lora.targets=.*wte"):
        Learner(learner_config(lora=AdapterConfig(enabled=True, targets=["wte"])), folder, FMT)
    with pytest.raises(ConfigError, match="need rank >= 1"):
        Learner(learner_config(lora=AdapterConfig(enabled=True, rank=0)), folder, FMT)
