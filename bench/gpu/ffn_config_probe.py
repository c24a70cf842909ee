"""One GPU: the Triton fused MoE's config variants against the tuned configs (today 256-row tiles: the up GEMM as
256 x (2 x 64), the down GEMM as 256 x 128, each with 64-row tail blocks in the same launch; the same registers
per thread as the tuned 128 x (2 x 128) and 128 x 256 tiles, half the weight reads per row).

    python bench/gpu/ffn_config_probe.py --json out.json [--rounds 5]

DeepSeek-V3 expert dims (H 7168, I 2048), 32 local experts, top-8, T = 1024 and 4096 tokens (the issue's prefill
sizes), the tuned tiles throughout. Each variant is checked against the tuned configs' output (bitwise, else
relative error), then timed as fused_moe calls (align included, the same for all) in interleaved rounds
(do_bench median, L2 flushed); the bf16 matmul ceiling is measured before and after, to see how much the clocks
drift. (Runs 79-80 of bench/results/gpu_tests_h200.md ran this probe with WARP_SPEC variants too, a config key
removed since: bench/results/expert_ffn_notes.md.)

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe, get_config  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.common import measure_ceilings  # noqa: E402

E, K_TOP, H, I = 32, 8, 7168, 2048
TILE256 = {"BLOCK_M": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SPLIT_M": 64, "MERGE_TAIL": True,
           "USE_TMA": True}


def variants(T: int, dev: torch.device) -> dict[str, dict]:
    up = get_config("up", E, I, H, torch.bfloat16, T * K_TOP, dev)
    down = get_config("down", E, H, I, torch.bfloat16, T * K_TOP, dev)
    return {
        "tuned": {"up": up, "down": down},
        "up256": {"up": {**up, **TILE256, "BLOCK_N": 64}, "down": down},
        "down256": {"up": up, "down": {**down, **TILE256, "BLOCK_N": 128}},
        "both256": {"up": {**up, **TILE256, "BLOCK_N": 64}, "down": {**down, **TILE256, "BLOCK_N": 128}},
        "both256_s4": {"up": {**up, **TILE256, "BLOCK_N": 64, "num_stages": 4},
                       "down": {**down, **TILE256, "BLOCK_N": 128, "num_stages": 4}},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_config_probe.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=int, default=150)
    a = ap.parse_args()
    dev = torch.device("cuda")
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    out = {"bench": "ffn_config_probe", "torch": torch.__version__, "triton": triton.__version__,
           "ceilings_before": measure_ceilings(dev, torch.bfloat16), "cases": []}
    for T in (1024, 4096):
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        ids, tw = make_routing(T, E, K_TOP, "cuda")
        rec = {"T": T, "variants": {}}
        want = fused_moe(x, ids, tw, w, config=variants(T, dev)["tuned"])
        fns = {}
        for name, cfg in variants(T, dev).items():
            try:
                got = fused_moe(x, ids, tw, w, config=cfg)
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - a config Triton cannot compile is a result here
                rec["variants"][name] = {"config": cfg, "error": f"{type(err).__name__}: {str(err)[:400]}"}
                continue
            err = float((got.double() - want.double()).norm() / want.double().norm())
            rec["variants"][name] = {"config": cfg, "bitwise": bool(torch.equal(got, want)), "rel_err": err,
                                     "us": []}
            if err < 1e-2:
                fns[name] = lambda cfg=cfg, x=x, ids=ids, tw=tw: fused_moe(x, ids, tw, w, config=cfg)
        for _ in range(a.rounds):
            for name, fn in fns.items():
                ms = triton.testing.do_bench(fn, warmup=25, rep=a.rep_ms, return_mode="median")
                rec["variants"][name]["us"].append(round(ms * 1e3, 1))
        for v in rec["variants"].values():
            if v.get("us"):
                v["median_us"] = statistics.median(v["us"])
        flops = 2 * T * K_TOP * 3 * H * I
        rec["tflops"] = {n: round(flops / (v["median_us"] * 1e-6) / 1e12, 1)
                         for n, v in rec["variants"].items() if "median_us" in v}
        out["cases"].append(rec)
        print(json.dumps({"T": T, "median_us": {n: v.get("median_us", v.get("error")) for n, v in
                                                 rec["variants"].items()}, "tflops": rec["tflops"]}), flush=True)
    out["ceilings_after"] = measure_ceilings(dev, torch.bfloat16)
    print(json.dumps({"ceilings_before": out["ceilings_before"], "ceilings_after": out["ceilings_after"]}))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
