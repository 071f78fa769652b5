"""The tiny ParaRL run the cluster tests share: a model folder, prompts, a tiny CLIP reward with stats."""
import json
from pathlib import Path

import torch
import yaml

from pararl.bundle import load_codecs
from pararl.tiny import tiny_bundle
from reward.base import build_reward_model
from reward.stats import compute_stats, save_stats
from reward.testing import tiny_clip

PROMPTS = ["add a red square top left", "make the circle blue", "a green triangle", "there is a yellow circle",
           "add a blue square bottom right", "make the square red"]


def tiny_run(tmp: Path) -> dict:
    """A tiny model folder, a prompt dataset, a tiny open_clip reward with its stats, and a run config."""
    folder, bundle = tiny_bundle(tmp)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    clip = tiny_clip(tmp)
    codecs = load_codecs(folder)
    gen = torch.Generator().manual_seed(0)
    images = codecs.image_tokenizer.decode(torch.randint(0, 8, (16, 16), generator=gen))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    stats = compute_stats(build_reward_model("open_clip", clip), [(images, texts)])
    save_stats(tmp / "reward_stats.json", {"clip": stats})
    config = {
        "name": "tiny", "run_dir": str(tmp / "run"), "model": str(folder), "seed": 1,
        "data": {"train": str(tmp / "train.jsonl"), "prompts_per_step": 2, "group_size": 2},
        "sampler": {"steps": 4, "text_len": 8},
        "reward": {"models": {"clip": {"name": "open_clip", "kwargs": clip}}, "stats_file": str(tmp / "reward_stats.json"),
                   "sampled_steps": 2, "replicas": 1, "cpus_per_replica": 0.25},
        "learner": {"lr": 1e-3, "micro_batch_size": 2, "updates_per_batch": 2, "beta": 0.01, "zero_stage": 0},
        "cluster": {"rollout_workers": 2, "rollout_cpus": 0.25, "learner_cpus": 0.25, "placement_timeout_s": 20,
                    "call_timeout_s": 120},
        "tracking": {"snapshot_every": 2, "snapshot_trajectories": 2},
        "train": {"steps": 3, "checkpoint_every": 2},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"tmp": tmp, "config": path, "folder": folder, "raw": config}
