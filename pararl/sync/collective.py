"""Weight sync by collective broadcast: learner rank 0 and every rollout worker in their own process group.

The group is built directly from a TCPStore (``ProcessGroupGloo`` / ``ProcessGroupNCCL``), never as
torch's default group: the learner ranks already have DeepSpeed's default group, and a second
``init_process_group`` in the same process would clash with it. Both sides walk the same bucket plan
(state-dict order, byte-bounded), so each bucket is one flat tensor and one broadcast call. NCCL on
GPUs; the same code runs with gloo on CPU.
"""
from __future__ import annotations

import datetime
from typing import Iterable

import torch
import torch.distributed as dist

from pararl.errors import ConfigError
from pararl.net import pin_interface
from pararl.sync.buckets import Bucket


def join_group(addr: str, port: int, rank: int, world: int, backend: str, timeout_s: float = 300) -> dist.ProcessGroup:
    timeout = datetime.timedelta(seconds=timeout_s)
    pin_interface(addr, backend)
    store = dist.PrefixStore("pararl-weight-sync", dist.TCPStore(addr, port, world, rank == 0, timeout=timeout))
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    raise ConfigError(f"weight-sync backend must be gloo or nccl, got {backend!r}")


def _broadcast(group: dist.ProcessGroup, flat: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([flat], opts).wait()


def wire_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def send(group: dist.ProcessGroup, buckets: Iterable[Bucket], backend: str, wire_dtype: torch.dtype | None = None) -> int:
    """Rank 0: one flat broadcast per bucket; returns the bytes sent."""
    sent = 0
    device = wire_device(backend)
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1).to(device, wire_dtype or t.dtype) for _, t in bucket])
        _broadcast(group, flat)
        sent += flat.numel() * flat.element_size()
    return sent


@torch.no_grad()
def receive(group: dist.ProcessGroup, live: dict[str, torch.Tensor], plan: list[list[str]], backend: str,
            wire_dtype: torch.dtype) -> int:
    """A rollout worker: receive each bucket into one flat buffer, copy its slices into the live tensors."""
    device = wire_device(backend)
    count = 0
    for names in plan:
        tensors = [live[name] for name in names]
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=wire_dtype, device=device)
        _broadcast(group, flat)
        offset = 0
        for t in tensors:
            t.data.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
            count += 1
    return count
