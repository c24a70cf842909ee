"""One GPU: the whole expert FFN (kernels.fused_moe.fused_moe: align, the two GEMMs, the k-sum) with `SWAP` configs
(kernels/fused_moe_swap.py) against the grouped wgmma kernel's configs, in the same run.

    python bench/gpu/swap_ffn_probe.py --json out.json [--rounds 7] [--cases 32x1024,64x2048,32x2048] [--kernels]

DeepSeek-V3 dims (H 7168, I 2048), top-8 uniform routing. Variants, median us of interleaved do_bench rounds (L2
flushed): `grouped`: the tables' configs for E = 32, T = 1024 before SWAP (128 x 128 up tiles with WGMMA and
STAGE_C, the Triton kernel's 128 x 256 down tiles, 64-row tails merged); `swap`: SWAP for both GEMMs (blocks of up to
288 rows an expert; the up GEMM's rows gathered by cp.async); `swap_perm`: the same with the rows
copied into aligned order first (PERMUTE_A) and loaded by TMA; `tables`: whatever kernels/tuned picks now;
`swap_up` / `swap_down`: `swap_perm`'s config for one GEMM, the tables' for the other. Each case is checked
first: every variant against float64 on 16 sampled tokens and against the first variant named (relative error,
bitwise). --kernels: each variant's kernels in launch order, us per call from torch.profiler (3 calls after the
rounds, no flush between them).
Dimension legend: T tokens, k top-k, E experts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe, get_config  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.gpu.ffn_layout_probe import kernel_sequence  # noqa: E402
from bench.gpu.probe_cases import add_medians, rounds_us, run_cases  # noqa: E402

H, I, K_TOP = 7168, 2048, 8
GROUPED_UP = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=True,
                  SPLIT_M=64, MERGE_TAIL=True, WGMMA=True, STAGE_C=True)
GROUPED_DOWN = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=True,
                    SPLIT_M=64, MERGE_TAIL=True, A_TMA=True)
SWAP_UP = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True)
SWAP_DOWN = {**SWAP_UP, "BLOCK_N": 128}
CONFIGS = {"grouped": {"up": GROUPED_UP, "down": GROUPED_DOWN}, "swap": {"up": SWAP_UP, "down": SWAP_DOWN},
           "swap_perm": {"up": {**SWAP_UP, "PERMUTE_A": True}, "down": SWAP_DOWN},
           "tables": None, "swap_up": "up", "swap_down": "down"}


def case_config(name: str, E: int, M: int) -> dict | None:
    """The variant's {"up", "down"} configs at E experts and M rows; a mixed variant takes the tables' other GEMM."""
    c = CONFIGS[name]
    if not isinstance(c, str):
        return c
    dev = torch.device("cuda")
    table = {"up": get_config("up", E, I, H, torch.bfloat16, M, dev),
             "down": get_config("down", E, H, I, torch.bfloat16, M, dev)}
    return {**table, c: CONFIGS["swap_perm"][c]}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float32."""
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def sampled_float32(x, ids, tw, w, rows) -> torch.Tensor:
    w13, w2 = (t.float() for t in w)
    want = torch.zeros(rows.numel(), H, device=x.device)
    for j in range(ids.shape[1]):
        e, xs = ids[rows, j].long(), x[rows].float()
        gu = torch.einsum("th,tnh->tn", xs, w13[e])
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        want += tw[rows, j, None].float() * torch.einsum("ti,thi->th", h.bfloat16().float(), w2[e])
    return want


def run_case(E: int, T: int, w: tuple[torch.Tensor, ...], rounds: int, rep_ms: int, names: list[str],
             kernels: bool = False) -> dict:
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda", seed=T)
    cfgs = {n: case_config(n, E, T * K_TOP) for n in names}
    fns = {n: (lambda c=cfgs[n]: fused_moe(x, ids, tw, w, config=c)) for n in names}
    outs = {n: f().clone() for n, f in fns.items()}
    rows = torch.arange(0, T, max(1, T // 16), device="cuda")
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    rec = {"case": f"{E}x{T}", "counts_min_max": [int(counts.min()), int(counts.max())],
           "rel_err_float32_sampled": {n: rel(o[rows], sampled_float32(x, ids, tw, w, rows)) for n, o in outs.items()},
           "baseline": names[0], "rel_err_vs_baseline": {n: rel(o, outs[names[0]]) for n, o in outs.items()},
           "bitwise_vs_baseline": {n: bool(torch.equal(o, outs[names[0]])) for n, o in outs.items()}}
    rec["variants"] = {n: {"us": us} for n, us in rounds_us(fns, rounds, rep_ms).items()}
    add_medians(rec["variants"], 2 * T * K_TOP * 3 * H * I)
    if kernels:
        for n, f in fns.items():
            rec["variants"][n]["kernels"] = kernel_sequence(f)
            print(json.dumps({"case": rec["case"], "variant": n, "kernels": rec["variants"][n]["kernels"]}), flush=True)
    print(json.dumps({"case": rec["case"], "err": rec["rel_err_vs_baseline"]}
                     | {n: v["median_us"] for n, v in rec["variants"].items()}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="swap_ffn_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,64x2048,32x2048")
    ap.add_argument("--variants", default="grouped,swap,tables")
    ap.add_argument("--kernels", action="store_true", help="each variant's kernels in launch order (torch.profiler)")
    a = ap.parse_args()
    weights: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(case: str) -> list[dict]:
        E, T = (int(v) for v in case.split("x"))
        if E not in weights:
            weights.clear()   # one expert count's weights at a time (256 experts: 11 GB)
            weights[E] = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        return [run_case(E, T, weights[E], a.rounds, a.rep_ms, a.variants.split(","), a.kernels)]

    out = run_cases("swap_ffn_probe", a.json, a.cases.split(","), run)
    out["command"] = "python " + " ".join(sys.argv)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
