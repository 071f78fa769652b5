"""UniGRPO on the world, shortened: configs/unigrpo-world.yaml through the default run's path (world with
question tasks, warm-up on every family, ParaRL's loop on real Ray with a reward per task, evaluation
per task before and after). Three steps take the three output families in turn."""
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest

from learner.sft import SFTConfig
from shapeworld.default_run import default_run
from shapeworld.prepare import PrepareConfig
from tests.test_default_run import SHORT
from tests.test_world_pipeline import ARCH, TINY_CLIP, WORLD

pytestmark = pytest.mark.timeout(600)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "unigrpo-world.yaml"
SHARES = {"t2i": 0.25, "understand": 0.2, "reason": 0.2}
PREPARE = PrepareConfig(world=replace(WORLD, train_size=96, eval_size=24, task_shares=SHARES), policy=ARCH,
                        sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)


def test_a_shortened_unigrpo_run_trains_every_family_and_evaluates_each_task(ray_local, tmp_path):
    short = [o for o in SHORT if not o.startswith(("train.steps", "train.eval_prompts"))]
    results = default_run(CONFIG, [f"run_dir={tmp_path / 'run'}", *short, "train.steps=3", "train.eval_prompts=24"],
                          cache_dir=str(tmp_path / "cache"), eval_samples=1, prepare_cfg=PREPARE)
    for when in ("before", "after"):
        got = results[when]
        assert {"aligned", "follows", "t2i_follows", "understand_correct", "reason_correct"} <= set(got), sorted(got)
        assert all(0 <= got[k] <= 1 for k in ("t2i_follows", "understand_correct", "reason_correct"))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = client.get_run(results["run_id"])
    history = {k: client.get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    tasks = {k.split(".")[2] for k in history if k.startswith("reward.task.") and k.endswith(".trajectories")}
    assert {"t2i", "understand", "reason"} & tasks and len(tasks) >= 2, sorted(history)
    assert {"reward.follows.mean", "reward.answer.mean", "reward.clip.mean"} <= set(history)
    assert len(history["reward.mean"]) == 3 and run.info.status == "FINISHED"
