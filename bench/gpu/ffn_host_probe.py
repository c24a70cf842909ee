"""One GPU: where the whole expert FFN's do_bench time goes beyond its kernels. For each case and config variant:
the eager call under do_bench (L2 flushed), the same call captured in a CUDA graph and replayed under do_bench,
the host's time to issue one call (perf_counter around the call, the GPU idle before it), and the kernels' sum
from torch.profiler; with --host-profile, the functions that take the host's time (cProfile).

    python bench/gpu/ffn_host_probe.py --json out.json [--cases 32x1024,128x4096] [--variants tables,swap_perm]
                                       [--host-profile]

Variants as in bench/gpu/swap_ffn_probe.py. Dimension legend: T tokens, E experts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.gpu.swap_ffn_probe import K_TOP, H, I, case_config, kernel_sequence  # noqa: E402


def host_us(fn, calls: int = 20) -> float:
    """Median host time of one call, issued with the GPU idle."""
    out = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return round(statistics.median(out), 1)


def host_profile(fn, calls: int = 20, top: int = 25) -> list[list]:
    """cProfile of `calls` calls: [[function, calls per call, own us per call, cumulative us per call], ...], the
    `top` largest own times (the GPU synchronised once, after the calls)."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    rows = []
    for (file, line, name), (_, ncalls, own, cum, _) in pstats.Stats(prof).stats.items():
        rows.append([f"{name} ({os.path.basename(file)}:{line})", round(ncalls / calls, 2),
                     round(own / calls * 1e6, 1), round(cum / calls * 1e6, 1)])
    return sorted(rows, key=lambda r: -r[2])[:top]


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """fn captured once (after warm-up on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_host_probe.json")
    ap.add_argument("--cases", default="32x1024,128x4096")
    ap.add_argument("--variants", default="tables,swap_perm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--host-profile", action="store_true", help="where the host's time goes (cProfile, 20 calls)")
    a = ap.parse_args()
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "cases": []}
    for case in a.cases.split(","):
        E, T = (int(v) for v in case.split("x"))
        w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids, tw = make_routing(T, E, K_TOP, "cuda", seed=T)
        for name in a.variants.split(","):
            cfg = case_config(name, E, T * K_TOP)

            def fn(c=cfg, args=(x, ids, tw, w)):
                return fused_moe(*args, config=c)

            g = graph_of(fn)
            rec = {"case": case, "variant": name, "host_us": host_us(fn),
                   "kernels": kernel_sequence(fn), "eager_us": [], "graph_us": []}
            for _ in range(a.rounds):
                rec["eager_us"].append(round(triton.testing.do_bench(fn, rep=150, return_mode="median") * 1e3, 1))
                rec["graph_us"].append(round(triton.testing.do_bench(g.replay, rep=150, return_mode="median") * 1e3,
                                             1))
            rec["kernel_sum_us"] = round(sum(k[1] for k in rec["kernels"]), 1)
            if a.host_profile:
                rec["host_profile"] = host_profile(fn)
            print(json.dumps({k: v for k, v in rec.items() if k != "kernels"}), flush=True)
            out["cases"].append(rec)
            del g
        del w, x, ids, tw
        torch.cuda.empty_cache()
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
