"""Stage times of a layer program for bench/bench_layer.py: what the ideal two-batch-overlap time is built from.

Dimension legend: T tokens per rank (the values are the MoE layer's: moe/layer.py).

- `timed_stages` / `stage_medians`: each stage of a plan with CUDA events around it, eager (host time that
  leaves the GPU idle counts: what an eager call pays).
- `graph_stage_times`: GPU time only, for the CUDA-graph rows: the whole sequential plan captured as one
  graph, and each compute stage captured alone on the values an eager pass produced; the exchanges' time is
  the whole minus the compute stages (an exchange's two halves cannot be replayed apart from its peers').
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.common import capture_graph, slowest, time_events
from nanomoe_fn.pipeline import Plan


def timed_stages(plan: Plan, device: torch.device) -> tuple[Plan, dict]:
    """The plan with CUDA events (wall clock on CPU) around each stage; times[name] collects seconds."""
    import time

    times: dict[str, list] = {}

    def wrap(stage):  # noqa: ANN001, ANN202 - a Stage
        def fn(p, env, c):  # noqa: ANN001, ANN202
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = stage.fn(p, env, c)
                b.record()
                times.setdefault(stage.name, []).append((a, b))
            else:
                t = time.perf_counter()
                out = stage.fn(p, env, c)
                times.setdefault(stage.name, []).append(time.perf_counter() - t)
            return out
        return replace(stage, fn=fn)

    return replace(plan, steps=tuple((mb, wrap(s)) for mb, s in plan.steps)), times


def stage_medians(times: dict, device: torch.device) -> dict:
    """Median seconds per stage, the slowest rank's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = {k: [a.elapsed_time(b) * 1e-3 for a, b in v] for k, v in times.items()}
    names = sorted(times)
    meds = slowest([statistics.median(times[n]) for n in names], device)
    return dict(zip(names, meds))


def graph_stage_times(plan: Plan, params: object, x: torch.Tensor, ctx: object, whole: Callable[[], object],
                      device: torch.device, warmup: int, iters: int,
                      barrier: Callable[[], None] | None) -> dict:
    """GPU seconds (the slowest rank's medians) of `whole` (the sequential plan on x, a callable every rank
    makes) as a graph ("layer"), of each compute stage of `plan` as a graph on the values of one eager pass
    (params, ctx: what the stages take), and "exchanges" = layer - the compute stages."""
    env = {"x": x}
    for _, stage in plan.steps:
        env.update(stage.fn(params, env, ctx))
    graphs = {"layer": capture_graph(whole)[0]}
    for _, stage in plan.steps:
        if stage.kind == "compute":
            graphs[stage.name] = capture_graph(lambda s=stage: s.fn(params, env, ctx))[0]
    names = list(graphs)
    meds = [statistics.median(time_events(graphs[n].replay, device, warmup, iters, barrier)) for n in names]
    times = dict(zip(names, slowest(meds, device)))
    times["exchanges"] = max(0.0, times["layer"] - sum(v for k, v in times.items() if k != "layer"))
    return times
