"""Shared pieces of the benches: seed-compatible flags, timing, ceilings, floors and the JSON record.

Every bench's --json writes one record, the schema write_record below describes: {"bench", "command", "date",
"device", "world_size", "versions", "ceilings": {"hbm_gbps", "bf16_tflops", ...}, "rows": [...]}, a row being
{"case": {...}, "variant": ..., measurements}. Ceilings are measured in the same run: a large device copy (bytes
read + written) and a large matmul in the bench's dtype (bfloat16 on GPUs; on the CPU the bench dtype's rate is
stored under the same key, and `ceilings.matmul_dtype` says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from nanomoe_fn.cli_util import UsageError
from nanomoe_fn.comm.launch import free_port, spawn_ranks  # noqa: F401  (re-exported for the benches)

# mode names (the seed's two first, then the faster backends), and the expert backend each stands for
MODES = {"loop": "loop", "batched_gemm": "bmm", "triton": "triton", "fused_moe": "triton", "deepgemm": "deepgemm"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    """The seed benchmark's flags and defaults, plus --tokens-per-expert, --device, --cuda-profiler,
    --expert-type, --intermediate-dim, --dtype and --json; --max-num-tokens is checked against
    --batch-size and sizes the fixed-capacity comm of the multi-rank bench."""
    parser.add_argument("--batch-size", type=int, default=128, help="tokens per rank")
    parser.add_argument("--hidden-dim", type=int, default=2048)
    parser.add_argument("--num-experts", type=int, default=256)
    parser.add_argument("--experts-per-token", type=int, default=8)
    parser.add_argument("--max-num-tokens", type=int, default=None,
                        help="largest batch the run must accept (default: --batch-size); checked")
    parser.add_argument("--tokens-per-expert", type=int, default=None,
                        help="fixed expert capacity: experts run on the masked [E, cap, H] layout; "
                             "an expert receiving more rows is an error, never a drop")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--mode", default="both", choices=[*MODES, "both", "all"],
                        help="both = loop + batched_gemm (the seed's); all = every backend that can run here")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--cuda-profiler", action="store_true",
                        help="wrap the timed loop in cudaProfilerStart/Stop (no-op without CUDA)")
    parser.add_argument("--expert-type", default="linear", choices=["linear", "swiglu"],
                        help="linear = the seed's Linear(H, H) experts; swiglu = DeepSeek-V3 experts")
    parser.add_argument("--intermediate-dim", type=int, default=None, help="SwiGLU width (default: hidden)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto = float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--json", default=None, help="write the results to this path as one JSON record "
                        "(its fields: bench/common.py, write_record)")


def check_seed_flags(args: argparse.Namespace) -> None:
    """Clear errors (UsageError, one line) for flag values that cannot run."""
    for name in ("batch_size", "hidden_dim", "num_experts", "experts_per_token", "iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("intermediate_dim", "max_num_tokens", "tokens_per_expert"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 when given, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_num_tokens is not None and args.batch_size > args.max_num_tokens:
        raise UsageError(f"--batch-size ({args.batch_size}) exceeds --max-num-tokens ({args.max_num_tokens})")
    if args.experts_per_token > args.num_experts:
        raise UsageError(f"--experts-per-token ({args.experts_per_token}) must be <= --num-experts "
                         f"({args.num_experts})")


def pick_modes(mode: str, cfg: object, device: torch.device) -> list[str]:
    """The modes to run: `both` = the seed's two, `all` = every distinct backend that supports cfg here
    (the others are listed with the reason they cannot run); a single mode must be able to run."""
    from nanomoe_fn import EXPERT_BACKENDS

    if mode == "both":
        return ["loop", "batched_gemm"]
    if mode != "all":
        ok, why = EXPERT_BACKENDS[MODES[mode]].supports(cfg, device)
        if not ok:
            raise SystemExit(f"--mode {mode}: backend {MODES[mode]!r} cannot run here: {why}")
        return [mode]
    modes = []
    for m, backend in MODES.items():
        ok, why = EXPERT_BACKENDS[backend].supports(cfg, device)
        if ok and backend not in [MODES[x] for x in modes]:
            modes.append(m)
        elif not ok and m != "fused_moe":
            print(f"skipping mode {m}: {why}")
    return modes


def pick_device(name: str | None) -> torch.device:
    """The requested device (cpu or cuda[:i], checked: UsageError naming --device), or cuda when
    available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda[:i], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but this torch build sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto -> float32 on CPU, bfloat16 on accelerators."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
            barrier: Callable[[], None] | None = None) -> list[float]:
    """Per-iteration wall times in seconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if barrier is not None:
            barrier()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_events(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
                barrier: Callable[[], None] | None = None) -> list[float]:
    """Per-iteration times in seconds: CUDA events around each call on GPUs (the host work of a call
    that keeps the device idle is inside the span), wall time on the CPU; an optional barrier (after
    a device sync) before each iteration so every rank starts together."""
    return [t[0] for t in time_pair(fn, None, device, warmup, iters, barrier)]


def _warm(first: Callable[[], object], middle: Callable[[], object] | None, second: Callable[[], object] | None,
          warmup: int) -> None:
    """warmup untimed rounds of first, middle, second (the last two when given)."""
    for _ in range(warmup):
        first()
        if middle is not None:
            middle()
        if second is not None:
            second()


class HostBarrier:
    """dist.barrier, then the ranks' hosts released together: each rank writes its round number into its slot
    of a file in shared memory (/dev/shm) and spins until every slot has it, so ranks leave within about one
    poll of each other (microseconds). dist.barrier alone (a collective plus a device sync on NCCL) lets the
    hosts of our GPU machines leave 100-200 us apart, and a per-call timing would count that skew as comm
    time. One host only (every bench here spawns its ranks on one host); key: a value all ranks share (the
    rendezvous port)."""

    def __init__(self, rank: int, world_size: int, key: str, device: torch.device, timeout_s: float = 120.0) -> None:
        import numpy as np
        import torch.distributed as dist

        root = "/dev/shm" if os.path.isdir("/dev/shm") else os.path.join(os.path.sep, "tmp")
        self.path = os.path.join(root, f"nanomoe_barrier_{key}_{world_size}")
        if rank == 0:
            np.zeros(world_size, dtype=np.int64).tofile(self.path)
        dist.barrier()
        self.slots = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(world_size,))
        self.rank, self.round, self.device, self.timeout_s = rank, 0, device, timeout_s
        self._dist = dist

    def __call__(self) -> None:
        """Wait for every rank (dist.barrier and a device sync), then leave together."""
        self._dist.barrier()
        sync(self.device)
        self.round += 1
        self.slots[self.rank] = self.round
        deadline = time.monotonic() + self.timeout_s
        while int(self.slots.min()) < self.round:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: HostBarrier round {self.round} timed out after "
                                   f"{self.timeout_s:g}s (slots {self.slots.tolist()})")

    def close(self) -> None:
        """Drop the shared file (rank 0, after every rank is done with it)."""
        self._dist.barrier()
        if self.rank == 0 and os.path.exists(self.path):
            os.remove(self.path)


def time_back_to_back(first: Callable[[], object], second: Callable[[], object] | None, device: torch.device,
                      warmup: int, iters: int, barrier: Callable[[], None] | None = None,
                      middle: Callable[[], object] | None = None) -> list[tuple[float, float]]:
    """Like time_pair, but the iterations run back to back with no sync or barrier between them (one
    barrier before): the steady state of a layer loop, where every rank runs in lockstep, so the start-up
    skew between ranks that a per-iteration barrier leaves in each sample is not counted. CUDA events
    around first and second (middle runs between them, untimed; without middle, second's span runs to
    the next iteration's start, two events per iteration as CUDA-graph replays need: host calls between
    replays would show as GPU idle time); host time that leaves the GPU idle counts. GPUs only."""
    _warm(first, middle, second, warmup)
    sync(device)
    if barrier is not None:
        barrier()
        sync(device)
    if middle is None:  # two events per iteration: fewer host calls between replays (graphs are host-light)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * iters + 1)]
        for i in range(iters):
            ev[2 * i].record()
            first()
            ev[2 * i + 1].record()
            if second is not None:
                second()
        ev[-1].record()
        ev[-1].synchronize()
        return [(ev[2 * i].elapsed_time(ev[2 * i + 1]) * 1e-3, ev[2 * i + 1].elapsed_time(ev[2 * i + 2]) * 1e-3)
                for i in range(iters)]
    ev4 = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(iters)]
    for e in ev4:
        e[0].record()
        first()
        e[1].record()
        middle()
        e[2].record()
        if second is not None:
            second()
        e[3].record()
    ev4[-1][3].synchronize()
    return [(e[0].elapsed_time(e[1]) * 1e-3, e[2].elapsed_time(e[3]) * 1e-3) for e in ev4]


def time_pair(first: Callable[[], object], second: Callable[[], object] | None, device: torch.device,
              warmup: int, iters: int, barrier: Callable[[], None] | None = None,
              middle: Callable[[], object] | None = None) -> list[tuple[float, float]]:
    """Per iteration (seconds of first(), seconds of second()) with the two called back to back, as a
    layer calls dispatch then combine; second may be None (0.0 is returned for it). middle, when given,
    runs between them untimed (the experts' place). CUDA events on GPUs, wall time on the CPU."""
    _warm(first, middle, second, warmup)
    sync(device)
    cuda = device.type == "cuda"
    out = []
    for _ in range(iters):
        sync(device)
        if barrier is not None:
            barrier()
            sync(device)  # the barrier is a collective on NCCL: done before the clock starts
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            first()
            ev[1].record()
            if middle is not None:
                middle()
            ev[2].record()
            if second is not None:
                second()
            ev[3].record()
            ev[3].synchronize()
            out.append((ev[0].elapsed_time(ev[1]) * 1e-3, ev[2].elapsed_time(ev[3]) * 1e-3))
        else:
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            if middle is not None:
                middle()
            t2 = time.perf_counter()
            if second is not None:
                second()
            out.append((t1 - t0, time.perf_counter() - t2))
    return out


def capture_graph(fn: Callable[[], object], warmup: int = 2,
                  warm_fn: Callable[[], object] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm up on a side stream (warm_fn, default fn, `warmup` times), then capture one call of fn in a
    CUDA graph; returns (graph, the captured call's static outputs). Other threads (a process group's
    watchdog) may keep making CUDA calls during the capture (capture_error_mode="thread_local")."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            (warm_fn or fn)()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def slowest(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over the ranks of the default process group (a collective)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_ranks_ok(ok: bool, device: torch.device) -> bool:
    """True when every rank of the default process group passes ok=True (a collective)."""
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def ranks_errors(msg: str) -> str:
    """Every rank's error message (empty ones left out), joined: call where all ranks learned of a failure."""
    import torch.distributed as dist

    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, msg)
    return " | ".join(dict.fromkeys(m for m in msgs if m))  # the same reason once


def release_comm(comm: object) -> None:
    """Free a comm's buffers (its close() or destroy() where it has one) and the cached device memory."""
    for name in ("close", "destroy"):
        fn = getattr(comm, name, None)
        if callable(fn):
            fn()
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def round_order(names: list[str], rnd: int) -> list[str]:
    """Round rnd's timing order of interleaved variants, a Williams design: row rnd % n of the Latin square whose
    first row is 0, 1, n-1, 2, n-2, ... (odd n: every other n rounds reversed). Over n rounds (2n for odd n) each
    variant runs first, and right after each other variant, equally often: under the H200's power cap the
    variant just before moves a window's median by a few percent, and a plain rotation keeps every variant after
    the same neighbour."""
    n = len(names)
    if n == 0:
        return []
    first_row = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    order = [names[(i + rnd) % n] for i in first_row]
    return order[::-1] if n % 2 and (rnd // n) % 2 else order


def measure_ceilings(device: torch.device, dtype: torch.dtype, rep_ms: int = 200) -> dict:
    """Copy bandwidth (GB/s, read + written) and matmul rate (TFLOP/s) measured here and now.

    On a GPU both are do_bench medians over a rep_ms window, the way the benches time their kernels: an H200
    under sustained tensor-core load leaves its boost clock within ~50 ms (SW power cap; 1980 -> ~1500 MHz,
    bench/gpu/ffn_clock_probe.py), so a burst of ten products reads 16-19% above what any kernel timed over
    the same window can reach. That burst rate is kept as `bf16_tflops_burst`, for comparison only."""
    big = device.type == "cuda"
    mm_dtype = torch.bfloat16 if big else dtype
    n = 8192 if big else 1024
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    t_burst = statistics.median(time_fn(lambda: a @ b, device, 3, 10))  # first: the clock is still boosted
    n_bytes = (1 << 31) if big else (1 << 26)
    bufs = [torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    t_copy = _window_s(lambda: bufs[1].copy_(bufs[0]), device, rep_ms)
    bufs.clear()
    t_mm = _window_s(lambda: a @ b, device, rep_ms)
    out = {"hbm_gbps": round(2 * n_bytes / t_copy / 1e9, 1), "bf16_tflops": sig(2 * n ** 3 / t_mm / 1e12),
           "bf16_tflops_burst": sig(2 * n ** 3 / t_burst / 1e12), "matmul_dtype": str(mm_dtype).replace("torch.", "")}
    if big and torch.cuda.get_device_capability(device) >= (8, 9):
        out["fp8_tflops"] = _fp8_rate(a, b, n, rep_ms)
    return out


def _window_s(fn: Callable[[], object], device: torch.device, rep_ms: int) -> float:
    """Median seconds of fn: do_bench over a rep_ms window on a GPU, else the median of 10 wall-clock calls."""
    if device.type != "cuda":
        return statistics.median(time_fn(fn, device, 3, 10))
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e-3


def _fp8_rate(a: torch.Tensor, b: torch.Tensor, n: int, rep_ms: int) -> float | None:
    """TFLOP/s of torch._scaled_mm on n x n float8_e4m3fn (per-tensor scales, bf16 out); None if it fails."""
    fp8 = torch.float8_e4m3fn
    a8, b8 = a.to(fp8), b.to(fp8).t()  # mat2 column-major, as _scaled_mm wants
    one = torch.ones((), device=a.device, dtype=torch.float32)
    try:
        t = _window_s(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), a.device, rep_ms)
    except (RuntimeError, TypeError):  # an older torch / cuBLAS without FP8
        return None
    return round(2 * n ** 3 / t / 1e12, 2)


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: tiny CPU rates stay non-zero where round(x, 2) gives 0.0."""
    return float(f"{x:.{digits}g}")


def roofline(seconds: float, bytes_moved: float, flops: float, ceilings: dict) -> float:
    """Floor time (max of bytes / bandwidth and FLOPs / matmul rate) over the measured time."""
    floor = max(bytes_moved / (ceilings["hbm_gbps"] * 1e9), flops / (ceilings["bf16_tflops"] * 1e12))
    return floor / seconds if seconds > 0 else 0.0


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' style name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions() -> dict:
    """Versions of what the numbers depend on."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def write_record(path: str, bench: str, device: torch.device, world_size: int, ceilings: dict,
                 rows: list[dict], extra: dict | None = None) -> None:
    """Write one bench run to `path` as a JSON record, the schema every bench's --json shares:

        bench       the bench's name: "ep_moe", "ep_moe_multi", "dispatch", "layer", "eplb", "mla", "model", ...
        command     the command line of the run ("python bench/<bench>.py <flags>")
        date        the day of the run, ISO 8601 ("2025-01-31")
        device      "cpu", or the CUDA device's name ("NVIDIA H200")
        world_size  ranks of the run (1 for the single-device benches)
        versions    {"python", "torch", and "triton", "cuda" where present}
        ceilings    rates measured in the same run (measure_ceilings: "hbm_gbps" copy GB/s read + written,
                    "bf16_tflops" matmul TFLOP/s, "matmul_dtype", ...); {} for a bench without a roofline
        rows        one row per measured (case, variant), below
        ...         `extra`'s top-level fields, e.g. "skipped" and "failed": lists of {"case", "variant"} with
                    the reason ("reason", "why" or "error")

    A row: "variant" (what was timed: a mode, backend, comm, schedule or placement), "case" (the inputs it
    ran on: phase, tokens, experts, top_k, hidden, dtype, ... as the bench has them; bench_model's rows
    carry those fields at the row's top level instead), then its measurements: times in microseconds with
    an `_us` suffix (median_us, mean_us; _ms where so named), rates as gbps and tflops, "roofline" (the
    floor time over the measured time, where ceilings were measured) and "speedup_vs" ({other variant:
    its time / this row's}). Each bench's module docstring lists its own further fields."""
    record = {
        "bench": bench,
        "command": " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "world_size": world_size,
        "versions": versions(),
        "ceilings": ceilings,
        "rows": rows,
        **(extra or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"  # then renamed: a run killed mid-write leaves the last whole record
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
