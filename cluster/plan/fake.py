"""Fake device tensors with real host bookkeeping, and the two measurements taken on them.

Under torch's ``FakeTensorMode`` every tensor is fake: a value-dependent read (``bool(mask.any())``,
``nonzero`` choosing which replay rows to run) has no answer. Our code keeps such bookkeeping on the
host (small integer tensors: step maps, masks, token ids) and sends only model inputs to the device,
so this mode fakes exactly what lives on an accelerator, or is created for one, and runs host
operations on host tensors for real. A plan's trajectories therefore carry real step maps, and the
policy's forwards at 8B shapes cost nothing.

autograd's engine sets up a CUDA stream for a CUDA tensor's backward, which needs a real GPU: a unit
with a backward runs on fake ``cpu`` tensors instead (``TRAIN_DEVICE``), where the attention kernel
keeps the same tensors for its backward as CUDA's (output and log-sum-exp).
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
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

DEVICE = "cuda"  # where a plan's policy lives: shapes, dtypes and devices propagate as on a GPU
TRAIN_DEVICE = "cpu"  # fake too, for units with a backward (see the module docstring)


def _host(value: Any) -> bool:
    return torch.device(value).type == "cpu"


_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _cpu_flash_meta(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    b, h, n = query.shape[:3]
    return torch.empty_like(query), query.new_empty((b, h, n), dtype=torch.float32)


def _cpu_flash_backward_meta(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                             scale=None):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


# torch has no shape function for its host flash-attention kernel, so fake tensors would run the real
# kernel on zeros: these give its outputs' shapes (what it keeps for the backward: output, log-sum-exp).
_LIBRARY = torch.library.Library("aten", "IMPL")
_LIBRARY.impl("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_meta, "Meta")
_LIBRARY.impl("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_meta, "Meta")


def _flash_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


FLOP_FORMULAS = {_CPU_FLASH.overloadpacket: _flash_flops, _CPU_FLASH_BACKWARD.overloadpacket: _flash_backward_flops}


class GpuAttention(TorchFunctionMode):
    """Attention as a data-centre GPU runs it. Fake CUDA tensors have no device for torch to ask which
    kernel fits, and it falls back to the math kernel, which keeps the whole score matrix; a GPU runs
    flash attention in half precision without a mask and the memory-efficient kernel otherwise (on the
    host, torch picks its own flash kernel for fake CPU tensors already)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not isinstance(args[0], FakeTensor) or args[0].device.type != "cuda":
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if kwargs.get("enable_gqa"):
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        if mask is None and q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, q.requires_grad)[0]


class FakeInputs(torch.nn.Module):
    """``policy`` fed fake copies of its host inputs. A unit on fake host tensors (``TRAIN_DEVICE``) would
    otherwise compute positions and rotary tables for real and mix them into every layer."""

    def __init__(self, policy: torch.nn.Module, mode: HostRealMode) -> None:
        super().__init__()
        self.policy, self.mode = policy, mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        fake = lambda t: t if t is None or isinstance(t, FakeTensor) else self.mode.from_tensor(t)  # noqa: E731
        return self.policy(fake(input_ids), attention_mask=fake(attention_mask), **kwargs)


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
    A fake tensor on the host (``TRAIN_DEVICE`` units) stays fake: only real inputs stay real."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.all_fake = False  # while a module is built: its parameters are fake wherever they live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        devices = [a for a in flat if isinstance(a, torch.device)] + ([kwargs["device"]] if "device" in kwargs else [])
        real = not any(isinstance(t, FakeTensor) for t in tensors) and all(t.device.type == "cpu" for t in tensors)
        if real and not self.all_fake and all(d is None or _host(d) for d in devices):
            return func(*args, **kwargs)
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
    """A module built on fake ``device`` tensors in ``dtype`` (set as the default while it is built: a
    ``.to(dtype)`` after building does not swap an embedding's weight under fake tensors)."""
    previous, overwrite = torch.get_default_dtype(), torch.__future__.get_overwrite_module_params_on_conversion()
    torch.set_default_dtype(dtype)
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # a module's .to() cannot swap fake tensors
    mode.all_fake = True
    try:
        with mode, torch.device(device):
            return factory()
    finally:
        mode.all_fake = False
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        torch.set_default_dtype(previous)


def measure(work: Callable[[], Any], mode: HostRealMode, device: str, modules: Iterable[torch.nn.Module] = (),
            wrap: bool = True) -> Measured:
    """Run ``work`` under ``mode`` with MemTracker (``modules``' parameters counted from the start) and
    FlopCounterMode; the peak of ``device``'s memory."""
    tracker = MemTracker()
    tracker.track_external(*modules)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with ExitStack() as stack:
        stack.enter_context(mode)
        stack.enter_context(GpuAttention())
        stack.enter_context(tracker)
        stack.enter_context(counter)
        _Unit(work)() if wrap else work()
    snap = tracker.get_tracker_snapshot("peak")
    want = torch.device(device)
    peak: dict[str, float] = {}
    for dev, cats in snap.items():
        d = torch.device(dev)
        if d.type == want.type:
            peak = {getattr(k, "value", str(k)): float(v) for k, v in cats.items()}
    ops = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return Measured(peak, int(counter.get_total_flops()), ops)
