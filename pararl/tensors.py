"""Tensors over numpy arrays that arrive through Ray's object store.

Such arrays are read-only views of shared memory (that is what makes them free to receive); torch
warns on every view of one. The receivers here only read them (weights are copied into the live
model, reward inputs are scored), so the view is taken without the warning; a caller that must
write makes its own copy.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch


def from_shared(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for an array that may be read-only (no copy, no warning)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
