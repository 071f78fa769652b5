"""Bounded staleness on real Ray + DeepSpeed + MLflow: rollouts queued up to k versions ahead, never staler."""
import json

import mlflow
import pytest
import torch

from cluster.driver import Driver, nothing_trained_reason, timing_metric
from cluster.run_config import load_run_config
from cluster.train import train
from learner.checkpoint import checkpoint_name
from tests.tiny_run import tiny_run

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("staleness"))


def _history(run_dir, run_id: str, key: str) -> list[float]:
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_with_k_2_rollouts_run_two_versions_ahead_and_no_trained_trajectory_is_older(ray_local, setup, tmp_path):
    """k = 2 against k = 1, the latter asked for by its older name (cluster.mode=off_policy): each step is
    sampled while the one before is learned. The synchronous loop's staleness 0 is tests/test_cluster.py's."""
    runs = {}
    for k, option in ((1, "cluster.mode=off_policy"), (2, "cluster.max_staleness=2")):
        run_dir = tmp_path / f"k{k}"
        out = train(setup["config"], [f"run_dir={run_dir}", option, "train.steps=5", "train.checkpoint_every=2"])
        runs[k] = (run_dir, out)
        assert out["state"].policy_version == 5
    run_dir, out = runs[2]
    made_by = _history(run_dir, out["run_id"], "rollout.trajectory_version")
    staleness = _history(run_dir, out["run_id"], "rollout.staleness_max")
    assert made_by == [0, 0, 0, 1, 2]  # steps 1 and 2 were queued with step 0's weights
    assert staleness == [0, 1, 2, 2, 2] and max(staleness) <= 2
    assert _history(run_dir, out["run_id"], "train.stale_dropped") == [0] * 5
    assert all(r == r for r in _history(run_dir, out["run_id"], "learner.ratio_mean"))
    one_dir, one = runs[1]
    assert _history(one_dir, one["run_id"], "rollout.trajectory_version") == [0, 0, 1, 2, 3]  # step k+1 sampled while k learned
    assert _history(one_dir, one["run_id"], "rollout.staleness_max") == [0, 1, 1, 1, 1]
    assert all(r == r for r in _history(one_dir, one["run_id"], "learner.ratio_mean"))
    assert _history(one_dir, one["run_id"], "reward.mean")[0] == _history(run_dir, out["run_id"], "reward.mean")[0]
    assert _history(one_dir, one["run_id"], "learner.kl")[1:] != _history(run_dir, out["run_id"], "learner.kl")[1:], \
        "running further ahead trains on other trajectories"
    # the checkpoint after step 4 was written while the rollout of step 4 was queued: resume draws its prompts again
    state = json.loads((run_dir / "checkpoints" / checkpoint_name(4) / "run_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 4 * setup["raw"]["data"]["prompts_per_step"]


def test_a_trajectory_staler_than_k_is_never_trained_on(ray_local, setup, tmp_path):
    cfg = load_run_config(setup["config"], [f"run_dir={tmp_path / 'run'}", "cluster.max_staleness=1", "train.steps=2"])
    driver = Driver(cfg)
    try:
        driver.run()  # the policy is at version 2
        rollout = driver._rollout(2)
        rollout.traj.versions = torch.tensor([2, 1, 0, 0])[: len(rollout.traj)]  # two made 2 versions ago
        rewards = driver.reward.score(rollout.traj)
        batch, facts = driver._train_batch(rollout, rewards)
        assert facts["train/stale_dropped"] == 2 and facts["rollout/staleness_max"] == 2
        assert facts["train/trajectories"] <= 2 and (batch is None or int(batch.row_weight.sum()) <= 2)
        rollout.traj.versions = torch.zeros(len(rollout.traj), dtype=torch.long)  # all of them too old
        batch, facts = driver._train_batch(rollout, rewards)
        assert batch is None and "4 of 4 trajectories were older than cluster.max_staleness" in \
            nothing_trained_reason(len(rollout.traj), rewards, facts)
    finally:
        driver.shutdown()


def _stop_after(driver: Driver, steps: int) -> None:
    """Stop the run as a stop signal does, once ``steps`` steps are done."""
    step = driver._step

    def then_stop(s: int) -> dict:
        out = step(s)
        if s == steps - 1:
            driver.stop_requested = 15
        return out

    driver._step = then_stop


def _run(config, overrides: list[str], stop_after: int | None = None) -> tuple[str, str, int]:
    driver = Driver(load_run_config(config, overrides))
    try:
        if stop_after is not None:
            _stop_after(driver, stop_after)
        state = driver.run()
        return driver.learners.weights_hashes()[0], driver.tracker.run_id, state.step
    finally:
        driver.shutdown()


def _histories(run_dir, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric's (step, value) history but the clocks' (``cluster.driver.timing_metric``)."""
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys if not timing_metric(k)}


@pytest.mark.parametrize("k", [1, 2])
def test_a_run_k_ahead_stopped_at_step_3_of_8_and_resumed_ends_as_the_uninterrupted_run(ray_local, setup, tmp_path, k):
    """The checkpoint keeps the k rollouts queued at the stop (sampled by the older versions that made
    them): the resumed run trains on the same samples, its final weights hash-equal and every metric
    history equal to the uninterrupted run's, each step logged once."""
    from cluster.ahead import QUEUE_FILE
    from learner.checkpoint import latest_checkpoint

    base = [f"cluster.max_staleness={k}", "train.steps=8", "train.checkpoint_every=0"]
    whole, whole_id, _ = _run(setup["config"], [f"run_dir={tmp_path / 'whole'}", *base])
    run = tmp_path / "stopped"
    _, stopped_id, step = _run(setup["config"], [f"run_dir={run}", *base], stop_after=3)
    assert step == 3
    assert (latest_checkpoint(run / "checkpoints") / QUEUE_FILE).is_file()
    resumed, resumed_id, step = _run(setup["config"], [f"run_dir={run}", *base, "train.resume=true"])
    assert step == 8 and resumed_id == stopped_id
    assert resumed == whole, "the resumed run's final weights differ from the uninterrupted run's"
    mine, theirs = _histories(run, resumed_id), _histories(tmp_path / "whole", whole_id)
    assert mine.keys() == theirs.keys() and mine["reward.mean"] and [s for s, _ in mine["reward.mean"]] == list(range(8))
    assert {key: h for key, h in mine.items() if h != theirs[key]} == {}
