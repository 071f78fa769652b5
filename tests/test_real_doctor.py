"""``pararl doctor``: a config checked against the model folder, the reward, the stats and the cluster Ray sees."""
import argparse
import json
from pathlib import Path

import yaml

from cluster.doctor import add_doctor_arguments, doctor_main
from reward.stats import ModelStats, save_stats
from tests.real_tiny import write_a_checkpoint

CONFIGS = Path(__file__).parent.parent / "configs"


def run(argv):
    parser = argparse.ArgumentParser()
    add_doctor_arguments(parser)
    return doctor_main(parser.parse_args(argv))


def test_doctor_names_the_gpu_shortfall(ray_local, capsys):
    assert ray_local.cluster_resources().get("GPU", 0) == 0
    rc = run([str(CONFIGS / "mmada-parallel-a-8b.yaml")])
    out = capsys.readouterr().out
    assert rc == 2
    assert ("PROBLEM  cluster: the config needs 26 GPUs (16 rollout workers x 1 + 8 learner ranks x 1 + "
            "2 reward replicas x 1), the cluster has 0") in out
    assert "PROBLEM  model: model folder /models/MMaDA-Parallel-A does not exist" in out
    assert "pararl doctor: " in out and ray_local.is_initialized(), "the session's Ray is left running"


def test_doctor_passes_a_complete_small_run(ray_local, tmp_path, capsys):
    folder = write_a_checkpoint(tmp_path / "a")
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a red square"}) + "\n")
    stats = save_stats(tmp_path / "stats.json", {"words": ModelStats("word-count(delay=0.0)", 3.0, 1.0, 10)})
    config = {
        "model": str(folder), "run_dir": str(tmp_path / "run"),
        "data": {"train": str(tmp_path / "train.jsonl"), "prompts_per_step": 1, "group_size": 2},
        "sampler": {"steps": 4, "text_len": 8, "cfg_image": 2.0},
        "reward": {"models": {"words": {"name": "tests.user_rewards:WordCountReward"}}, "stats_file": str(stats)},
        "learner": {"device": "cpu", "zero_stage": 0},
        "cluster": {"rollout_workers": 1, "learner_ranks": 1},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = run([str(path), "--load"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "format preset 'mmada-parallel-a' named in pararl.json" in out and "image tokenizer: VQModel in vqvae/" in out
    assert "weights: 12 tensors with the names and shapes config.json implies" in out
    assert "'words': mean 3.0000" in out and out.strip().endswith("pararl doctor: ready")

    # a stats file measured with another model, and a broken shard, are each one line
    save_stats(stats, {"words": ModelStats("another-model", 3.0, 1.0, 10)})
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    rc = run([str(path), "--load"])
    out = capsys.readouterr().out
    assert rc == 2
    assert f"PROBLEM  model: weights: {folder}/model.safetensors.index.json names shards that are missing: {shard.name}" in out
    assert "PROBLEM  stats: " in out and "'another-model'" in out


def test_doctor_estimates_gpu_memory_from_the_model_config(ray_local, tmp_path, capsys):
    from pararl.models import llada_8b_config

    folder = tmp_path / "mmada-parallel-a-8b"  # config.json only: the weights are not there yet
    llada_8b_config(embedding_size=134656).save_pretrained(folder)
    rc = run([str(CONFIGS / "mmada-parallel-a-8b.yaml"), f"model={folder}", "--gpu-memory-gb", "24"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "ok       model: config.json: model_type llada, 8.08B parameters" in out
    assert "PROBLEM  model: weights: " in out
    assert "PROBLEM  memory: learner rank needs about 38." in out and "its 1 GPU has 24 GiB (--gpu-memory-gb)" in out
    assert "ok       memory: rollout worker: " in out and "ok       memory: reward replica: " in out


def test_doctor_says_a_colocated_8b_config_fits_one_node_of_8_gpus(ray_local, tmp_path, capsys):
    from pararl.models import llada_8b_config

    folder = tmp_path / "mmada-parallel-m-8b"
    llada_8b_config(embedding_size=134656).save_pretrained(folder)
    rc = run([str(CONFIGS / "mmada-parallel-m-8b-colocated.yaml"), f"model={folder}", "--gpu-memory-gb", "80",
              "--node-gpus", "8"])
    out = capsys.readouterr().out
    assert rc == 2  # the weights are not there, nor are the GPUs in this Ray
    assert "the config needs 6.5 GPUs (8 colocated ranks x 0.75 + 2 reward replicas x 0.25)" in out
    assert "ok       memory: colocated rank, training: " in out and "ok       memory: colocated rank, sampling: " in out
    assert "ok       memory: one node of 8 GPUs of 80 GiB: fits (6.5 of 8 GPUs, at most " in out
    rc = run([str(CONFIGS / "mmada-parallel-m-8b-colocated.yaml"), f"model={folder}", "--gpu-memory-gb", "48",
              "--node-gpus", "8"])
    out = capsys.readouterr().out
    assert "PROBLEM  memory: one node of 8 GPUs of 48 GiB: does not fit" in out


def test_doctor_checks_the_unigrpo_8b_config(ray_local, tmp_path, capsys):
    from pararl.models import llada_8b_config

    folder = tmp_path / "mmada-8b"
    llada_8b_config(embedding_size=134656).save_pretrained(folder)
    rc = run([str(CONFIGS / "mmada-8b-unigrpo.yaml"), f"model={folder}", "--gpu-memory-gb", "80"])
    out = capsys.readouterr().out
    assert rc == 2  # the weights are not there
    assert "ok       config: " in out and "PROBLEM  model: weights: " in out
    assert "ok       memory: rollout worker: " in out and "ok       memory: learner rank: " in out
    rc = run([str(CONFIGS / "mmada-8b-unigrpo.yaml"), f"model={folder}", "reward.tasks.reason.clip=1.0"])
    out = capsys.readouterr().out
    assert rc == 2 and "reward.tasks.reason.clip: 'clip' scores an image against a text, and a reason trajectory has no image" in out
