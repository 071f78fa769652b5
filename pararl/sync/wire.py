"""What a weight bucket is on the object store: runs of tensors, each one flat numpy array.

Numpy arrays travel through Ray's object store without copies and are read from shared memory by
every worker on a node; a run of tensors that sat back to back in the learner's memory becomes one
array (one copy into the store) plus the names and shapes that cut it back up. bf16, which numpy
lacks, travels as its int16 bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pararl.errors import PararlError
from pararl.sync.buckets import Bucket, contiguous_runs, run_span
from pararl.tensors import from_shared


class SyncError(PararlError):
    """A weight sync that did not deliver exactly the policy's tensors."""


@dataclass(frozen=True)
class TensorRun:
    """Several named tensors of one dtype as one flat array."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    data: np.ndarray  # 1-D; bf16 as int16 bits
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"

    @classmethod
    def pack(cls, run: Bucket) -> "TensorRun":
        """A run of back-to-back tensors (``contiguous_runs``) without copying it on the CPU."""
        span = run_span(run).detach().to("cpu")
        dtype = str(span.dtype).removeprefix("torch.")
        data = span.view(torch.int16).numpy() if span.dtype == torch.bfloat16 else span.numpy()
        return cls(tuple(n for n, _ in run), tuple(tuple(t.shape) for _, t in run), data, dtype)

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The named tensors, as views of the one array; refuses an array of the wrong length."""
        flat = from_shared(np.asarray(self.data))
        if self.dtype == "bfloat16":
            flat = flat.view(torch.bfloat16)
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.shapes]
        if sum(sizes) != flat.numel():
            raise SyncError(f"weight sync run of {flat.numel()} elements for tensors of {sum(sizes)}, e.g. {self.names[0]!r}")
        out, offset = [], 0
        for name, shape, numel in zip(self.names, self.shapes, sizes):
            out.append((name, flat[offset : offset + numel].view(shape)))
            offset += numel
        return out


def encode_bucket(bucket: Bucket) -> list[TensorRun]:
    """A bucket as the runs it is made of: one array per run of contiguous tensors."""
    return [TensorRun.pack(run) for run in contiguous_runs(bucket)]


def decode_bucket(runs: Sequence[TensorRun]) -> list[tuple[str, torch.Tensor]]:
    return [pair for run in runs for pair in run.tensors()]
