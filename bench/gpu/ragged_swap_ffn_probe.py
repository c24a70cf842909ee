"""One GPU: the whole expert FFN on the swap-AB ragged kernel (bench/gpu/ragged_swap_gemm.py) against the package's
`triton` FFN with the tuned tables, in the same run.

    python bench/gpu/ragged_swap_ffn_probe.py --json out.json [--rounds 7] [--cases 32x1024,32x2048,64x2048]

DeepSeek-V3 dims (H 7168, I 2048), top-8 uniform routing. Both sides get their routing layout made ahead, untimed:
`triton` the tables' alignment (as bench/gpu/ffn_config_probe.py's `tuned`), `swap` the pairs sorted by expert
(a stable argsort). Timed, median us of interleaved do_bench rounds (L2 flushed):
- `triton`: kernels.fused_moe.fused_moe_aligned + the k-sum (kernels.moe_sum.sum_pairs);
- `swap`: x's rows copied into expert order (torch.index_select), the up GEMM with SwiGLU and the down GEMM with
  the top-k weights and the scatter to pair rows, both on the ragged kernel (blocks of up to 288 tokens, one n256
  wgmma for blocks of more than 192), then the same k-sum;
- `swap_gemms`: its two GEMMs alone; `permute`: the copy alone.
Checks first: a small case (E = 8, ~300 rows an expert) against float64 (nanomoe_reference.moe_experts), then each
case's `swap` against `triton` (bitwise, else the relative error). Dimension legend: T tokens, k top-k, E experts,
R = T k.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import nanomoe_reference as reference  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe_aligned, get_config  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.gpu.probe_cases import add_medians, rounds_us, run_cases  # noqa: E402
from bench.gpu.ragged_swap_gemm import ragged_swap_gemm  # noqa: E402
from bench.gpu.ragged_swap_probe import rel  # noqa: E402

H, I, K_TOP = 7168, 2048, 8


def swap_ffn(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, w: tuple[torch.Tensor, ...]) -> dict:
    """Launchers of the swap FFN for this routing: {"ffn", "gemms", "permute"}; layout and blocks made here."""
    T, k = ids.shape
    E = w[0].shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    pair_ids, tokens = order.to(torch.int32), order // k
    row_w = tw.reshape(-1).float().contiguous()
    xs = x.new_empty(T * k, x.shape[1])
    inter = x.new_empty(T * k, w[0].shape[1] // 2)
    pairs = x.new_empty(T * k, w[1].shape[1])
    up = ragged_swap_gemm(xs, w[0], counts, swiglu=True, extra=True, full=13, out=inter)
    down = ragged_swap_gemm(inter, w[1], counts, extra=True, full=13, ids=pair_ids, row_weights=row_w, out=pairs)

    def permute() -> torch.Tensor:
        return torch.index_select(x, 0, tokens, out=xs)

    def gemms() -> torch.Tensor:
        up()
        return down()

    def ffn() -> torch.Tensor:
        permute()
        gemms()
        return sum_pairs(pairs, k)
    return {"ffn": ffn, "gemms": gemms, "permute": permute}


def check_small(dev: torch.device) -> dict:
    E, T, k, h, i = 8, 600, 4, 256, 128   # ~300 rows an expert: most are two blocks, of uneven sizes
    w = make_weights(E, h, i, "swiglu", torch.bfloat16, "cuda", seed=3)
    x = torch.randn(T, h, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=4)
    got = swap_ffn(x, ids, tw, w)["ffn"]()
    err = rel(got, reference.moe_experts(x, ids, tw, w, "swiglu").to(got.device))
    return {"rel_err_float64": err, "ok": err < 2e-2}


def run_case(E: int, T: int, w: tuple[torch.Tensor, ...], rounds: int, rep_ms: int) -> dict:
    dev = w[0].device
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda", seed=T)
    row_w = tw.reshape(-1).contiguous()
    up = get_config("up", E, I, H, torch.bfloat16, T * K_TOP, dev)
    down = get_config("down", E, H, I, torch.bfloat16, T * K_TOP, dev)
    al = moe_align(ids, E, min(c["SPLIT_M"] or c["BLOCK_M"] for c in (up, down)))

    def triton_ffn() -> torch.Tensor:
        return sum_pairs(fused_moe_aligned(x, al, w, "swiglu", up, down, a_div=K_TOP, row_weights=row_w), K_TOP)

    swap = swap_ffn(x, ids, tw, w)
    want, got = triton_ffn().clone(), swap["ffn"]()
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    rec = {"case": f"{E}x{T}", "counts_min_max": [int(counts.min()), int(counts.max())], "configs": [up, down],
           "bitwise": bool(torch.equal(got, want)), "rel_err": rel(got, want)}
    fns = {"triton": triton_ffn, "swap": swap["ffn"], "swap_gemms": swap["gemms"], "permute": swap["permute"]}
    if rec["rel_err"] > 1e-2:
        fns = {"triton": triton_ffn}
    rec["variants"] = {n: {"us": us} for n, us in rounds_us(fns, rounds, rep_ms).items()}
    add_medians(rec["variants"], 2 * T * K_TOP * 3 * H * I)
    print(json.dumps({k: rec[k] for k in ("case", "bitwise", "rel_err")}
                     | {n: v["median_us"] for n, v in rec["variants"].items()}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ragged_swap_ffn_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,32x2048,64x2048")
    a = ap.parse_args()
    small = check_small(torch.device("cuda"))
    print(json.dumps(small), flush=True)
    weights: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(case: str) -> list[dict]:
        E, T = (int(v) for v in case.split("x"))
        if E not in weights:
            weights.clear()   # one expert count's weights at a time (256 experts: 11 GB)
            weights[E] = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        return [run_case(E, T, weights[E], a.rounds, a.rep_ms)]

    out = run_cases("ragged_swap_ffn_probe", a.json, a.cases.split(","), run)
    out |= {"command": "python " + " ".join(sys.argv), "small_check": small}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
