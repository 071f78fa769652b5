"""The policy's weights in byte-bounded buckets for weight sync, and a hash to check a sync arrived whole.

Sending one tensor per call is what makes weight sync slow in RL systems (many small round trips);
one call per bucket of a few hundred MB is not. Under ZeRO-3 each rank holds a slice of every
parameter, so a bucket's parameters are gathered together (``deepspeed.zero.GatheredParameters``:
one collective per bucket, not per tensor) and copied to CPU; every rank must iterate the buckets
in lockstep, and only the driver-facing rank needs to keep them.

The hash is a sha256 over (name, per-tensor sha256 of dtype, shape, bytes) in sorted name order, so the learner and a
rollout worker that loaded the buckets compute the same value from different bucketings.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterable, Iterator

import torch

Bucket = list[tuple[str, torch.Tensor]]


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if _is_zero3(p) else p.numel()


def named_weights(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers under their state-dict names (tied weights once)."""
    named = list(module.named_parameters())
    skip = {k for k, _ in named}
    persistent = set(module.state_dict(keep_vars=True).keys())
    named += [(k, b) for k, b in module.named_buffers() if k in persistent and k not in skip]
    return named


def plan_buckets(named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups whose bytes stay within ``bucket_bytes`` (a larger tensor travels alone)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    buckets, current, size = [], [], 0
    for name, p in named:
        nbytes = _numel(p) * p.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def iter_weight_buckets(module: torch.nn.Module, bucket_bytes: int = 256 << 20,
                        dtype: torch.dtype | None = None) -> Iterator[Bucket]:
    """Yield lists of (name, full tensor on CPU); collective under ZeRO-3 (all ranks iterate together)."""
    module = getattr(module, "module", module)  # a DeepSpeed engine: its wrapped model
    for bucket in plan_buckets(named_weights(module), bucket_bytes):
        params = [p for _, p in bucket if _is_zero3(p)]
        if params:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            gather = contextlib.nullcontext()
        with gather, torch.no_grad():
            # Gathered (ZeRO-3) tensors are released after this block, so they are copied out, into
            # one buffer per bucket (the sync then moves it as one run); a plain CPU parameter is
            # handed out as is (a consumer that keeps it must copy it itself).
            if params and len(params) == len(bucket) and len({dtype or p.dtype for p in params}) == 1:
                yield _copy_out(bucket, dtype or params[0].dtype)
            else:
                yield [(name, p.detach().to("cpu", dtype=dtype or p.dtype, copy=_is_zero3(p))) for name, p in bucket]


def _copy_out(bucket: Bucket, dtype: torch.dtype) -> Bucket:
    return list(zip([name for name, _ in bucket], pack_flat([p for _, p in bucket], dtype, torch.device("cpu"))))


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


def flatten_parameters(module: torch.nn.Module) -> int:
    """Lay the module's parameters out back to back in one storage per run of equal dtype and device.

    A sync bucket is then a few contiguous spans, not a hundred tensors: Ray's put copies every
    out-of-band buffer with its own thread team, and per tensor that doubled the put of a 256 MiB
    bucket (22 ms against 11 ms for one buffer, ``bench/sync.py``). Values are unchanged. Call it
    before an optimizer holds the parameters' old storage. Returns the number of flat buffers.
    """
    params = [p for _, p in module.named_parameters()]  # tied weights once, in state-dict order
    runs: list[list[torch.nn.Parameter]] = []
    for p in params:
        if runs and (runs[-1][-1].dtype, runs[-1][-1].device) == (p.dtype, p.device):
            runs[-1].append(p)
        else:
            runs.append([p])
    with torch.no_grad():
        for run in runs:
            for p, view in zip(run, pack_flat(run, run[0].dtype, run[0].device)):
                p.data = view
    return len(runs)


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


def policy_hash(module: torch.nn.Module, bucket_bytes: int = 256 << 20) -> str:
    """The hash of a (possibly ZeRO-3 partitioned) policy; collective like ``iter_weight_buckets``."""
    return weights_hash(pair for bucket in iter_weight_buckets(module, bucket_bytes) for pair in bucket)
