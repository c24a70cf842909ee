"""The case loop of the one-GPU probes: ceilings measured before and after, the JSON rewritten after every case
(a cut run keeps what finished), an optional time budget past which cases are listed as skipped.

Dimension legend: none (bookkeeping around the probes' own cases).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch
import triton
import triton.testing

from bench.common import measure_ceilings, round_order


def run_cases(bench: str, path: str, items: list[str], run: Callable[[str], list[dict]],
              budget_s: float | None = None) -> dict:
    """{bench, versions, ceilings_before, cases (what run(item) returned, in order), ceilings_after} written to
    path after every item; items left when budget_s seconds have passed go to skipped_for_time."""
    t0, dev = time.monotonic(), torch.device("cuda")
    out = {"bench": bench, "torch": torch.__version__, "triton": triton.__version__,
           "ceilings_before": measure_ceilings(dev, torch.bfloat16), "cases": []}
    for item in items:
        if budget_s is not None and time.monotonic() - t0 > budget_s:
            out.setdefault("skipped_for_time", []).append(item)
            continue
        out["cases"] += run(item)
        torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    out["ceilings_after"] = measure_ceilings(dev, torch.bfloat16)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def rounds_us(fns: dict[str, Callable[[], object]], rounds: int, rep_ms: int) -> dict[str, list[float]]:
    """{name: [us per round]}: each fn timed once a round (do_bench median, 25 ms warm-up, rep_ms window, L2
    flushed), in bench.common.round_order's order, so no fn keeps its place or its neighbour (under the H200's
    power cap a window's median moves with what ran just before it)."""
    order, us = list(fns), {n: [] for n in fns}
    for rnd in range(rounds):
        for name in round_order(order, rnd):
            ms = triton.testing.do_bench(fns[name], warmup=25, rep=rep_ms, return_mode="median")
            us[name].append(round(ms * 1e3, 1))
    return us


def add_medians(variants: dict[str, dict], flops: float) -> None:
    """Each variant record with a non-empty "us" list gains "median_us" and "tflops" (flops over the median)."""
    for v in variants.values():
        if v.get("us"):
            v["median_us"] = statistics.median(v["us"])
            v["tflops"] = round(flops / (v["median_us"] * 1e-6) / 1e12, 1)
