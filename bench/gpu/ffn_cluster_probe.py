"""What 2-CTA clusters with TMA multicast buy the expert GEMM (bench/gpu/cluster_gemm.py, Triton >= 3.7).

Batched dense expert GEMMs at DeepSeek-V3 dims, c[e] = a[e] @ w[e]^T: the up GEMM (K = 7168, N = 2 x 2048) at
M = 256 / 512 / 1024 rows per expert (32 experts: 1024 / 2048 / 4096 tokens at top-8) and the down GEMM (K = 2048,
N = 7168) at M = 256 and 1024. Each variant first checked against a float32 bmm, then timed in interleaved rounds
(do_bench with its L2 flush, median us) next to torch.bmm (cuBLAS) and a bf16 8192^3 matmul (the ceiling of this run):

    1x1  one CTA a program (the same program as kernels/fused_moe_wgmma.py's TMA path)
    2x1  two row blocks of one expert share each weight tile (multicast B)
    1x2  two column tiles share each activation tile (multicast A)
    persistent  the 1x1 program on one program per SM looping over tiles (bench/gpu/persistent_gemm.py, runs on
                Triton 3.6 too; the cluster variants fail their check there and are not timed)
    persistent_nostore  the same with every epilogue store masked off (what the stores' memory traffic costs)
    persistent_staged   the same with the tile stored through shared memory as 16-byte row pieces

    --variants picks some (default: all).

    python bench/gpu/ffn_cluster_probe.py --json $OUT/ffn_cluster_probe.json [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_gemm import HAS_MULTICAST, cluster_gemm  # noqa: E402
from persistent_gemm import persistent_gemm  # noqa: E402

VARIANTS = {"1x1": lambda a, w: cluster_gemm(a, w), "2x1": lambda a, w: cluster_gemm(a, w, cm=2),
            "1x2": lambda a, w: cluster_gemm(a, w, cn=2), "persistent": lambda a, w: persistent_gemm(a, w),
            "persistent_nostore": lambda a, w: persistent_gemm(a, w, store=False),
            "persistent_staged": lambda a, w: persistent_gemm(a, w, staged=True)}
TIMING_ONLY = {"persistent_nostore"}   # its output is never written: timed, not checked
SHAPES = [("up", 32, 256, 7168, 4096), ("up", 32, 512, 7168, 4096), ("up", 32, 1024, 7168, 4096),
          ("down", 32, 256, 2048, 7168), ("down", 32, 1024, 2048, 7168)]


def check(variant: str, E: int, M: int, K: int, N: int) -> float:
    """Relative error of one variant against a float32 bmm (raises when it is not bf16-close)."""
    g = torch.Generator(device="cuda").manual_seed(E * M + K + N)
    a = torch.randn(E, M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    want = torch.bmm(a.float(), w.float().transpose(1, 2))
    got = VARIANTS[variant](a, w).float()
    err = float((got - want).norm() / want.norm())
    if not err < 1e-2:
        raise AssertionError(f"{variant} at E={E} M={M} K={K} N={N}: relative error {err:.2e}")
    return err


def time_shape(E: int, M: int, K: int, N: int, rounds: int, variants: list[str]) -> dict:
    """Median us of each variant and of torch.bmm on one shape, interleaved rounds (do_bench gives ms)."""
    a = torch.randn(E, M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
    wt = w.transpose(1, 2)
    fns = {"bmm": lambda: torch.bmm(a, wt)}
    for name in variants:
        fns[name] = (lambda f=VARIANTS[name]: f(a, w))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(1e3 * do_bench(f, warmup=25, rep=150))
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()} | {"rounds_us": samples}


def main() -> None:
    """Check, time, and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if set(names) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(set(names) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
    out = {"triton": triton.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
           "has_multicast": HAS_MULTICAST, "checks": {}, "shapes": []}
    for variant in [v for v in names if v not in TIMING_ONLY]:
        for _, E, M, K, N in [("small", 2, 256, 512, 512), *SHAPES[:1], SHAPES[3]]:
            key = f"{variant} E={E} M={M} K={K} N={N}"
            try:
                out["checks"][key] = check(variant, E, M, K, N)
            except Exception as err:  # noqa: BLE001 - every variant is reported
                out["checks"][key] = f"{type(err).__name__}: {str(err)[:400]}"
            print(key, out["checks"][key], flush=True)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ceil_us = sorted(1e3 * do_bench(lambda: x @ x, warmup=25, rep=200) for _ in range(3))[1]
    out["ceiling_tflops"] = 2 * 8192 ** 3 / ceil_us / 1e6
    print(f"bf16 ceiling {out['ceiling_tflops']:.0f} TFLOP/s", flush=True)
    failed = {k.split()[0] for k, v in out["checks"].items() if isinstance(v, str)}
    passed = [v for v in names if v not in TIMING_ONLY and v not in failed]
    passed += [v for v in names if v in TIMING_ONLY and v.split("_")[0] in passed]   # its checked twin passed
    for op, E, M, K, N in SHAPES:
        r = time_shape(E, M, K, N, args.rounds, passed)
        flops = 2 * E * M * K * N
        row = {"op": op, "E": E, "M": M, "K": K, "N": N, "failed_check": sorted(failed)}
        for k in ("bmm", *names):
            if k in r:
                row[k] = {"us": r[k], "tflops": flops / r[k] / 1e6, "floor_share": flops / r[k] / 1e6
                          / out["ceiling_tflops"], "rounds_us": r["rounds_us"][k]}
        out["shapes"].append(row)
        print(op, E, M, K, N, {k: round(v["us"], 1) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
