"""Tiny reward models built in code, for tests and benchmarks (no weights can be downloaded there)."""
from __future__ import annotations

from pathlib import Path

import torch

TINY_CLIP = "pararl-test-clip"


def tiny_clip(tmp_path: Path, seed: int = 0) -> dict:
    """A tiny open_clip config registered at run time, its random weights saved to a file: the
    reward-model kwargs that load it through the real open_clip path."""
    import json

    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    config_file = tmp_path / f"{TINY_CLIP}.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(str(config_file))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    weights = tmp_path / f"tiny-clip-{seed}.pt"
    torch.save(model.state_dict(), weights)
    return {"model": TINY_CLIP, "pretrained": str(weights), "config_file": str(config_file)}
