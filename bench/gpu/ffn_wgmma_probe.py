"""One GPU: the warp-specialised wgmma expert GEMM (config key WGMMA) against the tuned Triton configs and the peers.

    python bench/gpu/ffn_wgmma_probe.py --json out.json [--rounds 3] [--cases 32x1024,32x4096,...]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, E x T cases. Variants, each the whole expert FFN (alignment
untimed, as the bench's `triton` row): `triton` (the tuned tables), `wgmma` (both GEMMs on the wgmma kernel:
128-row programs over 64-row alignment, 4 stages, 128 x (2 x 128) up and 128 x 256 down tiles), `wgmma_s3`
(3 stages), `wgmma_up` / `wgmma_down` (one GEMM on it, the other tuned), `triton_tiles` (the tuned tiles with
WGMMA off everywhere), `fused_moe` when asked for (the public
entry, its alignment timed), and the peers `bmm`, `deepgemm`, `sglang` where they load. Every variant is checked
against `triton`'s output (relative error) first, then all are timed in interleaved rounds (do_bench median, L2
flushed); the bf16 matmul ceiling before and after. One profiler pass per case sums the kernels' times of
`triton`, `wgmma` and `wgmma_up` (3 calls each).

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.common import measure_ceilings  # noqa: E402
from bench.expert_ffn_variants import build_variants  # noqa: E402
from bench.gpu.ffn_layout_probe import kernel_breakdown  # noqa: E402
from bench.gpu.probe_cases import add_medians, rounds_us  # noqa: E402

K_TOP, H, I = 8, 7168, 2048
WG = dict(BLOCK_M=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, SPLIT_M=64, WGMMA=True)


def wgmma_variants(up: dict, down: dict) -> dict[str, tuple[dict, dict]]:
    wu, wd = {**up, **WG, "BLOCK_N": 128}, {**down, **WG, "BLOCK_N": 256}
    return {"wgmma": (wu, wd), "wgmma_s3": ({**wu, "num_stages": 3}, {**wd, "num_stages": 3}),
            "wgmma_up": (wu, down), "wgmma_down": (up, wd),
            "triton_tiles": ({**up, "WGMMA": False}, {**down, "WGMMA": False})}


def ffn_fn(x, ids, tw, w, up: dict, down: dict):
    E = w[0].shape[0]
    bm = min(c["SPLIT_M"] or c["BLOCK_M"] for c in (up, down))
    al = moe_align(ids, E, bm)
    row_w = tw.reshape(-1).contiguous()
    return lambda: sum_pairs(fused_moe_aligned(x, al, w, "swiglu", up, down, a_div=K_TOP, row_weights=row_w), K_TOP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_wgmma_probe.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,32x4096,64x1024,128x4096,256x4096,32x256")
    ap.add_argument("--peers", default="bmm,deepgemm,sglang")
    ap.add_argument("--variants", default="", help="ours to time (default: all of them; `triton` always)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"bench": "ffn_wgmma_probe", "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join(sys.argv), "ceilings_before": measure_ceilings(dev, torch.bfloat16), "cases": []}
    for case in a.cases.split(","):
        E, T = (int(v) for v in case.split("x"))
        w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        ids, tw = make_routing(T, E, K_TOP, "cuda")
        up, down, _ = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K_TOP, dev)
        built = build_variants(x, ids, tw, w, "swiglu", [p for p in a.peers.split(",") if p])
        fns = {"triton": ffn_fn(x, ids, tw, w, up, down)}
        fns.update({n: ffn_fn(x, ids, tw, w, u, d) for n, (u, d) in wgmma_variants(up, down).items()
                    if not a.variants or n in a.variants.split(",")})
        if "fused_moe" in a.variants.split(","):   # the public entry: the alignment inside the timed call
            fns["fused_moe"] = lambda x=x, ids=ids, tw=tw, w=w: fused_moe(x, ids, tw, w)
        fns.update(built.fns)
        want = fns["triton"]().double()
        rec = {"E": E, "T": T, "configs": {"triton": [up, down], **{n: list(c) for n, c in
                                                                      wgmma_variants(up, down).items()}},
               "skipped": built.skipped, "variants": {}}
        live = {}
        for name, fn in fns.items():
            try:
                got = fn()
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - a variant that fails is a result here
                rec["variants"][name] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
                continue
            err = float((got.double() - want).norm() / want.norm())
            rec["variants"][name] = {"rel_err": err, "us": []}
            if err < 2e-2:
                live[name] = fn
        for name, us in rounds_us(live, a.rounds, a.rep_ms).items():
            rec["variants"][name]["us"] = us
        add_medians(rec["variants"], 2 * T * K_TOP * 3 * H * I)
        rec["kernels_us"] = {n: kernel_breakdown(live[n]) for n in ("triton", "wgmma", "wgmma_up", "fused_moe")
                             if n in live}
        out["cases"].append(rec)
        print(json.dumps({"case": case, "median_us": {n: v.get("median_us", v.get("error", v.get("rel_err")))
                                                      for n, v in rec["variants"].items()}}), flush=True)
        print(json.dumps({"case": case, "kernels_us": rec["kernels_us"]}), flush=True)
        del w, x, built, fns, live
        torch.cuda.empty_cache()
    out["ceilings_after"] = measure_ceilings(dev, torch.bfloat16)
    print(json.dumps({"ceilings_before": out["ceilings_before"], "ceilings_after": out["ceilings_after"]}))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
