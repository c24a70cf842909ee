"""One GPU: do DeepGEMM's own knobs move its masked GEMMs where they are HBM-bound (few rows per expert)?

    DG_PRINT_CONFIGS=1 python bench/gpu/deepgemm_knob_probe.py --json out.json [--rounds 3] [--budget-s 420]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, uniform routing. Per (E, T) of --cases, do_bench medians (L2
flushed) over interleaved rounds of:
- `triton`: the bench's row (fused_moe_aligned with the alignment made ahead, then the k-sum);
- `deepgemm`: deepgemm_fused_moe with the alignment made ahead (the bench's row, layout "auto");
- `gemms[<knobs>]`: the two masked GEMMs and silu_mul alone on [E, cap, H] built untimed (as
  kernels/deepgemm._masked_ffn runs them), under each knob setting: expected_m (the hint DeepGEMM's config
  heuristic reads; the package passes N / E), deep_gemm.set_num_sms, set_tc_util and set_pdl. Every setting's
  live rows are checked against the default's (same bits expected unless the tile changes: 2e-2 relative).
DG_PRINT_CONFIGS=1 makes DeepGEMM print each config it picks (stdout). The knobs are restored after every call.
A run stops adding cases after --budget-s seconds (the JSON holds what finished).

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, N = T * k pairs, cap rows per expert.
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
from nanomoe_kernels import deepgemm  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_silu import silu_mul  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.gpu.ffn_layout_probe import kernel_breakdown, masked_inputs  # noqa: E402
from bench.gpu.probe_cases import run_cases  # noqa: E402

K_TOP, H, I = 8, 7168, 2048


def knob_settings(expected: int, cap: int) -> dict[str, dict]:
    """name -> knobs; {} is DeepGEMM's default with the package's expected_m."""
    sets: dict[str, dict] = {"default": {}}
    for m in sorted({max(1, expected // 2), 2 * expected, 4 * expected, cap} - {expected}):
        sets[f"expected_m={m}"] = {"expected_m": m}
    for n in (128, 120, 112):
        sets[f"num_sms={n}"] = {"num_sms": n}
    for u in (50, 80):
        sets[f"tc_util={u}"] = {"tc_util": u}
    sets["pdl"] = {"pdl": True}
    return sets


def gemms(dg, xm: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expected: int,
          knobs: dict) -> torch.Tensor:
    """The two masked GEMMs and silu_mul on xm [E, cap, H] with the knobs set, then restored."""
    keep = (dg.get_num_sms(), dg.get_tc_util(), dg.get_pdl())
    try:
        if "num_sms" in knobs:
            dg.set_num_sms(knobs["num_sms"])
        if "tc_util" in knobs:
            dg.set_tc_util(knobs["tc_util"])
        if "pdl" in knobs:
            dg.set_pdl(knobs["pdl"])
        m = knobs.get("expected_m", expected)
        h = xm.new_empty((*xm.shape[:2], w13.shape[1]))
        dg.m_grouped_bf16_gemm_nt_masked(xm, w13, h, counts, m)
        y = torch.empty_like(xm)
        dg.m_grouped_bf16_gemm_nt_masked(silu_mul(h, masked_m=counts), w2, y, counts, m)
        return y
    finally:
        dg.set_num_sms(keep[0])
        dg.set_tc_util(keep[1])
        dg.set_pdl(keep[2])


def case(E: int, T: int, rounds: int, rep_ms: int) -> dict:
    dev = torch.device("cuda")
    dg = deepgemm._deep_gemm()[0]
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda")
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K_TOP, dev)
    al = moe_align(ids, E, bm)
    row_w = tw.reshape(-1).contiguous()
    al_dg = moe_align(ids, E, deepgemm.alignment())
    xm, counts, cap = masked_inputs(x, ids, E)
    expected = max(1, T * K_TOP // E)
    fns = {"triton": lambda: sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K_TOP,
                                                         row_weights=row_w), K_TOP),
           "deepgemm": lambda: deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al_dg)}
    sets = knob_settings(expected, cap)
    for name, knobs in sets.items():
        fns[f"gemms[{name}]"] = (lambda k=knobs: gemms(dg, xm, counts, w[0], w[1], expected, k))
    rec: dict = {"E": E, "T": T, "expected_m": expected, "cap": cap, "knob_defaults":
                 {"num_sms": dg.get_num_sms(), "tc_util": dg.get_tc_util(), "pdl": dg.get_pdl()}}
    live = [int(n) for n in counts.tolist()]
    base = fns["gemms[default]"]()
    base_live = torch.cat([base[e, :n] for e, n in enumerate(live)]).double()
    rel = {}
    for name in sets:
        print(f"E={E} T={T} {name}:", flush=True)  # DG_PRINT_CONFIGS lines follow
        y = fns[f"gemms[{name}]"]()
        got = torch.cat([y[e, :n] for e, n in enumerate(live)]).double()
        rel[name] = float((got - base_live).norm() / base_live.norm())
    ref = fns["deepgemm"]().double()
    rel["triton_vs_deepgemm"] = float((fns["triton"]().double() - ref).norm() / ref.norm())
    rec["rel_vs_default"] = rel
    assert max(rel.values()) < 2e-2, rel
    us: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):  # each round starts one variant later (order effects under the power cap)
        for name in names[r % len(names):] + names[:r % len(names)]:
            us[name].append(round(triton.testing.do_bench(fns[name], warmup=25, rep=rep_ms,
                                                          return_mode="median") * 1e3, 1))
    rec["us"] = us
    rec["median_us"] = {n: statistics.median(v) for n, v in us.items()}
    rec["kernels_us"] = {n: kernel_breakdown(fns[n]) for n in ("triton", "deepgemm", "gemms[default]")}
    print(json.dumps({k: rec[k] for k in ("E", "T", "median_us")}), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="deepgemm_knob_probe.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=120)
    ap.add_argument("--cases", default="256x1024,128x1024,32x1024,256x4096", help="ExT")
    ap.add_argument("--budget-s", type=float, default=420.0)
    a = ap.parse_args()
    ok, why = deepgemm.supports()
    if not ok:
        raise SystemExit(f"deepgemm unavailable: {why}")
    run_cases("deepgemm_knob_probe", a.json, a.cases.split(","),
              lambda item: [case(*(int(v) for v in item.split("x")), a.rounds, a.rep_ms)], a.budget_s)


if __name__ == "__main__":
    main()
