"""Colocated rollout and training (real Ray + DeepSpeed + Serve + MLflow): the same run as disaggregated."""
import pytest
import ray

from cluster.driver import Driver
from cluster.run_config import load_run_config
from tests.tiny_run import tiny_run

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("colocated"))


def _three_steps(setup, run_dir, *overrides) -> tuple[list[str], list[float], Driver]:
    """The learner's weights hash and the mean reward after each of three steps (two learner ranks)."""
    cfg = load_run_config(setup["config"], [f"run_dir={run_dir}", "cluster.learner_ranks=2", "cluster.rollout_workers=2",
                                            *overrides])
    driver = Driver(cfg)
    hashes, rewards = [], []
    for step in range(3):
        metrics = driver._step(step)
        hashes.append(driver.learners.weights_hashes())
        rewards.append(metrics["reward/mean"])
    return hashes, rewards, driver


def test_a_colocated_run_equals_the_disaggregated_one_step_by_step(ray_local, setup, tmp_path):
    apart, apart_rewards, driver = _three_steps(setup, tmp_path / "apart")
    try:
        assert driver.rollouts.hashes() == [apart[-1][0]] * 2  # the workers hold the learner's weights
        learner_actors = {a._actor_id for a in driver.learners.actors}
        assert learner_actors.isdisjoint(a._actor_id for a in driver.rollouts.workers)
    finally:
        driver.shutdown()
    together, together_rewards, driver = _three_steps(setup, tmp_path / "together", "cluster.colocate=true")
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
