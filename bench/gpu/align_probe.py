"""One GPU: `moe_align`'s three kernels by grid shape. The offsets kernel on one program (as before the grid) or on
its grid, and the histogram chunk at 1024 rows (as before `chunk_rows`) or at `chunk_rows(N)`, per case.

    python bench/gpu/align_probe.py --json out.json [--cases 32x1024x16,128x4096x64] [--rounds 5]

A case is E x T x BM (experts, tokens, alignment block; top-8 routing from reference.expert_rows.make_routing, so
N = 8 T rows). Every variant is checked against the first (bitwise: sorted ids, expert ids and padded counts up to
the rows in use), then timed in interleaved rounds: do_bench's median of the call (host included: three launches)
and the profiler's per-kernel split (no flush, three calls after a warm-up). Dimension legend: T tokens, E experts,
N rows, BM block rows.
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
import nanomoe_kernels.moe_align as ma  # noqa: E402
from nanomoe_reference.expert_rows import make_routing  # noqa: E402

from bench.gpu.ffn_layout_probe import kernel_breakdown  # noqa: E402

K_TOP = 8
# name -> (offsets programs cap, chunk): "one_1024" is the kernels as they were before the grid and chunk_rows
# (in run 270, chunk_rows had a 256-row floor)
VARIANTS = {"one_1024": (1, 1024), "grid_1024": (ma._OFFSET_PROGRAMS, 1024), "one_auto": (1, None),
            "grid_auto": (ma._OFFSET_PROGRAMS, None)}


def align_fn(ids: torch.Tensor, E: int, bm: int, variant: str):
    """A call of moe_align under the variant's grid cap and chunk."""
    programs, chunk = VARIANTS[variant]

    def fn():
        ma._OFFSET_PROGRAMS = programs
        return ma.moe_align(ids, E, bm, chunk=chunk)
    return fn


def same(a: ma.Alignment, b: ma.Alignment) -> bool:
    """Bitwise the same alignment over the rows in use."""
    used = int(a.num_padded[0])
    return (used == int(b.num_padded[0]) and torch.equal(a.sorted_ids[:used], b.sorted_ids[:used])
            and torch.equal(a.expert_ids[:used // a.block_m], b.expert_ids[:used // b.block_m])
            and torch.equal(a.padded_counts, b.padded_counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="align_probe.json")
    ap.add_argument("--cases", default="32x1024x16,32x1024x64,128x4096x64,128x4096x16,256x4096x64,32x16384x64,"
                                       "256x16384x64,256x64x16")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    default_programs = ma._OFFSET_PROGRAMS
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "cases": []}
    for case in a.cases.split(","):
        E, T, bm = (int(v) for v in case.split("x"))
        ids, _ = make_routing(T, E, K_TOP, "cuda", seed=T)
        fns = {v: align_fn(ids, E, bm, v) for v in VARIANTS}
        want = fns["one_1024"]()
        rec = {"case": case, "rows": T * K_TOP, "chunk_rows": ma.chunk_rows(T * K_TOP), "match": {},
               "us": {v: [] for v in fns}, "kernels": {}}
        for v, fn in fns.items():
            rec["match"][v] = same(want, fn())
            rec["kernels"][v] = kernel_breakdown(fn)
        for r in range(a.rounds):
            for v in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                rec["us"][v].append(round(triton.testing.do_bench(fns[v], rep=50, return_mode="median") * 1e3, 2))
        rec["median_us"] = {v: round(statistics.median(t), 2) for v, t in rec["us"].items()}
        rec["kernel_sum_us"] = {v: round(sum(k.values()), 1) for v, k in rec["kernels"].items()}
        print(json.dumps({k: rec[k] for k in ("case", "chunk_rows", "match", "median_us", "kernel_sum_us")}),
              flush=True)
        out["cases"].append(rec)
    ma._OFFSET_PROGRAMS = default_programs
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
