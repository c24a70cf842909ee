"""One GPU: the swap-AB ragged grouped GEMM (bench/gpu/ragged_swap_gemm.py) against the package's grouped wgmma
kernel on the same expert counts, both kernels on balanced counts, and cuBLAS's batched GEMM.

    python bench/gpu/ragged_swap_probe.py --json out.json [--rounds 7] [--cases 32x1024,64x1024,32@272]

DeepSeek-V3 dims, top-8 uniform routing (the bench's `make_routing`; a case E@C gives every expert C rows
instead); per case two GEMMs without SwiGLU, on rows
already sorted by expert: `up` (N = 2 I = 4096, K = H = 7168: the up GEMM's FLOPs) and `down` (N = H, K = I).
Variants (median us of interleaved do_bench rounds, L2 flushed):
- `swap`: the ragged kernel (4 ring stages, blocks of at most 256 tokens; 241-256 run one n256 wgmma a step;
  run 253 had five pieces there, 128 + 64 + 32 + 16 + 16); `swap288`: blocks of up to 288 tokens (n256 + n16 / n32),
  so every expert of up to 288 rows is one block and streams each weight tile once; `swap288_f13`: the same with
  one n256 wgmma for every block of more than 192 tokens (no pieces);
- `grouped`: kernels.fused_moe_kernel.moe_gemm on the contiguous alignment (rows padded to 64 per expert, 128-row
  blocks plus 64-row tails), the wgmma kernel with 128 x 256 tiles, staged, 4 stages (the tables' kind of entry);
- `grouped_tail32`: `grouped` with carried tails (TAIL_N = 32, 3 stages: a tail of at most 32 rows rides on the
  expert's last main block);
- `swap_even` / `grouped_even` (routed cases): the same two kernels with every expert at the mean count;
- `bmm`: torch.bmm at the mean count.
Checks first: a small ragged case (empty experts, 1 to 577 rows) against float32, then every case's
`swap` output against `grouped`'s rows and float32 on three experts. Dimension legend: T tokens, E experts, R rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe_kernel import check_config, moe_gemm, wgmma_unsupported  # noqa: E402
from nanomoe_kernels.moe_align import moe_align_contiguous  # noqa: E402
from nanomoe_reference.expert_rows import make_routing  # noqa: E402

from bench.gpu.probe_cases import add_medians, rounds_us, run_cases  # noqa: E402
from bench.gpu.ragged_swap_gemm import ragged_blocks, ragged_swap_gemm  # noqa: E402

H, I, K_TOP = 7168, 2048, 8
GROUPED = check_config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, SPLIT_M=64,
                            WGMMA=True, STAGE_C=True))
TAIL32 = check_config({**GROUPED, "TAIL_N": 32, "num_stages": 3})   # carried tails (the tables' `tail_both32` down)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def reference(a: torch.Tensor, w: torch.Tensor, counts: list[int], experts: list[int]) -> list[tuple]:
    """(expert, rows slice, float32 a[rows] @ w[e]^T) for the given experts."""
    out, start = [], 0
    for e, c in enumerate(counts):
        if e in experts and c:
            out.append((e, slice(start, start + c), a[start:start + c].float() @ w[e].float().T))
        start += c
    return out


def grouped_fn(a: torch.Tensor, w: torch.Tensor, counts: list[int], cfg: dict = GROUPED):
    """moe_gemm on the contiguous alignment; A copied into aligned (padded) rows once, untimed."""
    R = a.shape[0]
    c = torch.tensor(counts, dtype=torch.int32, device=a.device)
    align = moe_align_contiguous(c, R, 64)
    ids = align.sorted_ids
    live = (ids >= 0) & (ids < R) & (torch.arange(ids.numel(), device=a.device) < align.num_padded)
    a_al = torch.zeros(ids.numel(), a.shape[1], device=a.device, dtype=a.dtype)
    a_al[live] = a[ids[live].long()]
    out = torch.empty(ids.numel(), w.shape[1], device=a.device, dtype=a.dtype)
    why = wgmma_unsupported(cfg, a_al, w, align, False)
    assert why == "", why

    def fn() -> torch.Tensor:
        return moe_gemm(a_al, w, out, align, cfg, gather_a=False, scatter_c=False)

    def rows() -> torch.Tensor:   # the output back in a's row order
        fn()
        got = torch.empty(R, w.shape[1], device=a.device, dtype=a.dtype)
        got[ids[live].long()] = out[live]
        return got
    return fn, rows


def check_small(dev: torch.device) -> dict:
    counts = [0, 1, 17, 300, 0, 513, 256, 255, 272, 288, 289, 577]
    K, N = 256, 384
    a = torch.randn(sum(counts), K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(len(counts), N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
    out = {"counts": counts}
    for name, extra, full in (("rel_err", False, 16), ("rel_err_288", True, 16), ("rel_err_288_f13", True, 13)):
        got = ragged_swap_gemm(a, w, counts, extra=extra, full=full)()
        out[name] = {e: rel(got[s], ref) for e, s, ref in reference(a, w, counts, list(range(len(counts))))}
    out["ok"] = max(max(v.values()) for k, v in out.items() if k.startswith("rel_err")) < 1e-2
    return out


def case_counts(case: str) -> tuple[int, list[int]]:
    """'ExT': top-8 uniform routing of T tokens over E experts; 'E@C': every expert C rows."""
    if "@" in case:
        E, C = (int(v) for v in case.split("@"))
        return E, [C] * E
    E, T = (int(v) for v in case.split("x"))
    ids, _ = make_routing(T, E, K_TOP, "cuda", seed=T)
    return E, torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()


def run_case(case: str, rounds: int, rep_ms: int, only: list[str]) -> list[dict]:
    dev = torch.device("cuda")
    E, counts = case_counts(case)
    R = sum(counts)
    even = [R // E] * E
    ragged = counts != even
    recs = []
    for op, N, K in (("up", 2 * I, H), ("down", H, I)):
        a = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
        g_fn, g_rows = grouped_fn(a, w, counts)
        gt_fn, gt_rows = grouped_fn(a, w, counts, TAIL32)
        ge_fn, _ = grouped_fn(a, w, even)
        swap, swap288, swap288_f13, swap_even = (ragged_swap_gemm(a, w, c, extra=x, full=f) for c, x, f in
                                                 ((counts, False, 16), (counts, True, 16), (counts, True, 13),
                                                  (even, False, 16)))
        got = swap().clone()
        want = g_rows()
        refs = reference(a, w, counts, [0, E // 2, E - 1])
        rec = {"case": case, "op": op, "N": N, "K": K, "counts_min_max": [min(counts), max(counts)],
               "swap_blocks": int(ragged_blocks(counts, dev)[0].numel()),
               "rel_err_vs_grouped": rel(got, want),
               "rel_err_vs_float32": {e: rel(got[s], r) for e, s, r in refs},
               "grouped_vs_float32": {e: rel(want[s], r) for e, s, r in refs}, "variants": {}}
        a3, wt = a.view(E, R // E, K), w.transpose(1, 2)
        rec["rel_err_tail32_vs_grouped"] = rel(gt_rows(), want)
        fns = {"swap": swap, "swap288": swap288, "swap288_f13": swap288_f13, "grouped": g_fn, "grouped_tail32": gt_fn}
        fns |= {"swap_even": swap_even, "grouped_even": ge_fn} if ragged else {}
        fns["bmm"] = functools.partial(torch.bmm, a3, wt)
        rec["rel_err_swap288_vs_grouped"] = rel(swap288(), want)
        rec["rel_err_swap288_f13_vs_grouped"] = rel(swap288_f13(), want)
        if max(v for k, v in rec.items() if k.startswith("rel_err_") and k.endswith("_grouped")) > 1e-2:
            for n in ("swap", "swap288", "swap288_f13"):
                fns.pop(n)
        fns = {n: f for n, f in fns.items() if not only or n in only}
        rec["variants"] = {n: {"us": us} for n, us in rounds_us(fns, rounds, rep_ms).items()}
        add_medians(rec["variants"], 2 * R * N * K)
        print(json.dumps({k: rec[k] for k in ("case", "op", "rel_err_vs_grouped", "rel_err_swap288_vs_grouped",
                                             "rel_err_swap288_f13_vs_grouped", "rel_err_tail32_vs_grouped",
                                             "swap_blocks")}
                         | {n: v["median_us"] for n, v in rec["variants"].items()}), flush=True)
        recs.append(rec)
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ragged_swap_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,64x1024,32x4096", help="ExT (routed) or E@C (C rows each)")
    ap.add_argument("--variants", default="", help="time only these (comma-separated; default: all)")
    a = ap.parse_args()
    small = check_small(torch.device("cuda"))
    print(json.dumps(small), flush=True)
    only = [v for v in a.variants.split(",") if v]
    out = run_cases("ragged_swap_probe", a.json, a.cases.split(","), lambda c: run_case(c, a.rounds, a.rep_ms, only))
    out |= {"command": "python " + " ".join(sys.argv), "small_check": small}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
