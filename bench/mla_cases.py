"""Shapes, tuning candidates and timers of bench/bench_mla.py (the MLA decode and prefill bench).

Dimension legend: B batch (sequences), L context, N heads, C latent (512), Dr rope (64), Dc = C + Dr (576),
Dn/Dv nope/value dims (128), G page size (64). Plain data and timing helpers; no benchmark logic here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from nanomoe_kernels.mla_decode import DecodeTuning

C, DR, DC, DN, DV, PAGE = 512, 64, 576, 128, 128, 64
# (heads, batch, context) -> (SGLang Triton MLA decode us, plain torch us): reference runs on an H200
ANCHORS = {(128, 32, 16384): (2069, 946), (128, 128, 4096): (2400, 984), (128, 64, 32768): (8673, 3729),
           (16, 32, 16384): (333, 379), (16, 128, 16384): (1255, 1415), (16, 64, 32768): (1247, 1418)}
DT = DecodeTuning
DECODE_TUNINGS = {128: [DT(128, 32, 2, 8, 2), DT(128, 32, 2, 8, 2, tma=True), DT(128, 32, 2, 8, 3),
                        DT(128, 32, 2, 8, 3, tma=True), DT(64, 64, 1, 8, 2), DT(wgmma=True),
                        DT(wgmma=True, warp_specialize=True)],
                  16: [DT(16, 32, 1, 4, 3, ctas_per_sm=2), DT(16, 32, 1, 4, 4, ctas_per_sm=2),
                       DT(16, 64, 1, 8, 2, ctas_per_sm=2), DT(16, 128, 1, 8, 2),
                       DT(64, 32, 1, 8, 2, tma=True)]}
PREFILL_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]   # first = the default
# DT(wgmma=True[, warp_specialize=True]): the Gluon stage 1 (kernels/mla_decode_wgmma*.py; sm_90 only; a tuning
# that cannot run here is reported, not timed)
SMALL_TUNINGS = {128: [DT(64, 64, 2, 4, 2, tma=True), DT(64, 32, 2, 4, 2, tma=True), DT(wgmma=True),
                       DT(wgmma=True, warp_specialize=True)],
                 16: [DT(16, 64, 1, 4, 2, ctas_per_sm=2), DT(16, 32, 2, 4, 3, ctas_per_sm=2)]}
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
# key-major stage 1 (kernels/mla_decode_keymajor.py): 32-head programs for 128 heads (a 64-head one spills);
# TMA needs num_stages >= 2 there (one stage hit illegal addresses on Triton 3.6: bench/gpu/mla_km_probe.py)
KM = dict(value_splits=1, key_major=True)
KEY_MAJOR_TUNINGS = {128: [DT(32, 64, num_warps=4, num_stages=2, tma=True, **KM),
                           DT(32, 64, num_warps=4, num_stages=2, **KM),
                           DT(64, 64, num_warps=8, num_stages=2, tma=True, **KM),
                           DT(32, 64, num_warps=8, num_stages=2, tma=True, **KM)],
                     16: [DT(16, 64, num_warps=4, num_stages=2, tma=True, **KM),
                          DT(16, 64, num_warps=4, num_stages=2, **KM),
                          DT(16, 32, num_warps=4, num_stages=3, ctas_per_sm=2, **KM),
                          DT(16, 64, num_warps=8, num_stages=2, tma=True, **KM)]}
SMALL_SPLITS = [4, 8, 16, 32, 48, 64, 96, 128, 192, 256]   # few rows want many splits
SMALL_SHAPES = [(h, b, c) for h in (128, 16) for b in (1, 4) for c in (4096, 16384)]


def bench_us(fn: Callable[[], object], rep_ms: int) -> float:
    """Median microseconds of fn: CUDA events via do_bench (L2 flushed before each call), else wall clock."""
    if torch.cuda.is_available():
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
        return ms * 1e3
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one call of fn, after one warm-up call (compiles) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_us(fn: Callable[[], object], rep_ms: int) -> float:
    """Median microseconds of one CUDA-graph replay of fn (decode is launched from graphs in serving;
    this keeps Python launch overhead out of small shapes). Plain timing off the GPU."""
    if not torch.cuda.is_available():
        return bench_us(fn, rep_ms)
    graph = capture_graph(fn)
    us = bench_us(graph.replay, rep_ms)
    del graph
    torch.cuda.empty_cache()
    return us


def us_after(fn: Callable[[], object], flush: Callable[[], object], reps: int = 200) -> float:
    """Median microseconds of fn between two CUDA events, flush() before each call (10 untimed calls first)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(10 + reps):
        flush()
        if i >= 10:
            starts[i - 10].record()
        fn()
        if i >= 10:
            ends[i - 10].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) * 1e3


def read_flush() -> Callable[[], object]:
    """A flush of the L2 that reads 256 MB (clean lines left behind), as a callable."""
    buf = torch.ones(1 << 26, dtype=torch.float32, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")
    return lambda: torch.sum(buf, dim=(0,), out=total)


def graph_us_read_flush(fn: Callable[[], object], reps: int = 200) -> float | None:
    """Median microseconds of one CUDA-graph replay of fn after the L2 was flushed by *reading* 256 MB (None off
    the GPU). do_bench (graph_us) flushes by zeroing 256 MB, which leaves the L2 full of dirty lines: a kernel
    that then reads from HBM first writes them back (~2 us at one 16k row: bench/results/mla_notes.md). After a
    read the lines are clean, as a decode step finds them after the previous layer's GEMMs read their weights."""
    if not torch.cuda.is_available():
        return None
    graph = capture_graph(fn)
    us = us_after(graph.replay, read_flush(), reps)
    del graph
    torch.cuda.empty_cache()
    return us


def in_step_us(fn: Callable[[], object], calls: int = 8, reps: int = 60) -> float | None:
    """Microseconds fn adds inside a captured decode step (None off the GPU): one CUDA graph of `calls` x (a read
    flush of the L2, fn) against one of the flushes alone, replayed in alternation; the difference of their median
    replay times over `calls`. A decode step replays one graph for all its layers, so no call here pays a graph
    launch of its own (graph_us's replay does: ~4.7 us for one kernel, ~5.9 for two, mla_notes.md)."""
    if not torch.cuda.is_available():
        return None
    flush = read_flush()

    def flushes() -> None:
        for _ in range(calls):
            flush()

    def step() -> None:
        for _ in range(calls):
            flush()
            fn()

    graphs = (capture_graph(flushes), capture_graph(step))
    times: tuple[list, list] = ([], [])
    for i in range(5 + reps):
        for g, t in zip(graphs, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            if i >= 5:
                t.append((start, end))
    torch.cuda.synchronize()
    base, both = (statistics.median(a.elapsed_time(b) for a, b in t) * 1e3 for t in times)
    del graphs
    torch.cuda.empty_cache()
    return (both - base) / calls


def ceilings(dev: str, rep_ms: int) -> dict:
    """Copy bandwidth (bytes read + written) and dense bf16 matmul rate, measured now on random data."""
    n, m = (1 << 30, 8192) if dev == "cuda" else (1 << 24, 1024)
    src = torch.randn(n // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = bench_us(lambda: dst.copy_(src), rep_ms)
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    t_mm = bench_us(lambda: a @ b, rep_ms)
    return {"hbm_gbps": round(2 * n / t_copy / 1e3, 1), "bf16_tflops": round(2 * m ** 3 / t_mm / 1e6, 1)}
