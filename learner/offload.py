"""The optimizer's state out of the way while a colocated rank samples, and back for the update.

Colocated on one GPU, the sampler needs the memory that the fp32 master weights and the Adam moments
hold (12 bytes per parameter in bf16 training, against the 2 of the weights the sampler reads), and
nothing reads them between two updates. They move to host memory (pinned, so the way back is a DMA)
and return before the next update. Each tensor is moved by swapping its ``.data``: DeepSpeed's
optimizers keep the tensor objects themselves (their fp32 partitions), so those references stay
valid. Gradient buffers stay: DeepSpeed keeps views into them that a move would cut.
"""
from __future__ import annotations

import torch


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the optimizer keeps from step to step: its moments, and the parameters it updates
    where they are not the model's own (DeepSpeed's fp32 master partitions). Scalar state (Adam's
    step count) stays where the optimizer wants it."""
    outer = engine.optimizer
    inner = getattr(outer, "optimizer", outer)
    model = {id(p) for p in engine.module.parameters()}
    seen: set[int] = set()
    out: list[torch.Tensor] = []

    def add(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and t.numel() > 1 and id(t) not in seen:
            seen.add(id(t))
            out.append(t)

    for group in inner.param_groups:
        for p in group["params"]:
            if id(p) not in model:
                add(p)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    return out


@torch.no_grad()
def move_optimizer_state(engine, device: torch.device | str, copy: bool = False) -> int:
    """Move the optimizer's tensors to ``device`` in place; returns the bytes moved. ``copy`` forces new
    storage even where the device is the same (tests check that nothing keeps the old one)."""
    device = torch.device(device)
    moved = 0
    for t in optimizer_tensors(engine):
        pin = device.type == "cpu" and t.device.type == "cuda"
        target = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin) if (pin or copy) else None
        if target is not None:
            target.copy_(t.data, non_blocking=pin)
            t.data = target
        elif t.device != device:
            t.data = t.data.to(device, non_blocking=True)
        else:
            continue
        moved += t.numel() * t.element_size()
    if moved and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies are done before the memory is used
    return moved
