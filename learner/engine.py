"""The DeepSpeed engine of one learner rank, built from ``LearnerConfig``.

One place turns the config into a DeepSpeed config dict, so ZeRO stage, precision, clipping and
micro-batching are never set twice. The optimizer is a plain ``torch.optim.AdamW`` handed in
(``zero_allow_untested_optimizer``): DeepSpeed's own CPU/fused Adam would compile C++/CUDA
extensions at first use, which costs a minute per machine and breaks offline installs.

Ranks join one torch.distributed group through the usual environment (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, nccl on GPU unless the config names a backend.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from learner.config import LearnerConfig
from pararl import devices
from pararl.config import ConfigError
from pararl.net import pin_interface


def resolve_device(cfg: LearnerConfig) -> str:
    """``cpu`` or ``cuda``; refuses combinations DeepSpeed would reject later with a less clear message."""
    device = devices.resolve_device(cfg.device, "learner.device").type
    if device == "cpu" and cfg.precision == "fp16":
        raise ConfigError(
            "learner.precision=fp16 is not supported on CPU (DeepSpeed's CPU accelerator refuses fp16 training); "
            "use precision=bf16 or fp32"
        )
    return device


def resolve_backend(cfg: LearnerConfig, device: str) -> str:
    backend = cfg.dist_backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise ConfigError("learner.dist_backend=nccl needs GPUs; use gloo on CPU")
    return backend


def init_distributed(rank: int, world: int, port: int, backend: str, addr: str = "127.0.0.1", local_rank: int | None = None) -> None:
    """Join the learner group (idempotent within a process: a second call must describe the same group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"this process already belongs to a group of {dist.get_world_size()} (rank {dist.get_rank()}); "
                f"cannot join one of {world} as rank {rank}"
            )
        return
    pin_interface(addr, backend)  # ranks on other nodes must reach the interface this rank binds
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank if local_rank is None else local_rank))
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def check_accelerator(device: str) -> None:
    """DeepSpeed picks its accelerator once per process (DS_ACCELERATOR); it must match the learner's device."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if name != device:
        raise ConfigError(
            f"DeepSpeed runs on its {name!r} accelerator but the learner is configured for {device!r}: "
            f"set DS_ACCELERATOR={device} before deepspeed is imported"
        )


def deepspeed_config(cfg: LearnerConfig, world: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accumulation * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: LearnerConfig, world: int, device: str):
    """A DeepSpeed engine around ``model`` (moved to ``device``) with a torch AdamW."""
    import deepspeed

    check_accelerator(torch.device(device).type)
    model = model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.zero_stage == 0:  # ZeRO 1-3 lay the parameters out in their own buffers
        from learner.weights import flatten_parameters

        flatten_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    return engine
