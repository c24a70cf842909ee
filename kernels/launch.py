"""Cheaper launches of Triton kernels: the compiled kernel kept per specialization and called directly.

`kernel[grid](...)` binds the arguments, computes Triton's specialization key and looks the compiled kernel
up on every call: about 28 us of host time per launch of a 16-argument kernel on the H200 machines' hosts,
against about 10 us for calling the compiled kernel itself (bench/gpu/host_costs.py). Eager prefill
dispatch launches several kernels per call and waits for nothing else, so that host time is its time.

`Launcher(kernel)(grid, *args, **meta)` launches like `kernel[grid](*args, **meta)`. It keeps the compiled
kernel under a key of everything Triton specializes on: per tensor its dtype and whether its address is a
multiple of 16, per int its range class (32/64-bit), whether it is 1 and whether it is a multiple of 16,
per bool/float/None its kind, the keyword values (constexprs and launch options) and the current device.
A key seen for the first time goes through Triton's own path (which compiles or finds the kernel and
launches it); later calls with that key call the compiled kernel directly on the current stream. Triton's
own path is taken every time under TRITON_INTERPRET=1 (the CPU tests), while a launch hook is set (a
profiler), or for an argument of another kind.

Dimension legend: none (host-side launch bookkeeping).
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _hooks_set() -> bool:
    """A launch enter/exit hook (a profiler such as proton) wants Triton's own path."""
    try:
        from triton import knobs
    except ImportError:  # a Triton without knobs has no such hooks to honour
        return False
    rt = knobs.runtime
    # None (older Triton) or a HookChain with no calls (newer) means none is set
    return any(h is not None and bool(getattr(h, "calls", True))
               for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def spec_key(args: tuple) -> tuple | None:
    """What Triton specializes on, per positional argument (None: an argument kind not handled here).
    An int: 8 if it is 1, else (multiple of 16) + 2 * (fits 32 bits) + 4 * (needs unsigned 64 bits)."""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append(8 if a == 1 else (a & 15 == 0) + 2 * (-0x80000000 <= a <= 0x7FFFFFFF) + 4 * (a >= 1 << 63))
        elif isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() & 15 == 0))
        elif kind is bool or kind is float or a is None:
            key.append(kind)
        else:
            return None
    return tuple(key)


class Launcher:
    """kernel[grid](*args, **meta) with the compiled kernel cached per specialization (module docstring).
    Positional arguments first, in the kernel's order; the rest of its parameters by keyword."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._direct: bool | None = None  # set at the first call
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, grid: tuple, *args: Any, **meta: Any) -> None:
        """Launch on the current CUDA stream (or run in the interpreter)."""
        if self._direct is None:  # fixed for the process: the interpreter is chosen before Triton is imported
            self._direct = not _interpreting() and torch.cuda.is_available()
        if not self._direct or _hooks_set():
            self.kernel[grid](*args, **meta)
            return
        key = spec_key(args)
        if key is None:
            self.kernel[grid](*args, **meta)
            return
        device = torch.cuda.current_device()
        key = (device, len(grid), key, tuple(meta.items()))
        k = self._compiled.get(key)
        if k is None:
            k = self.kernel[grid](*args, **meta)
            tail = [p.name for p in self.kernel.params][len(args):]  # a JITFunction's parameters
            if all(n in meta for n in tail):  # else: keep to Triton's path (defaults it fills in)
                self._compiled[key] = (k, tuple(meta[n] for n in tail))
            return
        k, tail = k
        g0, g1, g2 = (*grid, 1, 1)[:3]
        stream = torch._C._cuda_getCurrentRawStream(device)
        k.run(g0, g1, g2, stream, k.function, k.packed_metadata, None, None, None, *args, *tail)
