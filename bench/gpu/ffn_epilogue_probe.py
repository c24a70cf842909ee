"""One GPU: each expert GEMM alone with the wgmma kernel's two epilogues (STAGE_C off / on) against the tables.

    python bench/gpu/ffn_epilogue_probe.py --json out.json [--rounds 7] [--cases 32x1024,32x4096,...]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, E x T cases; one GEMM a variant, on the tuner's buffers
(bench/tune_fused_moe.Case: the up GEMM gathers token rows and writes the aligned intermediate, the down GEMM
reads it and scatters weighted pair rows):
- up: `up_tuned` (the tables), `up_wg` (wgmma, 128 x (2 x 128), 4 stages), `up_wg_st` (the same, staged);
- down: `down_tuned`, `down_wg` (wgmma, 128 x 256, 4 stages), `down_wg_st` (staged), `down_wg128_st` (128 x 128).
Each op's variants are checked against its first variant's output (the down GEMM's: the first on the same
alignment, since Case draws its input per alignment) (bitwise, else relative error), then timed in
interleaved rounds (do_bench median, L2 flushed) in bench.common.round_order's order. FLOPs count the real
rows (T * k), so `tflops` is comparable across alignments.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import get_config  # noqa: E402
from nanomoe_kernels.fused_moe_kernel import check_config, wgmma_unsupported  # noqa: E402
from nanomoe_reference.expert_rows import make_weights  # noqa: E402

from bench.gpu.probe_cases import add_medians, rounds_us, run_cases  # noqa: E402
from bench.tune_fused_moe import Case  # noqa: E402

K_TOP, H, I = 8, 7168, 2048
WG = {"WGMMA": True, "BLOCK_M": 128, "BLOCK_K": 64, "SPLIT_M": 64, "num_stages": 4, "MERGE_TAIL": False}


def variants(E: int, T: int, dev: torch.device) -> dict[str, tuple[str, dict]]:
    """{name: (op, config)}."""
    up = get_config("up", E, I, H, torch.bfloat16, T * K_TOP, dev)
    down = get_config("down", E, H, I, torch.bfloat16, T * K_TOP, dev)
    wu, wd = {**up, **WG, "BLOCK_N": 128}, {**down, **WG, "BLOCK_N": 256}
    return {"up_tuned": ("up", up), "up_wg": ("up", wu), "up_wg_st": ("up", {**wu, "STAGE_C": True}),
            "down_tuned": ("down", down), "down_wg": ("down", wd), "down_wg_st": ("down", {**wd, "STAGE_C": True}),
            "down_wg128_st": ("down", {**wd, "BLOCK_N": 128, "STAGE_C": True})}


def run_case(item: str, weights: dict, rounds: int, rep_ms: int) -> list[dict]:
    """One E x T case: every variant checked against its op's first variant (see the module docstring), then
    timed."""
    E, T = (int(v) for v in item.split("x"))
    dev = torch.device("cuda")
    if E not in weights:
        weights.clear()
        weights[E] = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    case = Case(E, T, K_TOP, H, I, "swiglu", weights[E])
    rec: dict = {"case": item, "variants": {}}
    fns, want = {}, {}
    for name, (op, cfg) in variants(E, T, dev).items():
        cfg = check_config(cfg)
        fn = case.stage(op, cfg)
        al, inter, _ = case.align(cfg["SPLIT_M"] or cfg["BLOCK_M"])
        a = case.x if op == "up" else inter
        kernel = wgmma_unsupported(cfg, a, case.w[0 if op == "up" else 1], al, op == "up") or "wgmma"
        got = fn().clone()
        if op == "up":   # aligned rows (each alignment its own order): the real ones, in pair order
            sid = al.sorted_ids
            live = (torch.arange(sid.numel(), device=dev) < al.num_padded) & (sid < T * K_TOP)
            pairs = got.new_zeros(T * K_TOP, got.shape[1])
            pairs[sid[live].long()] = got[live]
            got = pairs
        torch.cuda.synchronize()
        # the down GEMM's input is random per alignment (Case.align): checked against the first of its alignment
        ref = want.setdefault(op if op == "up" else (op, al.block_m), got)
        same = ref.shape == got.shape
        err = float((got.double() - ref.double()).norm() / ref.double().norm()) if same else None
        rec["variants"][name] = {"op": op, "config": cfg, "kernel": kernel, "rel_err": err,
                                 "bitwise": bool(same and torch.equal(got, ref)), "us": []}
        fns[name] = fn
    for name, us in rounds_us(fns, rounds, rep_ms).items():
        rec["variants"][name]["us"] = us
    for op, flops in (("up", 2 * T * K_TOP * H * 2 * I), ("down", 2 * T * K_TOP * I * H)):
        add_medians({n: v for n, v in rec["variants"].items() if v["op"] == op}, flops)
    print({"case": item, "median_us": {n: v.get("median_us") for n, v in rec["variants"].items()}}, flush=True)
    return [rec]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_epilogue_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--cases", default="32x1024,32x4096,128x4096,256x4096")
    ap.add_argument("--budget-s", type=float, default=None)
    a = ap.parse_args()
    weights: dict = {}
    out = run_cases("ffn_epilogue_probe", a.json, a.cases.split(","),
                    lambda item: run_case(item, weights, a.rounds, a.rep_ms), a.budget_s)
    out["command"] = "python " + " ".join(sys.argv)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
