"""One GPU: what the boundary between the expert FFN's two GEMMs costs, i.e. the most that starting the down GEMM
before the up GEMM ends (PDL with per-block readiness flags) could win.

    python bench/gpu/ffn_overlap_probe.py --json out.json [--rounds 7] [--cases 32x1024,32x4096]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, uniform routing, the tables' configs; the alignment and the
block tables made ahead, untimed. Per E x T case, do_bench medians (L2 flushed) over interleaved rounds:
- `up`, `down`: each GEMM alone (the down GEMM on the up GEMM's output of an earlier call);
- `seq`: up, then down, on one stream (the package's order);
- `conc`: the same two launches on two streams with no dependency between them, so the block scheduler fills
  the SMs the up GEMM's last wave leaves idle with down programs (timing only: the down GEMM reads an earlier
  call's output). seq - conc bounds what any early start of the down GEMM can save.
Checked first: `seq` equals the package's fused_moe_aligned bitwise.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, R aligned rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe_aligned  # noqa: E402
from nanomoe_kernels.fused_moe_kernel import check_config, moe_gemm  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_blocks import block_tables  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.gpu.ffn_config_probe import K_TOP, H, I, table_pair  # noqa: E402
from bench.gpu.probe_cases import rounds_us, run_cases  # noqa: E402


def case_fns(E: int, T: int, w: tuple[torch.Tensor, ...]) -> tuple[dict, dict]:
    """({name: fn}, facts) for one case; raises if `seq` differs from fused_moe_aligned."""
    dev = w[0].device
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda", seed=T)
    row_w = tw.reshape(-1).contiguous()
    up_cfg, down_cfg = (check_config(c) for c in table_pair(E, T, dev))
    al = moe_align(ids, E, min(c["SPLIT_M"] or c["BLOCK_M"] for c in (up_cfg, down_cfg)))
    tables = {c["BLOCK_M"]: block_tables(al, c["BLOCK_M"]) for c in (up_cfg, down_cfg)
              if c["BLOCK_M"] > al.block_m}
    inter = x.new_empty((al.sorted_ids.numel(), I))  # [R, I]
    out = x.new_empty((al.num_rows, H))  # [T * k, H]

    def up() -> None:
        moe_gemm(x, w[0], inter, al, up_cfg, gather_a=True, scatter_c=False, a_div=K_TOP, swiglu=True,
                 tables=tables.get(up_cfg["BLOCK_M"]))

    def down() -> None:
        moe_gemm(inter, w[1], out, al, down_cfg, gather_a=False, scatter_c=True, row_weights=row_w,
                 tables=tables.get(down_cfg["BLOCK_M"]))

    def seq() -> None:
        up()
        down()

    streams = (torch.cuda.Stream(), torch.cuda.Stream())

    def conc() -> None:
        main = torch.cuda.current_stream()
        for s, fn in zip(streams, (up, down)):
            s.wait_stream(main)
            with torch.cuda.stream(s):
                fn()
        for s in streams:
            main.wait_stream(s)

    seq()
    want = fused_moe_aligned(x, al, w, "swiglu", up_cfg, down_cfg, a_div=K_TOP, row_weights=row_w)
    if not torch.equal(out, want):
        raise RuntimeError(f"{E}x{T}: seq differs from fused_moe_aligned")
    facts = {"up": up_cfg, "down": down_cfg, "aligned_rows": int(al.num_padded.item())}
    return {"up": up, "down": down, "seq": seq, "conc": conc}, facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_overlap_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,32x4096,64x1024,256x1024")
    a = ap.parse_args()
    weights: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(case: str) -> list[dict]:
        E, T = (int(v) for v in case.split("x"))
        if E not in weights:
            weights.clear()
            weights[E] = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        fns, facts = case_fns(E, T, weights[E])
        us = rounds_us(fns, a.rounds, a.rep_ms)
        med = {n: statistics.median(v) for n, v in us.items()}
        rec = {"case": case, "us": us, "median_us": med, **facts,
               "boundary_us": round(med["seq"] - med["conc"], 1),
               "conc_faster_in": sum(s > c for s, c in zip(us["seq"], us["conc"]))}
        print(json.dumps({k: rec[k] for k in ("case", "median_us", "boundary_us", "conc_faster_in")}), flush=True)
        return [rec]

    out = run_cases("ffn_overlap_probe", a.json, a.cases.split(","), run)
    out["command"] = "python " + " ".join(sys.argv)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
