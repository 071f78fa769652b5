"""Byte-bounded weight buckets, contiguous runs inside them, and the weights hash.

Sending one tensor per call is what makes weight sync slow in RL systems (many small round trips);
one call per bucket of a few hundred MB is not. The hash is a sha256 over (name, per-tensor sha256
of dtype, shape, bytes) in sorted name order, so the learner and a rollout worker that loaded the
buckets compute the same value from different bucketings.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import torch

Bucket = list[tuple[str, torch.Tensor]]


def is_zero3(p: torch.Tensor) -> bool:
    """A ZeRO-3 partitioned parameter (each rank holds a slice; its full size is ``ds_numel``)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole tensor, also of a ZeRO-3 partitioned one."""
    return int(p.ds_numel) if is_zero3(p) else p.numel()


def named_weights(module: torch.nn.Module, only: Callable[[str], bool] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers under their state-dict names (tied weights once); ``only``
    keeps the names it accepts (LoRA: the adapters, the only tensors a new version changes)."""
    named = list(module.named_parameters())
    skip = {k for k, _ in named}
    persistent = set(module.state_dict(keep_vars=True).keys())
    named += [(k, b) for k, b in module.named_buffers() if k in persistent and k not in skip]
    return named if only is None else [(k, t) for k, t in named if only(k)]


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[Bucket]:
    """Consecutive groups whose bytes stay within ``bucket_bytes`` (a larger tensor travels alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    buckets, current, size = [], [], 0
    for name, p in named:
        nbytes = full_numel(p) * p.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def bucket_plan(module: torch.nn.Module, bucket_bytes: int, only: Callable[[str], bool] | None = None) -> list[list[str]]:
    """The sender's bucket boundaries, by name: the receivers follow them whatever their own dtypes."""
    module = getattr(module, "module", module)
    return [[name for name, _ in bucket] for bucket in plan_buckets(named_weights(module, only), bucket_bytes)]


def pack_flat(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Copies of ``tensors`` as views, back to back, into one new 1-D buffer."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    views, offset = [], 0
    for t in tensors:
        view = flat[offset : offset + t.numel()].view(t.shape)
        view.copy_(t.detach())
        views.append(view)
        offset += t.numel()
    return views


def contiguous_runs(bucket: Bucket) -> list[Bucket]:
    """The bucket split into runs of tensors that sit back to back in one storage (same dtype)."""
    runs: list[Bucket] = []
    for name, t in bucket:
        if runs:
            last = runs[-1][-1][1]
            if (t.is_contiguous() and last.is_contiguous() and t.dtype == last.dtype and t.device == last.device
                    and t.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()
                    and t.data_ptr() == last.data_ptr() + last.numel() * last.element_size()):
                runs[-1].append((name, t))
                continue
        runs.append([(name, t)])
    return runs


def run_span(run: Bucket) -> torch.Tensor:
    """One 1-D tensor over a run's memory (a view: no copy)."""
    first = run[0][1]
    numel = sum(t.numel() for _, t in run)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (numel,))


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of one tensor's dtype, shape and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """The weights hash from per-tensor digests, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def weights_hash(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over per-tensor digests (dtype, shape, bytes) in sorted name order: independent of bucketing
    and order, and computed tensor by tensor (streamed buckets are never held all at once)."""
    digests: dict[str, str] = {}
    for name, t in named:
        if name in digests:
            raise ValueError(f"tensor {name!r} appears twice")
        digests[name] = tensor_digest(t)
    return combine_digests(digests)
