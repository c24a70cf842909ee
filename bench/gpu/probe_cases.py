"""The case loop of the one-GPU probes: ceilings measured before and after, the JSON rewritten after every case
(a cut run keeps what finished), an optional time budget past which cases are listed as skipped.

Dimension legend: none (bookkeeping around the probes' own cases).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
import triton

from bench.common import measure_ceilings


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
