"""Fake device tensors with real host bookkeeping, and the two measurements taken on them.

Under torch's ``FakeTensorMode`` every tensor is fake: a value-dependent read (``bool(mask.any())``,
``nonzero`` choosing which replay rows to run) has no answer. Our code keeps such bookkeeping on the
host (small integer tensors: step maps, masks, token ids) and sends only model inputs to the device,
so this mode fakes exactly what lives on an accelerator, or is created for one, and runs host
operations on host tensors for real. A plan's trajectories therefore carry real step maps, and the
policy's forwards at 8B shapes cost nothing.

autograd's engine sets up a CUDA stream for a CUDA tensor's backward, which needs a real GPU: a unit
with a backward runs on ``meta`` tensors instead (``TRAIN_DEVICE``), outside the fake mode. The learner's
micro-batch reads nothing back from the policy's outputs, so its host bookkeeping runs for real there too,
and meta tensors cost no Python per operation (a fake mode's dispatch made the 8B backward take minutes).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import FlopCounterMode

DEVICE = "cuda"  # where a plan's policy lives: shapes, dtypes and devices propagate as on a GPU
TRAIN_DEVICE = "meta"  # units with a backward (see the module docstring)


def _host(value: Any) -> bool:
    return torch.device(value).type == "cpu"


def gpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
    """Attention as a data-centre GPU runs it: flash attention in half precision without a mask, the
    memory-efficient kernel otherwise. Without a real device torch cannot ask which kernel fits and
    falls back to the math kernel, which keeps the whole score matrix."""
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    if mask is None and q.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).expand(
        q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad, dropout_p, is_causal,
                                                                  scale=scale)[0]


class GpuAttention(TorchFunctionMode):
    """``gpu_attention`` for fake CUDA tensors (the rollout's units)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not isinstance(args[0], FakeTensor) or args[0].device.type != "cuda":
            return func(*args, **kwargs)
        mask = args[3] if len(args) > 3 else kwargs.pop("attn_mask", None)
        return gpu_attention(*args[:3], mask, *args[4:], **kwargs)


_ON_META = [False]


def _meta_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if _ON_META[0]:
        return gpu_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                                              enable_gqa=enable_gqa)[0]


# On meta tensors (the units with a backward), the kernel is chosen where autograd dispatches, so that
# gradient checkpointing's recompute inside the backward chooses it too; ``measure`` switches it on.
_LIBRARY = torch.library.Library("aten", "IMPL")
_LIBRARY.impl("scaled_dot_product_attention", _meta_attention, "AutogradMeta")


def _meta_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A value check (the learner's: the behaviour and current log-probs score the same tokens) has no
    answer on meta tensors; a plan's masks all come from one plan, so the answer is its shapes'."""
    if not _ON_META[0]:
        raise NotImplementedError("aten::equal has no meta kernel: meta tensors carry no values")
    return a.shape == b.shape and a.dtype == b.dtype


_LIBRARY.impl("equal", _meta_equal, "Meta")


class _Unit(torch.nn.Module):
    """One measured unit as a module call: MemTracker refuses a module called twice at its top level
    (-A's sampling step calls the policy twice), and accepts it inside a parent."""

    def __init__(self, work: Callable[[], Any]) -> None:
        super().__init__()
        self.work = work

    def forward(self) -> Any:
        return self.work()


class HostRealMode(FakeTensorMode):
    """``FakeTensorMode`` in which an operation on host tensors that makes host tensors runs for real.
    A fake tensor moved to the host stays fake: only real inputs stay real."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.all_fake = False  # while a module is built: its parameters are fake wherever they live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        devices = [a for a in flat if isinstance(a, torch.device)] + ([kwargs["device"]] if "device" in kwargs else [])
        real = not any(isinstance(t, FakeTensor) for t in tensors) and all(t.device.type == "cpu" for t in tensors)
        to_host = all(d is None or _host(d) for d in devices)
        if real and not self.all_fake and to_host:
            return func(*args, **kwargs)
        if real and tensors:  # a host tensor sent to the device: fake it first, or torch would run the copy for real
            args, kwargs = tree_map_only(torch.Tensor, self.from_tensor, (args, kwargs))
        return super().__torch_dispatch__(func, types, args, kwargs)


@dataclass
class Measured:
    """One unit of work on fake tensors: peak live bytes on its device (by MemTracker's category) and FLOPs."""

    peak: dict[str, float]  # category -> bytes at the peak, and "Total"
    flops: int
    by_operator: dict[str, int]

    @property
    def total(self) -> float:
        return self.peak.get("Total", 0.0)


def build_fake(factory: Callable[[], torch.nn.Module], mode: HostRealMode, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A module built on fake ``device`` tensors (plain meta ones for ``TRAIN_DEVICE``) in ``dtype`` (set
    as the default while it is built: a ``.to(dtype)`` after building does not swap an embedding's
    weight under fake tensors)."""
    previous, overwrite = torch.get_default_dtype(), torch.__future__.get_overwrite_module_params_on_conversion()
    torch.set_default_dtype(dtype)
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # a module's .to() cannot swap fake tensors
    mode.all_fake = True
    try:
        with ExitStack() as stack:
            if device != TRAIN_DEVICE:
                stack.enter_context(mode)
            stack.enter_context(torch.device(device))
            return factory()
    finally:
        mode.all_fake = False
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.set_default_dtype(previous)


def measure(work: Callable[[], Any], mode: HostRealMode, device: str, modules: Iterable[torch.nn.Module] = (),
            wrap: bool = True, memory: bool = True, flops: bool = True) -> Measured:
    """Run ``work`` under ``mode`` (on meta tensors for ``TRAIN_DEVICE``): once under MemTracker
    (``modules``' parameters counted from the start) for the peak of ``device``'s memory, once under
    FlopCounterMode. Apart: the counter's backward hooks keep a module's outputs alive, which raised a
    checkpointed step's peak by a fifth."""
    peak: dict[str, float] = {}
    if memory:
        tracker = MemTracker()
        tracker.track_external(*modules)
        _run(work, mode, device, tracker, wrap)
        want = torch.device(device)
        for dev, cats in tracker.get_tracker_snapshot("peak").items():
            if torch.device(dev).type == want.type:
                peak = {getattr(k, "value", str(k)): float(v) for k, v in cats.items()}
    if not flops:
        return Measured(peak, 0, {})
    counter = FlopCounterMode(display=False)
    _run(work, mode, device, counter, wrap)
    ops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return Measured(peak, int(counter.get_total_flops()), ops)


def _run(work: Callable[[], Any], mode: HostRealMode, device: str, tool: Any, wrap: bool) -> None:
    on_meta = device == TRAIN_DEVICE
    with ExitStack() as stack:
        if not on_meta:
            stack.enter_context(mode)
            stack.enter_context(GpuAttention())
        stack.enter_context(tool)
        _ON_META[0] = on_meta
        stack.callback(_ON_META.__setitem__, 0, False)
        _Unit(work)() if wrap else work()
