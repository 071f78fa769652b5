"""The run config is checked whole when it loads: every stage's checks and those between stages,
so a bad value exits 2 with one line naming the key, found by the loader before anything starts."""
from __future__ import annotations

import re

import pytest

from cluster.run_config import load_run_config
from pararl.cli import main
from pararl.errors import ConfigError

CONFIG = """
model: /nonexistent/model
run_dir: {run_dir}
data: {{train: /nonexistent/train.jsonl}}
reward:
  models: {{clip: {{name: open_clip, standardize: false}}}}
"""

BAD = [
    ("sampler.block_length=5", "sampler.text_len 32 is not a multiple of block_length 5"),
    ("sampler.steps=64", "more steps than tokens allow"),
    ("sampler.image_start=40", "sampler.image_start 40 must lie in [0, steps=32)"),
    ("reward.nonfinite=maybe", "reward.nonfinite must be 'drop' or 'fail', got 'maybe'"),
    ("reward.request_size=64", "reward.request_size must be between 1 and reward.max_batch_size (16), got 64"),
    ("reward.step_sampling=every", "reward.step_sampling must be 'random' or 'uniform'"),
    ("reward.sampled_steps=40", "do not fit sampler.steps=32"),
    ("learner.kl_estimator=k4", "learner.kl_estimator='k4' is not a known KL estimator; known: k1, k2, k3"),
    ("cluster.mode=async", "cluster.mode='async' is not one of: sync, off_policy"),
    ("cluster.mode=off_policy cluster.max_staleness=2", "cluster.mode=off_policy means max_staleness=1"),
    ("cluster.max_staleness=-1", "cluster.max_staleness=-1 must be >= 0"),
    ("cluster.address=ray://head:10001", "Ray Client is not supported"),
    ("cluster.lost_worker=ignore", "cluster.lost_worker='ignore' is not one of: restart, drop"),
    ("cluster.rollout_resources.GPU=1", "cluster.rollout_resources names Ray's own resource 'GPU'"),
    ("cluster.learner_resources.learner_node=0", "cluster.learner_resources.learner_node=0 must be positive"),
    ("reward.resources_per_replica.CPU=2", "reward.resources_per_replica names Ray's own resource 'CPU'"),
    ("cluster.colocate=true cluster.learner_ranks=1", "set cluster.rollout_workers=1 (= learner_ranks), not 2"),
    ("cluster.colocate=true cluster.rollout_workers=1 cluster.learner_ranks=1 learner.zero_stage=3",
     "ZeRO-3 partitions"),
    ("cluster.colocate=true cluster.learner_ranks=2 cluster.sync_transport=collective", "does not apply under cluster.colocate=true"),
    ("cluster.sync_transport=collective cluster.rollout_gpus=0.5 cluster.learner_gpus=0.5",
     "NCCL refuses two ranks of one group on the same device"),
    ("evaluation.judges.oracle.x=1", "unknown judge 'oracle'"),
    ("evaluation.samples=0", "evaluation.samples=0 must be >= 1"),
    ("data.group_size=0", "data.group_size=0 must be >= 1"),
    ("train.max_idle_steps=-1", "train.max_idle_steps=-1 must be >= 0"),
    ("cluster.dashboard=true cluster.address=auto", "cluster.dashboard applies to a local Ray only"),
    ("reward.http.max_images=0", "reward.http.max_body_mb, max_images and max_image_side must be positive"),
]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "run"))
    return path


def test_a_good_config_loads_with_its_paths_and_preset_filled(config):
    cfg = load_run_config(config)
    assert cfg.sampler.guidance == "pararl" and cfg.reward.stats_file.endswith("reward_stats.json")
    assert cfg.learner.checkpoint.folder.endswith("checkpoints")


def test_the_former_off_policy_mode_is_max_staleness_1_and_custom_resources_load(config):
    cfg = load_run_config(config, ["cluster.mode=off_policy", "cluster.rollout_resources={rollout_node: 1}"])
    assert cfg.cluster.max_staleness == 1 and cfg.cluster.mode is None
    assert dict(cfg.cluster.rollout_resources) == {"rollout_node": 1.0}


@pytest.mark.parametrize("override,message", BAD, ids=[o for o, _ in BAD])
def test_a_bad_value_exits_2_with_one_line_before_ray_starts(config, capsys, override, message):
    assert main(["train", str(config), *override.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError, match=re.escape(message)):  # found by the loader itself, which starts nothing
        load_run_config(config, override.split())


def test_a_config_extends_another_and_a_missing_or_circular_base_is_named(config, tmp_path):
    variant = tmp_path / "variant.yaml"
    variant.write_text("extends: run.yaml\nseed: 7\ncluster: {max_staleness: 1}\n")
    cfg = load_run_config(variant)
    assert cfg.seed == 7 and cfg.cluster.max_staleness == 1 and cfg.sampler.guidance == "pararl"  # the base's own
    (tmp_path / "gone.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist \(extended by .*gone.yaml\)"):
        load_run_config(tmp_path / "gone.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_run_config(tmp_path / "loop.yaml")
