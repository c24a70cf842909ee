"""Does the FP8 grouped GEMM stream its weights faster when each 128 x 128 block is contiguous (16 KB runs,
kernels.fused_moe_fp8_kernel.tile_weights) than from the row-major [E, NW, K] layout (128-byte runs)?

    python bench/gpu/fp8_tiles_probe.py --tokens 64 256 --json OUT.json        (one H200)

Dimension legend: T tokens, E experts (32), H = 7168, I = 2048, top-8. For each GEMM ("up": gate/up with
SwiGLU and the fp8 output; "down": weighted, scattered) and each config below, the median of do_bench over
the row-major and the tiled weights (same math: the outputs must be bit-equal), the weight bytes per second,
and the whole pair. Activation schemes: one-term (w8a8) and two-term (hilo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from nanomoe_kernels.fused_moe_fp8_kernel import check_fp8_config, moe_gemm_fp8, tile_weights  # noqa: E402

from bench.tune_fused_moe import time_us  # noqa: E402
from bench.tune_fused_moe_fp8 import Case, _cfg, fp8_weights  # noqa: E402

UP = [_cfg(32, 128, 8, 3, 8, True, 0, False, 2, True), _cfg(32, 128, 4, 3, 8, True, 0, False, 1, True),
      _cfg(32, 128, 8, 4, 8, True, 0, False, 1, True), _cfg(32, 128, 8, 3, 8, True, 0, False, 2, False),
      _cfg(64, 128, 8, 4, 8, True)]
DOWN = [_cfg(32, 128, 4, 3, 8, True, 0, False, 1, True), _cfg(32, 128, 4, 4, 8, True, 0, False, 1, True),
        _cfg(32, 128, 4, 2, 8, True, 0, False, 2, True), _cfg(64, 128, 4, 4, 8, True),
        _cfg(32, 128, 4, 6, 8, True, 0, False, 1, True)]


def gemm(case: Case, op: str, cfg: dict, tiles: tuple | None):
    """One GEMM on the case's rows-layout weights, or on `tiles` (their block layout) when given."""
    al, inter, inter_s, out = case.align(cfg["BLOCK_M"])
    w13, w2 = tiles if tiles else (case.w[0], case.w[2])
    if op == "up":
        return lambda: moe_gemm_fp8(case.xq, case.xs, w13, case.w[1], inter, al, cfg, gather_a=True,
                                    scatter_c=False, a_div=case.k, swiglu=True, out_scale=inter_s, terms=case.terms)
    return lambda: moe_gemm_fp8(inter, inter_s, w2, case.w[3], out, al, cfg, gather_a=False, scatter_c=True,
                                row_weights=case.row_w, terms=case.terms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    E, k, H, I = 32, 8, 7168, 2048
    w = fp8_weights(E, H, I, "cuda")
    tiles = (tile_weights(w[0]), tile_weights(w[2]))
    nbytes = {"up": w[0].numel(), "down": w[2].numel()}
    rows = []
    for mode in ("w8a8", "hilo"):
        for T in args.tokens:
            case = Case(E, T, k, H, I, w, mode)
            for op, cfgs in (("up", UP), ("down", DOWN)):
                for c in cfgs:
                    cfg = check_fp8_config(c, quant_out=op == "up")
                    try:
                        plain, tiled = gemm(case, op, cfg, None), gemm(case, op, cfg, tiles)
                        a = plain().clone()
                        b = tiled().clone()
                        same = bool(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                                b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b))
                        if op == "up":  # padding rows are never written: compare the output rows' bytes
                            al = case.align(cfg["BLOCK_M"])[0]
                            valid = al.sorted_ids < T * k
                            same = bool(torch.equal(a.view(torch.uint8)[valid], b.view(torch.uint8)[valid]))
                        us = [time_us(plain), time_us(tiled), time_us(plain), time_us(tiled)]
                    except Exception as err:  # out of shared memory, ...
                        print(f"{mode} T={T} {op} {c} failed: {type(err).__name__}: {str(err)[:120]}")
                        continue
                    r = {"mode": mode, "tokens": T, "op": op, "config": c, "rows_us": round(min(us[0], us[2]), 1),
                         "tiles_us": round(min(us[1], us[3]), 1), "bit_equal": same}
                    r["rows_tbps"] = round(nbytes[op] / r["rows_us"] / 1e6, 2)
                    r["tiles_tbps"] = round(nbytes[op] / r["tiles_us"] / 1e6, 2)
                    rows.append(r)
                    print(f"{mode:5s} T={T:4d} {op:4s} BM={c['BLOCK_M']:3d} w={c['num_warps']} st={c['num_stages']} "
                          f"K{c['K_STEPS']} swap={int(c['SWAP_AB'])}: rows {r['rows_us']:7.1f} us "
                          f"({r['rows_tbps']} TB/s)  tiles {r['tiles_us']:7.1f} us ({r['tiles_tbps']} TB/s)  "
                          f"equal={same}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": "fp8_tiles_probe", "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
