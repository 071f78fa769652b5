"""Colocated rollout and training, and LoRA (real Ray + DeepSpeed + Serve + MLflow): the same runs as disaggregated."""
from pathlib import Path

import pytest
import ray
import torch

from cluster.driver import Driver
from cluster.run_config import load_run_config
from learner.export import checkpoint_state_dict
from pararl.lora import is_adapter
from pararl.models import load_policy
from pararl.sync.wire import decode_bucket
from tests.tiny_run import tiny_run

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("colocated"))


def _steps(setup, run_dir, n: int, *overrides) -> tuple[list[str], list[float], Driver]:
    """The learner's weights hash and the mean reward after each of ``n`` steps (two learner ranks): each
    after the first samples after an update, with the optimizer state back from its step aside."""
    cfg = load_run_config(setup["config"], [f"run_dir={run_dir}", "cluster.learner_ranks=2", "cluster.rollout_workers=2",
                                            *overrides])
    driver = Driver(cfg)
    hashes, rewards = [], []
    for step in range(n):
        metrics = driver._step(step)
        hashes.append(driver.learners.weights_hashes())
        rewards.append(metrics["reward/mean"])
    return hashes, rewards, driver


def test_a_colocated_run_equals_the_disaggregated_one_step_by_step(ray_local, setup, tmp_path):
    apart, apart_rewards, driver = _steps(setup, tmp_path / "apart", 3)
    try:
        assert driver.rollouts.hashes() == [apart[-1][0]] * 2  # the workers hold the learner's weights
        learner_actors = {a._actor_id for a in driver.learners.actors}
        assert learner_actors.isdisjoint(a._actor_id for a in driver.rollouts.workers)
    finally:
        driver.shutdown()
    together, together_rewards, driver = _steps(setup, tmp_path / "together", 3, "cluster.colocate=true")
    try:
        # the rollout workers are the learner ranks themselves, and a new version sends no weights
        assert [a._actor_id for a in driver.rollouts.workers] == [a._actor_id for a in driver.learners.actors]
        assert driver.sync.latest.buckets == [] and type(driver.sync).__name__ == "ColocatedSync"
        assert ray.get([w.ready.remote() for w in driver.rollouts.workers]) == [3, 3]
        assert driver.rollouts.hashes() == [together[-1][0]] * 2
    finally:
        driver.shutdown()
    assert len({h for step in together for h in step}) == 3, "each step moved the weights, both ranks alike"
    assert together == apart, "colocated and disaggregated runs must hold the same weights after every step"
    assert together_rewards == apart_rewards


def test_a_lora_run_trains_and_sends_only_adapters_colocated_or_not(ray_local, setup, tmp_path):
    lora = ["learner.lora.enabled=true", "learner.lora.rank=4", "learner.lora.alpha=8"]
    apart, _, driver = _steps(setup, tmp_path / "apart", 2, *lora)
    try:
        assert driver.rollouts.hashes() == [apart[-1][0]] * 2
        sent = [item for ref in driver.sync.latest.buckets for item in decode_bucket(ray.get(ref))]
        names = {name for name, _ in sent}
        assert names and all(is_adapter(n) for n in names), "a new version is the adapters alone"
        policy = load_policy(setup["folder"])
        sent_bytes = sum(t.numel() * t.element_size() for _, t in sent)
        assert sent_bytes < 0.5 * sum(p.numel() * p.element_size() for p in policy.parameters())
        driver.sync.wait()
        checkpoint = driver.learners.save_checkpoint(driver.state)
    finally:
        driver.shutdown()
    saved = checkpoint_state_dict(Path(checkpoint))
    base = policy.state_dict()
    as_saved = {k: k.replace(".weight", ".base_layer.weight") for k in base}  # a linear map that carries an adapter
    as_saved = {k: name if name in saved else k for k, name in as_saved.items()}
    assert sum(name != k for k, name in as_saved.items()) == 7 * 2, "seven adapted maps in each of two blocks"
    assert all(torch.equal(saved[as_saved[k]], v) for k, v in base.items()), "the base weights never change"
    together, _, driver = _steps(setup, tmp_path / "together", 2, *lora, "cluster.colocate=true")
    driver.shutdown()
    assert len({h for step in apart for h in step}) == 2 and together == apart
