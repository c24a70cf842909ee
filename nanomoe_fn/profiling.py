"""Profiler markers that cost nothing without CUDA: NVTX ranges and cudaProfilerStart/Stop regions.

Used around timed regions (the benches) so that an Nsight trace shows the stage names; on CPU-only
builds and machines without a GPU both are plain no-op context managers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on CUDA builds with a GPU; nothing on CPU-only builds."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


@contextlib.contextmanager
def cuda_profiler(enabled: bool) -> Iterator[None]:
    """cudaProfilerStart/Stop around a region when enabled and CUDA is present; else nothing."""
    if enabled and torch.cuda.is_available():
        torch.cuda.profiler.start()
        try:
            yield
        finally:
            torch.cuda.profiler.stop()
    else:
        yield
