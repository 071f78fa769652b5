"""Load a policy from a local checkpoint folder (config.json + safetensors, sharded or not), strictly.

transformers' ``from_pretrained`` fills missing weights with random values and only warns; for RL
that silently trains a broken policy, so every missing, unexpected or misshapen tensor is an error
that names it. The model is built on the meta device and the tensors are assigned, so an 8B
checkpoint costs no random initialisation and no second copy in memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pararl.errors import CheckpointError
from pararl.models.config import SUPPORTED_MODEL_TYPES, LLaDAConfig
from pararl.models.llada import LLaDAModelLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_config(path: str | Path) -> LLaDAConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model folder")
    try:
        fields = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    model_type = fields.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return LLaDAConfig(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from err


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_state_dict(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor if dtype is None else tensor.to(dtype)
        except Exception as err:  # safetensors raises its own types for truncated or foreign files
            raise CheckpointError(f"cannot read {file}: {err}") from err
    return state


def check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if wrong:
        problems.append(
            "wrong shapes: "
            + ", ".join(f"{k} {tuple(state[k].shape)} (config wants {tuple(expected[k])})" for k in wrong)
        )
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match its config.json: " + "; ".join(problems))


def load_policy(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LLaDAModelLM:
    """The policy in ``path``, in eval mode; ``dtype=None`` keeps the dtype the tensors were saved in."""
    path = Path(path)
    config = read_config(path)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    state = read_state_dict(path, dtype)
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def build_policy(config: LLaDAConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LLaDAModelLM:
    """A freshly initialised policy (tests, the generated world's warm-up), deterministic from ``seed``."""
    torch.manual_seed(seed)
    return LLaDAModelLM(config).to(dtype).eval()
