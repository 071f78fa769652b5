"""The whole loop on real Ray + DeepSpeed + MLflow, tiny: steps, sync, faults, resume, bad input."""
import json
from pathlib import Path

import mlflow
import pytest
import yaml

from cluster.driver import Driver
from cluster.run_config import load_run_config
from cluster.train import train
from pararl.bundle import load_codecs
from pararl.cli import main
from tests.tiny_run import tiny_run

pytestmark = pytest.mark.timeout(300)

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("cluster"))


def test_three_steps_end_to_end_log_metrics_and_a_snapshot_picture(ray_local, setup):
    out = train(setup["config"])
    assert out["state"].step == 3 and out["state"].policy_version == 3
    client = mlflow.MlflowClient(f"sqlite:///{out['run_dir'] / 'mlflow.db'}")
    run = client.get_run(out["run_id"])
    for key in ("reward.mean", "reward.std", "reward.clip.mean", "reward.clip.clipped_at_0", "advantage.abs_mean",
                "learner.loss", "learner.kl", "learner.clip_fraction", "learner.grad_norm", "learner.lr", "time.rollout",
                "time.reward", "time.learner", "time.sync", "throughput.trajectories_per_s", "policy_version"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(out["run_id"], "reward.mean")) == 3
    assert [m.value for m in client.get_metric_history(out["run_id"], "rollout.staleness_max")] == [0, 0, 0]  # synchronous
    assert any(k.startswith("reward.R_t.step_") for k in run.data.metrics)
    assert run.data.params["sampler.steps"] == "4"
    pictures = [a.path for a in client.list_artifacts(out["run_id"], "snapshots")]
    assert pictures == ["snapshots/step_00000.png", "snapshots/step_00002.png"]
    assert {a.path for a in client.list_artifacts(out["run_id"])} >= {"config.yaml", "reward", "snapshots"}


def _cfg(setup, tmp_path, **over):
    overrides = [f"run_dir={tmp_path / 'run'}"] + [f"{k}={v}" for k, v in over.items()]
    return load_run_config(setup["config"], overrides)


def _synced(driver, before: set[str]) -> None:
    """After a step, every rollout worker holds the learner's (changed) weights."""
    learner_hashes = driver.learners.weights_hashes()
    worker_hashes = driver.rollouts.hashes()
    assert len(set(learner_hashes)) == 1 and worker_hashes == learner_hashes * 2
    assert before != set(worker_hashes), "the update changed the weights, and the workers got the change"
    assert driver.state.policy_version == 1


def test_after_a_collective_sync_every_rollout_worker_holds_the_learners_weights(ray_local, setup, tmp_path):
    """The object store's transport: the dead-learner test below checks the same after its first step."""
    driver = Driver(_cfg(setup, tmp_path, **{"train.steps": 1, "cluster.sync_transport": "collective",
                                             "cluster.sync_bucket_mb": 0.0625}))
    try:
        before = set(driver.rollouts.hashes())
        driver.run()
        _synced(driver, before)
    finally:
        driver.shutdown()


def test_a_rollout_worker_killed_while_sampling_loses_nothing(ray_local, setup, tmp_path):
    import threading
    import time

    import ray

    driver = Driver(_cfg(setup, tmp_path, **{"train.steps": 2, "sampler.steps": 8, "data.prompts_per_step": 96}))
    try:
        driver.run()  # two steps: the workers hold version 2
        victim = driver.rollouts.workers[1]
        duration = driver._rollout(2).seconds
        for attempt in range(4):  # the kill must land while the workers sample: earlier on each try
            killer = threading.Timer(duration / (3 * 2**attempt), lambda: ray.kill(victim, no_restart=False))
            killer.start()
            rollout = driver._rollout(3 + attempt)
            traj, old = rollout.traj, rollout.old
            killer.join()
            if driver.rollouts.restarts:
                break
            time.sleep(1.0)  # a kill that came after the rollout: let the restart finish, try again
            ray.get(victim.ready.remote())
            driver.sync.catch_up(victim)
        assert driver.rollouts.restarts == 1
        assert len(traj) == 96 * 2 and traj.policy_version == 2 and len(old.logp) == len(traj)
        assert not (traj.output == driver.codecs.fmt.mask_id).any()
        assert ray.get(victim.ready.remote()) == 2, "the restarted worker loaded the current weights"
        assert driver.rollouts.hashes()[1] == driver.learners.weights_hashes()[0]
    finally:
        driver.shutdown()


@pytest.fixture(scope="module")
def stopped(ray_local, setup, tmp_path_factory):
    """A run stopped after 2 steps with a checkpoint after each; a test resumes a copy of its folder."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    first = train(setup["config"], [f"run_dir={run}", "train.steps=2", "train.checkpoint_every=1"])
    return first, run


def copy_of(stopped, tmp_path) -> dict:
    import shutil

    first, run = stopped
    shutil.copytree(run, tmp_path / "run")
    return first


def test_stop_after_a_checkpoint_then_resume_continues_at_the_next_step(ray_local, setup, stopped, tmp_path, capsys):
    first = copy_of(stopped, tmp_path)
    assert first["state"].step == 2
    out = train(setup["config"], [f"run_dir={tmp_path / 'run'}", "train.steps=3", "train.resume=true"])
    assert out["state"].step == 3 and out["state"].policy_version == 3
    assert out["run_id"] == first["run_id"], "the resumed run keeps logging into the same MLflow run"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(out["run_id"], "reward.mean")] == [0, 1, 2]
    # a new run without resume is refused before it starts: the earlier checkpoints stay as they are
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    code = main(["train", str(setup["config"]), f"run_dir={tmp_path / 'run'}", "train.steps=1"])
    assert code == 2 and "holds a checkpoint of an earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_resume_without_a_checkpoint_is_a_clear_error(ray_local, setup, tmp_path, capsys):
    code = main(["train", str(setup["config"]), f"run_dir={tmp_path / 'empty'}", "train.resume=true"])
    assert code == 2 and "holds no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("learner.lrr=1", "unknown config key 'learner.lrr' (did you mean 'lr'?)"),
    ("model=/nowhere/model", "model folder /nowhere/model does not exist"),
    ("reward.stats_file=/nowhere/stats.json", "reward stats file /nowhere/stats.json does not exist"),
    ("cluster.rollout_gpus=1", "the config needs 2 GPUs (the cluster has 0)"),
    ("cluster.sync_bucket_mb=0", "cluster.sync_bucket_mb=0.0 must be positive"),
    ("reward.request_size=100", "reward.request_size must be between 1 and reward.max_batch_size"),
    ("reward.first_step=0.9", "reward.sampled_steps / reward.first_step do not fit sampler.steps=4"),
])
def test_bad_input_exits_2_with_one_clear_line(ray_local, setup, tmp_path, capsys, override, message):
    code = main(["train", str(setup["config"]), f"run_dir={tmp_path / 'run'}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err


def test_an_object_store_sync_then_a_dead_learner_rank_that_stops_the_run_with_the_checkpoint_intact(ray_local, setup,
                                                                                                     tmp_path):
    """One driver for two checks (each a driver start less): after the first step every worker holds the
    learner's weights, sent through the object store in buckets of 64 KiB (the tiny policy travels in
    several, streamed and loaded one by one); then a learner rank dies. Resuming after a learner's
    death: tests/test_multinode.py (a learner's node killed, then resume)."""
    import ray

    from cluster.learner_group import LearnerDied
    from learner.checkpoint import latest_checkpoint

    cfg = _cfg(setup, tmp_path, **{"train.steps": 1, "train.checkpoint_every": 1, "cluster.sync_bucket_mb": 0.0625})
    driver = Driver(cfg)
    try:
        before = set(driver.rollouts.hashes())
        driver.run()
        assert len(driver.sync.latest.buckets) > 1
        _synced(driver, before)
        saved = latest_checkpoint(cfg.learner.checkpoint.folder)
        ray.kill(driver.learners.actors[0])
        driver.cfg.train.steps = 3
        died = r"learner rank died during step 1 \(.*killed by `ray.kill`.*\)\. The last checkpoint is intact; rerun with train.resume=true"
        with pytest.raises(LearnerDied, match=died):
            driver.run()
        assert latest_checkpoint(cfg.learner.checkpoint.folder) == saved  # intact, not overwritten
        # a rank that is dead when a checkpoint is written: the same one line, not Ray's traceback
        with pytest.raises(LearnerDied, match="a learner rank died while writing a checkpoint"):
            driver._checkpoint()
        assert latest_checkpoint(cfg.learner.checkpoint.folder) == saved
    finally:
        driver.shutdown()


def test_sigterm_to_the_run_s_process_group_after_step_3_writes_a_checkpoint_and_resume_continues(setup, tmp_path):
    """As a scheduler (Slurm, systemd, timeout) sends it: to the whole process group of `pararl train`,
    Ray's local processes included; they must outlive the driver's last step. The resumed run logs
    every step once into the same MLflow run and finishes it."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from learner.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pararl.cli", "train", str(setup["config"]), f"run_dir={run_dir}", "train.steps=500",
           "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ),
                            start_new_session=True)
    try:
        db = run_dir / "mlflow.db"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if db.is_file():  # read-only peek: an MlflowClient here would race the run's own schema setup
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                        if con.execute("SELECT count(*) FROM metrics WHERE key = 'reward.mean'").fetchone()[0] >= 3:
                            break
                except sqlite3.OperationalError:
                    pass
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal 15, checkpoint written" in out
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    stopped = int(ckpt.name.split("-")[-1])
    assert 3 <= stopped < 500
    with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("KILLED",)]
    again = subprocess.run([*cmd[:-2], f"train.steps={stopped + 2}", "train.checkpoint_every=0", "train.resume=true"],
                           capture_output=True, text=True, timeout=240, env=dict(os.environ))
    assert again.returncode == 0, again.stdout + again.stderr
    with sqlite3.connect(f"file:{run_dir / 'mlflow.db'}?mode=ro", uri=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
        logged = con.execute("SELECT step FROM metrics WHERE key = 'reward.mean' ORDER BY step").fetchall()
    assert [s for (s,) in logged] == list(range(stopped + 2)), "every step logged once"


def test_object_store_options_are_refused_when_joining_a_running_cluster():
    from cluster.config import ClusterConfig, check_cluster_config
    from pararl.errors import ConfigError

    with pytest.raises(ConfigError, match="apply to a local Ray only"):
        check_cluster_config(ClusterConfig(address="auto", object_store_mb=2048, preallocate_object_store=True))
    check_cluster_config(ClusterConfig(object_store_mb=2048, preallocate_object_store=True))


def _flaky_config(setup, tmp_path, share: float, **train) -> Path:
    """The tiny run with one reward model that returns NaN for ``share`` of each batch (4 trajectories a
    step, all in one request), and optimizer steps of 4 trajectories: dropping any used to train nothing."""
    raw = json.loads(json.dumps(setup["raw"]))
    raw["run_dir"] = str(tmp_path / "run")
    raw["reward"] = {"models": {"flaky": {"name": "tests.user_rewards:PartlyNaNReward", "kwargs": {"share": share},
                                          "standardize": False}},
                     "sampled_steps": 2, "replicas": 1, "cpus_per_replica": 0.25, "request_size": 4, "max_batch_size": 4}
    raw["learner"]["micro_batch_size"] = 4
    raw["train"] = {"steps": 2, "checkpoint_every": 0, **train}
    path = tmp_path / "flaky.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_reward_model_that_returns_nan_for_some_trajectories_still_trains_every_usable_one(ray_local, setup, tmp_path):
    out = train(_flaky_config(setup, tmp_path, share=0.5))
    m = out["metrics"]
    assert out["state"].policy_version == 2, "every step must train"
    assert m["reward/dropped"] == 2 and m["train/trajectories"] == 2 and m["train/padding"] == 2
    assert m["train/idle_steps"] == 0 and m["learner/tokens"] > 0


def test_a_run_whose_reward_is_always_nan_stops_with_one_line_and_a_failed_mlflow_run(ray_local, setup, tmp_path, capsys):
    code = main(["train", str(_flaky_config(setup, tmp_path, share=1.0, max_idle_steps=2))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "2 steps in a row trained no trajectory" in err[-1], err
    assert "reward model 'flaky' returned a non-finite score for 4 of 4 trajectories" in err[-1], err
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "trained no trajectory" in run.data.tags["failure"]


def test_stats_of_another_reward_model_exit_2_with_one_line_before_ray_starts(setup, tmp_path, capsys):
    """The cluster address points at nothing: had the check waited for Ray (it used to run inside the
    reward replica, after Ray and Serve started), the error would be about the connection."""
    stats = json.loads((setup["tmp"] / "reward_stats.json").read_text())
    stats["models"]["clip"]["identity"] = "open_clip:ViT-B-32:laion2b"
    other = tmp_path / "other_stats.json"
    other.write_text(json.dumps(stats))
    code = main(["train", str(setup["config"]), f"run_dir={tmp_path / 'run'}", f"reward.stats_file={other}",
                 "cluster.address=127.0.0.1:9"])  # nothing listens there: Ray must not be reached
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "was computed with reward model 'open_clip:ViT-B-32:laion2b'" in err[0] and "rerun `pararl reward-stats`" in err[0]


def test_a_bad_image_anywhere_in_the_dataset_exits_2_at_load_before_ray_starts(setup, tmp_path, capsys):
    """One edit record in 100 names an image of the wrong size: found from the file headers before Ray
    (the cluster address points at nothing, so a check made later would fail on the connection)."""
    from PIL import Image

    size = load_codecs(setup["folder"]).image_tokenizer.image_size
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (size[1], size[0])).save(good)
    Image.new("RGB", (size[1] + 1, size[0])).save(bad)
    rows = [{"prompt": "make it red", "task": "edit", "input_image": str(bad if i == 73 else good)} for i in range(100)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["train", str(setup["config"]), f"run_dir={tmp_path / 'run'}", f"data.train={data}",
                 "cluster.address=127.0.0.1:9"])  # nothing listens there: Ray must not be reached
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"1 of 2 images named by {data} cannot be used" in err[0] and f"{bad} is {size[1] + 1}x{size[0]}" in err[0]
    assert not (tmp_path / "run" / "mlflow.db").exists(), "nothing was started"


@pytest.mark.parametrize("reward,message", [
    ({"name": "tests.user_rewards:RaisingReward", "standardize": False},
     "reward model 'flaky' (raising) raised KeyError: \"no such column: 'clip_score'\""),
    ({"name": "tests.user_rewards:PartlyNaNReward", "kwargs": {"share": 0.5}, "standardize": False},
     "non-finite reward (reward.nonfinite=fail): trajectory 0: reward model 'flaky' returned a non-finite score"),
])
def test_a_failing_reward_model_exits_2_with_one_line_and_a_failed_mlflow_run(ray_local, setup, tmp_path, capsys,
                                                                             reward, message):
    config = yaml.safe_load(_flaky_config(setup, tmp_path, share=0.5).read_text())
    config["reward"]["models"]["flaky"] = reward
    config["reward"]["nonfinite"] = "fail"
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["train", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and message in run.data.tags["failure"]


def test_a_driver_killed_with_sigkill_leaves_no_ray_agent_behind_the_next_start(tmp_path):
    """The dashboard and runtime-env agents outlive a SIGKILLed local driver (reparented to init); the
    next local start removes them, and only them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from cluster.placement import ORPHAN_AGENTS, reap_orphaned_agents

    code = ("import os, signal, ray; from cluster.config import ClusterConfig; from cluster.placement import start_ray; "
            "start_ray(ClusterConfig(num_cpus=1)); ray.get(ray.put(1)); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    def orphans():
        return [p.pid for p in psutil.process_iter(["cmdline", "ppid"])
                if (p.info["cmdline"] or [""])[0].startswith(ORPHAN_AGENTS) and p.info["ppid"] == 1]

    # The raylet notices its driver's death and exits on its own time; its agents are reparented to init
    # only then, and not all in the same instant: wait until the orphans are there and stay the same.
    left, deadline = orphans(), time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = orphans()
        if now and now == left:
            break
        left = now
    assert left, "the agents of the killed driver should be orphaned"
    assert sorted(reap_orphaned_agents()) == sorted(left) and orphans() == []


def test_resume_after_a_stop_between_checkpoints_logs_no_step_twice(ray_local, setup, stopped, tmp_path):
    """Steps 0 and 1 are logged; the checkpoint after step 1 is lost (the crash the learner can have while
    writing it), so resume repeats step 1 from the checkpoint after step 0: MLflow keeps one point per step."""
    import shutil

    from learner.checkpoint import LATEST, latest_checkpoint

    first = copy_of(stopped, tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    lost = latest_checkpoint(folder)
    kept = sorted(p for p in folder.glob("step-*") if p != lost)[-1]
    shutil.rmtree(lost)
    (folder / LATEST).write_text(kept.name)  # the pointer as it was before the lost save
    again = train(setup["config"], [f"run_dir={tmp_path / 'run'}", "train.steps=3", "train.checkpoint_every=1",
                                    "train.resume=true"])
    assert again["run_id"] == first["run_id"] and again["state"].step == 3
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    for key in ("reward.mean", "policy_version"):
        assert sorted(m.step for m in client.get_metric_history(first["run_id"], key)) == [0, 1, 2], key


def test_start_ups_run_at_once_and_the_first_failure_waits_for_the_rest():
    import threading
    import time

    from cluster.actor_group import concurrently

    both = threading.Barrier(2, timeout=10)  # each start waits for the other: one after the other would time out
    assert concurrently(lambda: both.wait() * 0 + 1, lambda: both.wait() * 0 + 2) == [1, 2]
    ended = []

    def fails():
        raise ValueError("reward pool: no such model")

    def slow():
        time.sleep(0.3)
        ended.append("learners")
        return "learners"

    with pytest.raises(ValueError, match="no such model"):
        concurrently(fails, slow)
    assert ended == ["learners"], "the failure is raised once every start-up has ended"
