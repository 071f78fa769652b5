"""The default run, shortened: world, warm-up, CLIP, ParaRL on real Ray, evaluation before and after."""
import json

import mlflow
import pytest

from learner.sft import SFTConfig
from shapeworld.default_run import default_run
from shapeworld.prepare import PrepareConfig
from tests.test_world_pipeline import ARCH, TINY_CLIP, WORLD

pytestmark = pytest.mark.timeout(600)


def test_shortened_default_run_end_to_end(ray_local, tmp_path):
    prepare = PrepareConfig(world=WORLD, policy=ARCH, sft=SFTConfig(steps=3, batch_size=8), clip=TINY_CLIP, stats_batch=32)
    results = default_run(
        overrides=[f"run_dir={tmp_path / 'run'}", "train.steps=2", "train.checkpoint_every=1", "train.eval_prompts=4",
                   "data.prompts_per_step=2", "data.group_size=2", "learner.micro_batch_size=2", "sampler.steps=4",
                   "reward.sampled_steps=2", "reward.first_step=0.5"],
        cache_dir=str(tmp_path / "cache"), eval_samples=1, prepare_cfg=prepare,
    )
    for when in ("before", "after"):
        assert results[when]["n"] == 4 and 0 <= results[when]["aligned"] <= 1 and 0 <= results[when]["reward"] <= 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["after"] == results["after"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    metrics = client.get_run(results["run_id"]).data.metrics
    assert {"eval.before.aligned", "eval.after.aligned", "eval.after.reward", "reward.mean"} <= set(metrics)
    assert (tmp_path / "run" / "final-policy" / "pararl.json").is_file()
    # make train again into the same folder: refused before any work, the finished run untouched
    with pytest.raises(ValueError, match="holds a finished default run"):
        default_run(overrides=[f"run_dir={tmp_path / 'run'}"], cache_dir=str(tmp_path / "cache"), prepare_cfg=prepare)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == saved
