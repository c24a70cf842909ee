"""One GPU: the Triton expert FFN with program groups of one expert's blocks (EXPERT_GROUPS, the default) against
the GROUP_M swizzle over the merged block list (EXPERT_GROUPS False), next to `bmm`.

    python bench/gpu/ffn_groups_probe.py --json out.json [--cases 128x4096,256x4096] [--rounds 5] [--seeds 1,4096]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, uniform routing, the tuned tables' configs. Only the order of the
programs differs, so the two `triton` outputs must be equal bit for bit (asserted). do_bench medians (L2 flushed)
over interleaved rounds in bench.common.round_order's order.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.expert_ffn_variants import package_variant  # noqa: E402
from bench.gpu.probe_cases import rounds_us, run_cases  # noqa: E402

K_TOP, H, I = 8, 7168, 2048


def case(E: int, T: int, rounds: int, rep_ms: int, seed: int = 1) -> dict:
    dev = torch.device("cuda")
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda", seed=seed)
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K_TOP, dev)
    off = ({**first, "EXPERT_GROUPS": False}, {**down, "EXPERT_GROUPS": False})
    al = moe_align(ids, E, bm)
    row_w = tw.reshape(-1).contiguous()

    def triton_ffn(up: dict, dn: dict) -> torch.Tensor:
        return sum_pairs(fused_moe_aligned(x, al, w, "swiglu", up, dn, a_div=K_TOP, row_weights=row_w), K_TOP)

    fns = {"triton": lambda: triton_ffn(first, down), "triton_groups_off": lambda: triton_ffn(*off),
           "bmm": package_variant(x, ids, tw, w, "bmm")}
    same = bool(torch.equal(fns["triton"](), fns["triton_groups_off"]()))
    assert same, "the program order changed the output"
    us = rounds_us(fns, rounds, rep_ms)
    rec = {"E": E, "T": T, "routing_seed": seed, "configs": {"up": first, "down": down}, "bit_equal": same, "us": us,
           "median_us": {n: statistics.median(v) for n, v in us.items()}}
    print(json.dumps({k: rec[k] for k in ("E", "T", "routing_seed", "median_us")}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_groups_probe.json")
    ap.add_argument("--cases", default="128x4096,256x4096,32x4096,64x4096,256x1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=int, default=120)
    ap.add_argument("--seeds", default="1", help="routing seeds, comma-separated (bench_expert_ffn.py uses T)")
    a = ap.parse_args()

    def run(item: str) -> list[dict]:
        E, T = (int(v) for v in item.split("x"))
        return [case(E, T, a.rounds, a.rep_ms, int(seed)) for seed in a.seeds.split(",")]

    run_cases("ffn_groups_probe", a.json, a.cases.split(","), run)


if __name__ == "__main__":
    main()
