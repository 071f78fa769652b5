"""The learner's side of weight sync: its (possibly partitioned) weights as buckets, and their hash.

The bucket and hash definitions are the core's (``pararl.sync.buckets``), shared with the rollout
workers. Under ZeRO-3 each rank holds a slice of every
parameter, so a bucket's parameters are gathered together (``deepspeed.zero.GatheredParameters``:
one collective per bucket, not per tensor) and copied to CPU; every rank must iterate the buckets
in lockstep, and only the driver-facing rank needs to keep them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from pararl.sync.buckets import Bucket, is_zero3, named_weights, pack_flat, plan_buckets, weights_hash

__all__ = ["flatten_parameters", "iter_weight_buckets", "policy_hash", "weights_hash"]


def iter_weight_buckets(module: torch.nn.Module, bucket_bytes: int = 256 << 20, dtype: torch.dtype | None = None,
                        only: Callable[[str], bool] | None = None) -> Iterator[Bucket]:
    """Yield lists of (name, full tensor on CPU); collective under ZeRO-3 (all ranks iterate together).
    ``only``: the names to send (LoRA: the adapters)."""
    module = getattr(module, "module", module)  # a DeepSpeed engine: its wrapped model
    for bucket in plan_buckets(named_weights(module, only), bucket_bytes):
        params = [p for _, p in bucket if is_zero3(p)]
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
                yield [(name, p.detach().to("cpu", dtype=dtype or p.dtype, copy=is_zero3(p))) for name, p in bucket]


def _copy_out(bucket: Bucket, dtype: torch.dtype) -> Bucket:
    return list(zip([name for name, _ in bucket], pack_flat([p for _, p in bucket], dtype, torch.device("cpu"))))


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


def policy_hash(module: torch.nn.Module, bucket_bytes: int = 256 << 20) -> str:
    """The hash of a (possibly ZeRO-3 partitioned) policy; collective like ``iter_weight_buckets``."""
    return weights_hash(pair for bucket in iter_weight_buckets(module, bucket_bytes) for pair in bucket)
