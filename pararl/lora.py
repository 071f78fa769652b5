"""LoRA adapters on the policy (peft), the contract the learner, the rollout workers and export share.

With adapters only their low-rank factors train: the optimizer state and the gradients shrink to
theirs, a new policy version is the adapters alone (megabytes, not the 16 GB of an 8B policy), and
the reference policy is the same model with its adapters switched off, so no second copy of the
weights is held. Every side injects the same adapters into the same model, so the tensors keep the
same names everywhere: ``...q_proj.base_layer.weight`` for the frozen base, ``...q_proj.lora_A.default.weight``
and ``lora_B`` for the adapter. The targets are the linear maps inside the transformer blocks; the
output head is read as a weight by the span heads (``pararl.heads``), never called as a module,
so an adapter there would never be used.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from pararl.errors import ConfigError

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
ADAPTER = "default"  # peft's adapter name: one adapter per policy


@dataclass
class AdapterConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))  # linear maps of each block


def check_adapter_config(cfg: AdapterConfig, key: str = "learner.lora") -> None:
    if not cfg.enabled:
        return
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise ConfigError(f"{key}: rank={cfg.rank}, alpha={cfg.alpha}, dropout={cfg.dropout}: need rank >= 1, "
                          "alpha > 0 and 0 <= dropout < 1")
    unknown = sorted(set(cfg.targets) - set(BLOCK_LINEARS))
    if unknown or not cfg.targets:
        raise ConfigError(f"{key}.targets={list(cfg.targets)}: each must be one of the blocks' linear maps "
                          f"{', '.join(BLOCK_LINEARS)}")


def adapter_spec(cfg: AdapterConfig) -> dict:
    """What a checkpoint records, so that export can merge the adapters it holds."""
    return {k: (list(v) if k == "targets" else v) for k, v in asdict(cfg).items()}


def _peft_config(cfg: AdapterConfig):
    from peft import LoraConfig

    pattern = r".*\.blocks\.\d+\.(" + "|".join(cfg.targets) + ")"
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern, bias="none")


def add_adapters(model: torch.nn.Module, cfg: AdapterConfig):
    """Inject the adapters into ``model`` in place (the base frozen, the adapters trainable; B starts at
    zero, so the policy is unchanged until it trains). Returns peft's tuner, which export uses to merge."""
    from peft.tuners.lora import LoraModel

    return LoraModel(model, _peft_config(cfg), ADAPTER)


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def has_adapters(model: torch.nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def _tuner_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The base model, inside the block: the reference policy of a LoRA run."""
    layers = _tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merge_adapters(model: torch.nn.Module, cfg: AdapterConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` (the plain policy) with the adapters of ``state`` (a LoRA run's weights) merged into its
    linear maps: a policy under the original names, loadable like any other."""
    tuner = add_adapters(model, cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return tuner.merge_and_unload()
