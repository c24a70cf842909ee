"""MLA decode graph replays timed after three L2 states: zeroed 256 MB (what do_bench does), read 256 MB, none.

    python bench/gpu/mla_flush_probe.py --out $OUT/mla_flush_probe.json

do_bench's flush writes zeros, so the L2 is full of dirty lines and a kernel that reads from HBM first writes
them back; a read flush leaves clean lines (what a decode step finds after the previous layer's GEMMs read their
weights); with no flush a small replay is timed behind the host's launches. Also a graph of one and of two
one-element kernels under each, for what the timing itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nanomoe_kernels.mla_decode import mla_decode  # noqa: E402

from bench.gpu.mla_small_probe import SCALE, C, make  # noqa: E402
from bench.mla_cases import capture_graph, read_flush, us_after  # noqa: E402

SHAPES = [(128, 1, 16384, True), (128, 1, 4096, True), (16, 1, 16384, True), (128, 4, 16384, True),
          (128, 32, 16384, True), (16, 128, 16384, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mla_flush_probe.json")
    args = ap.parse_args()
    buf = torch.ones(1 << 26, dtype=torch.float32, device="cuda")
    flushes = {"zero_write": buf.zero_, "read": read_flush(), "none": lambda: None}
    x = torch.zeros(1, device="cuda")
    res: dict = {"device": torch.cuda.get_device_name(), "floors": {}, "cases": []}
    for name, body in (("one_kernel", lambda: x.add_(1)), ("two_kernel", lambda: x.add_(1).mul_(1))):
        graph = capture_graph(body)
        res["floors"][name] = {f: round(us_after(graph.replay, fl, 300), 2) for f, fl in flushes.items()}
    print(json.dumps(res["floors"]), flush=True)
    for heads, rows, ctx, paged in SHAPES:
        q, kv, lens, table = make(heads, rows, ctx, paged)
        graph = capture_graph(lambda q=q, kv=kv, lens=lens, table=table:
                              mla_decode(q, kv, lens, C, SCALE, block_table=table))
        rec = {"heads": heads, "rows": rows, "context": ctx, "paged": paged,
               "us": {f: [round(us_after(graph.replay, fl, 300), 2) for _ in range(3)] for f, fl in flushes.items()}}
        rec["median_us"] = {f: statistics.median(v) for f, v in rec["us"].items()}
        print(json.dumps(rec), flush=True)
        res["cases"].append(rec)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
