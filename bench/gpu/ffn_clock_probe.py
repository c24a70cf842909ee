"""One GPU: why the expert FFN's median sits above the sum of its kernels, and which `expected_m` DeepGEMM's
masked GEMMs want.

    python bench/gpu/ffn_clock_probe.py --json out.json [--seconds 1.5] [--idle 1.0]

Part 1 (clocks): each workload runs back to back for --seconds after --idle seconds of idle GPU, with CUDA
events around every call, while `nvidia-smi` samples the SM clock, the power draw and the clock-event reasons
every 25 ms. Per workload: the median call time in windows of GPU time since the start (0-10 ms, 10-50, 50-200,
200 ms-end), the clock and power over the run, then triton's do_bench median (L2 flushed, 100 ms) and a
torch.profiler pass of 3 calls after 1 s idle (how expert_ffn_notes.md's kernel sums were taken).
Workloads: `mm` (8192^3 bf16, the ceiling's GEMM), `deepgemm` (deepgemm_fused_moe, bounded layout), `triton`
(fused_moe_aligned + the k-sum), E x T from --clock-case.

Part 2 (expected_m): DeepGEMM's masked GEMMs + silu_mul on [E, cap, H] (uniform top-8 routing), timed with
do_bench for each --expected value (DeepGEMM picks its tiles from it; results checked equal to the default's),
and once with every expert at exactly N / E rows (no padding waste: the GEMMs' own rate).

Dimension legend: T tokens, k top-k (8), E experts, H hidden (7168), I intermediate (2048), N = T * k.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels import deepgemm  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.common import measure_ceilings  # noqa: E402
from bench.gpu.ffn_layout_probe import _bench_ms, kernel_breakdown, masked_inputs  # noqa: E402

K_TOP, H, I = 8, 7168, 2048
QUERIES = ("clocks.sm,power.draw,clocks_event_reasons.active", "clocks.sm,power.draw,clocks_throttle_reasons.active",
           "clocks.sm,power.draw")
WINDOWS_MS = (0, 10, 50, 200, float("inf"))


def _us(fn) -> float:
    """do_bench median over a 100 ms window (L2 flushed), us."""
    return round(_bench_ms(fn, 100) * 1e3, 1)


class Sampler:
    """nvidia-smi samples (host perf_counter seconds, fields...) every 25 ms in a thread."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.query = ""
        for q in QUERIES:
            r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
            if r.returncode == 0 and "not a valid" not in r.stdout.lower():
                self.query = q
                break
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.query}", "--format=csv,noheader,nounits",
                                      "-i", "0", "-lms", "25"], stdout=subprocess.PIPE, text=True) if self.query \
            else None
        if self.proc is not None:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.rows.append((time.perf_counter(), *[v.strip() for v in line.split(",")]))

    def between(self, t0: float, t1: float) -> list[tuple]:
        return [r for r in self.rows if t0 <= r[0] <= t1]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def _num(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def sustained(fn, seconds: float, idle: float, sampler: Sampler) -> dict:
    """Back-to-back calls for ~seconds of GPU time after idle seconds; events around each call."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    n = max(5, int(seconds * 1e3 / max(s.elapsed_time(e), 1e-3)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    time.sleep(idle)
    t0 = time.perf_counter()
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    ms = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    since = [starts[0].elapsed_time(a) for a in starts]
    windows = {}
    for lo, hi in zip(WINDOWS_MS, WINDOWS_MS[1:]):
        sel = [m for m, t in zip(ms, since) if lo <= t < hi]
        if sel:
            windows[f"{lo}-{hi}ms"] = {"calls": len(sel), "median_us": round(statistics.median(sel) * 1e3, 1)}
    samples = sampler.between(t0, t1)
    clocks = [c for c in (_num(r[1]) for r in samples) if c is not None]
    power = [p for p in (_num(r[2]) for r in samples) if p is not None]
    reasons = sorted({r[3] for r in samples if len(r) > 3})
    return {"calls": n, "windows": windows, "first3_us": [round(m * 1e3, 1) for m in ms[:3]],
            "sm_mhz": {"min": min(clocks, default=None), "median": statistics.median(clocks) if clocks else None,
                       "max": max(clocks, default=None)},
            "power_w": {"median": statistics.median(power) if power else None, "max": max(power, default=None)},
            "reasons": reasons, "samples": [[round(r[0] - t0, 3), *r[1:]] for r in samples][:200]}


def clock_part(E: int, T: int, seconds: float, idle: float, sampler: Sampler) -> dict:
    dev = "cuda"
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, dev)
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K_TOP, torch.device(dev))
    al = moe_align(ids, E, bm)
    al_dg = moe_align(ids, E, deepgemm.alignment())
    row_w = tw.reshape(-1).contiguous()
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    fns = {"mm": lambda: a @ b,
           "deepgemm": functools.partial(deepgemm.deepgemm_fused_moe, x, ids, tw, w, align=al_dg, layout="bounded"),
           "triton": lambda: sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K_TOP,
                                                         row_weights=row_w), K_TOP)}
    flops = {"mm": 2 * 8192 ** 3, "deepgemm": 2 * T * K_TOP * 3 * H * I, "triton": 2 * T * K_TOP * 3 * H * I}
    out = {}
    for name, fn in fns.items():
        rec = sustained(fn, seconds, idle, sampler)
        time.sleep(idle)
        rec["do_bench_us"] = _us(fn)
        time.sleep(idle)
        kern = kernel_breakdown(fn)
        rec["profiler_kernels_us"] = round(sum(kern.values()), 1)
        rec["profiler_top"] = dict(list(kern.items())[:4])
        rec["tflops_steady"] = round(flops[name] / (list(rec["windows"].values())[-1]["median_us"] * 1e-6) / 1e12, 1)
        out[name] = rec
        print(name, json.dumps({k: v for k, v in rec.items() if k != "samples"}), flush=True)
    return out


def expected_part(E: int, T: int, expected: list[int]) -> dict:
    dev = "cuda"
    w13, w2 = make_weights(E, H, I, "swiglu", torch.bfloat16, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, _ = make_routing(T, E, K_TOP, dev)
    xm, counts, cap = masked_inputs(x, ids, E)
    default = max(1, T * K_TOP // E)

    def run(m: int, cnt: torch.Tensor) -> torch.Tensor:
        return deepgemm._masked_ffn(xm, cnt, w13, w2, m)

    ref = run(default, counts)
    live = torch.arange(cap, device=dev)[None, :] < counts[:, None].long()
    rec = {"E": E, "T": T, "cap": cap, "default_expected": default, "max_count": int(counts.max()),
           "min_count": int(counts.min()), "us": {}, "rel_vs_default": {}}
    for m in expected:
        try:
            y = run(m, counts)
            rec["rel_vs_default"][m] = float((y - ref)[live].double().norm() / ref[live].double().norm())
            rec["us"][m] = _us(functools.partial(run, m, counts))
        except Exception as exc:  # noqa: BLE001 - a probe: record what DeepGEMM refused
            rec["us"][m] = f"{type(exc).__name__}: {str(exc)[:200]}"
    even = torch.full_like(counts, T * K_TOP // E)
    rec["even_rows_us"] = _us(functools.partial(run, default, even))
    rec["pad128_rows"] = int(((counts + 127) // 128 * 128).sum())
    rec["pad64_rows"] = int(((counts + 63) // 64 * 64).sum())
    print(json.dumps(rec), flush=True)
    return rec


def pdl_part(E: int, T: int) -> dict:
    """deepgemm_fused_moe (bounded) with DeepGEMM's programmatic dependent launch off and on (do_bench us)."""
    dg = deepgemm._deep_gemm()[0]
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda")
    al = moe_align(ids, E, deepgemm.alignment())
    fn = functools.partial(deepgemm.deepgemm_fused_moe, x, ids, tw, w, align=al, layout="bounded")
    rec: dict = {"E": E, "T": T, "pdl_before": bool(dg.get_pdl())}
    ref = fn()
    for _ in range(2):
        for on in (False, True):
            dg.set_pdl(on)
            y = fn()
            rec[f"rel_{on}"] = float((y.double() - ref.double()).norm() / ref.double().norm())
            rec.setdefault(f"us_pdl_{on}", []).append(_us(fn))
    dg.set_pdl(rec["pdl_before"])
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_clock_probe.json")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--clock-case", default="32x1024")
    ap.add_argument("--cases", default="32x1024,32x4096,64x1024,128x1024")
    ap.add_argument("--expected", default="32,64,96,128,192,256,320,384,512")
    a = ap.parse_args()
    out: dict = {"bench": "ffn_clock_probe", "torch": torch.__version__, "triton": triton.__version__}
    sampler = Sampler()
    out["nvidia_smi_query"] = sampler.query
    try:
        out["ceilings_before"] = measure_ceilings(torch.device("cuda"), torch.bfloat16)
        E, T = (int(v) for v in a.clock_case.split("x"))
        out["clocks"] = clock_part(E, T, a.seconds, a.idle, sampler)
        torch.cuda.empty_cache()
        expected = [int(v) for v in a.expected.split(",")]
        out["expected_m"] = []
        for case in a.cases.split(","):
            E, T = (int(v) for v in case.split("x"))
            out["expected_m"].append(expected_part(E, T, expected))
            torch.cuda.empty_cache()
        try:
            out["pdl"] = [pdl_part(32, 1024), pdl_part(32, 4096)]
        except Exception as exc:  # noqa: BLE001 - a probe: record why
            out["pdl"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        out["ceilings_after"] = measure_ceilings(torch.device("cuda"), torch.bfloat16)
    finally:
        sampler.stop()
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
