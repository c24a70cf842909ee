"""A timeline figure from a torch.profiler trace of bench_layer.py --profile: what each micro-batch's host
thread issues, stage by stage, and when the GPU runs it.

    python bench/plot_timeline.py TRACE.json [TRACE2.json ...] --out timeline.png [--iteration 1]

Dimension legend: none (times in microseconds from the start of the plotted call).

Rows: per micro-batch, the host span of each stage (the `program/stage/mbN` ranges the pipeline executor
records while the profiler runs), and per CUDA stream and micro-batch the GPU span of each stage's kernels
(torch.profiler's gpu_user_annotation events, matched to their host range by its External id). One panel
per trace, stacked; the iteration picks which of the traced calls (each starts at a micro-batch 0 `route`).
Needs matplotlib
(`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import re

RANGE = re.compile(r"^(?P<program>[\w+@]+)/(?P<stage>\w+)/mb(?P<mb>\d+)$")


def stage_spans(trace: dict, iteration: int) -> tuple[list, list]:
    """(host spans, gpu spans) of one traced call: (row label, stage, start us, duration us)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and RANGE.match(e.get("name", ""))]
    host = sorted((e for e in events if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    gpu = sorted((e for e in events if e.get("cat") == "gpu_user_annotation"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in host if RANGE.match(e["name"])["stage"] == "route"
              and RANGE.match(e["name"])["mb"] == "0"]
    if not starts:
        raise ValueError("the trace holds no pipeline ranges (run bench_layer.py with --profile)")
    it = min(iteration, len(starts) - 1)
    t0, t1 = starts[it], starts[it + 1] if it + 1 < len(starts) else float("inf")
    pick = [e for e in host if t0 <= e["ts"] < t1]
    rows_h = [(f"host mb{RANGE.match(e['name'])['mb']}", RANGE.match(e["name"])["stage"], e["ts"] - t0, e["dur"])
              for e in pick]
    ids = {e.get("args", {}).get("External id") for e in pick}  # a GPU range carries its host range's id
    rows_g = [(f"GPU stream {e.get('tid', '?')} mb{RANGE.match(e['name'])['mb']}", RANGE.match(e["name"])["stage"],
               e["ts"] - t0, e["dur"]) for e in gpu if e.get("args", {}).get("External id") in ids]
    return rows_h, rows_g


def plot(paths: list[str], out: str, iteration: int) -> None:
    """One panel per trace, saved to out (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["route", "dispatch_send", "dispatch_recv", "experts", "combine_send", "combine_recv", "shared", "add"]
    colors = dict(zip(stages, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(paths), 1, figsize=(12, 2.2 * len(paths) + 0.6), squeeze=False)
    for ax, path in zip(axes[:, 0], paths):
        with open(path) as f:
            host, gpu = stage_spans(json.load(f), iteration)
        labels = sorted({r[0] for r in host + gpu}, key=lambda s: (not s.startswith("host"), s))
        for label, stage, start, dur in host + gpu:
            ax.barh(labels.index(label), dur, left=start, color=colors.get(stage, "grey"), edgecolor="black",
                    linewidth=0.3)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_title(os.path.basename(path).removesuffix(".json"), fontsize=9)
        ax.set_xlabel("us from the call's start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[s]) for s in stages]
    fig.legend(handles, stages, loc="lower center", ncol=len(stages), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and draw."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--out", default="timeline.png")
    p.add_argument("--iteration", type=int, default=1, help="which traced call (0 = the first)")
    args = p.parse_args(argv)
    plot(args.traces, args.out, args.iteration)


if __name__ == "__main__":
    main()
