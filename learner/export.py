"""Turn a learner checkpoint into a model folder that ``pararl.models.load_policy`` (and LLaDA code) loads.

The weights come from DeepSpeed's fp32 master copy under ZeRO 1-3 (through DeepSpeed's own
``zero_to_fp32`` reader), and from the saved module under ZeRO-0 (``zero_to_fp32`` cannot read
the bf16 optimizer's files: a bf16 run without ZeRO exports its bf16 weights, cast up); a LoRA
run's adapters are merged into the base (``pararl.lora``). Keys keep LLaDA's names, tensors are
written as sharded safetensors next to ``config.json``. Files that make the source folder a full
model bundle (tokenizer, ``pararl.json``, the image tokenizer's folder such as -A's ``vqvae/``)
are copied along when the source folder still exists. The folder is written under a temporary
name and renamed when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from learner.checkpoint import DS_TAG, resolve_checkpoint, verify
from pararl.errors import ConfigError
from pararl.files import atomic_folder
from pararl.lora import AdapterConfig, merge_adapters
from pararl.models import LLaDAConfig, LLaDAModelLM
from pararl.models.loading import check_keys

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Full-precision weights of a (verified) checkpoint, whatever the ZeRO stage and world size."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    ds_dir = checkpoint / DS_TAG
    if meta["zero_stage"] == 0:  # no ZeRO partitions: the saved module (bf16 training: its bf16 weights)
        states = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)


def export_policy(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                  max_shard_size: str | int = "2GB") -> Path:
    """Write the policy of ``checkpoint_dir`` (a checkpoint, or a run folder: its ``latest``) to ``out_dir``."""
    checkpoint = resolve_checkpoint(checkpoint_dir)
    verify(checkpoint)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export target {out} exists and is not empty; choose a new folder")
    config = LLaDAConfig.from_json_file(str(checkpoint / "policy_config.json"))
    state = checkpoint_state_dict(checkpoint)
    adapters = json.loads((checkpoint / "meta.json").read_text()).get("adapters")
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    if adapters:  # a LoRA run: its adapters merged into the base, under the policy's own names
        model = merge_adapters(model, AdapterConfig(**adapters), state)
        state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = LLaDAModelLM(config)
    check_keys(model, state, checkpoint)
    model.load_state_dict(state, strict=True, assign=True)

    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        source = json.loads((checkpoint / "meta.json").read_text()).get("source")
        if source and Path(source).is_dir():
            for f in Path(source).iterdir():
                if f.is_dir() and not f.name.startswith("."):  # the image tokenizer's folder (-A: vqvae/)
                    shutil.copytree(f, tmp / f.name)
                elif f.is_file() and f.name not in WEIGHT_FILES and not f.name.endswith(".safetensors"):
                    shutil.copy2(f, tmp / f.name)
    return out

