"""Stage times of a layer program for bench/bench_layer.py: what the ideal two-batch-overlap time is built from.

Dimension legend: T tokens per rank (the values are those of the layer's program: bench/layer_cases.py).

- `timed_stages` / `stage_medians`: each stage of a plan with CUDA events around it, eager (host time that
  leaves the GPU idle counts: what an eager call pays).
- `eager_stage_times`: those medians for one input; `annotate_rows`: the per-row figures built from them;
  `profile`: torch.profiler traces of the variants.
- `graph_stage_times`: GPU time only, for the CUDA-graph rows: the whole sequential plan captured as one
  graph, and each compute stage captured alone on the values an eager pass produced; the exchanges' time is
  the whole minus the compute stages (an exchange's two halves cannot be replayed apart from its peers').
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import replace

import torch

from bench.common import capture_graph, sig, slowest, time_events
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


def graph_stage_times(plan: Plan, params: object, inputs: dict, ctx: object, whole: Callable[[], object],
                      device: torch.device, warmup: int, iters: int,
                      barrier: Callable[[], None] | None) -> dict:
    """GPU seconds (the slowest rank's medians) of `whole` (the sequential plan on inputs, a callable every
    rank makes) as a graph ("layer"), of each compute stage of `plan` as a graph on the values of one eager
    pass (params, ctx: what the stages take), and "exchanges" = layer - the compute stages."""
    env = dict(inputs)
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


def eager_stage_times(plan: Plan, call: Callable[[Plan, dict], object], inputs: dict, device: torch.device,
                      warmup: int, iters: int, barrier: Callable[[], None] | None) -> dict:
    """Seconds per stage of `plan` run eagerly by call(plan, inputs) (every rank makes the calls): the slowest
    rank's medians after `warmup` calls."""
    timed, times = timed_stages(plan, device)
    for _ in range(warmup + iters):
        if barrier:
            barrier()
        call(timed, inputs)
    return stage_medians({k: v[warmup:] for k, v in times.items()}, device)


def annotate_rows(rows: list[dict], med: dict, alone: dict, graph: dict | None, ideal: dict) -> None:
    """Add to each row of bench_layer: speedup_vs.sequential (against the sequential row of its kind: eager,
    +compile, +graph, +fullgraph), stage_us (eager stage times, GPU-only ones for +graph rows, with
    stage_half_us), ideal_us and share_of_ideal (TBO rows), shared_hidden and shared_us (shared-overlap rows).
    med: median seconds per variant; alone / graph: {"T", "T/2"} -> stage seconds; ideal: {"" | "+graph": s}."""
    for row in rows:
        v = row["variant"]
        base = med["sequential" + next((t for t in ("+compile", "+graph", "+fullgraph") if v.endswith(t)), "")]
        row["speedup_vs"] = {"sequential": sig(base / med[v])}
        on_graph = v.endswith("+graph")
        stages = graph["T"] if on_graph else alone["T"]
        row["stage_us"] = {k: sig(s * 1e6) for k, s in stages.items()}
        if on_graph:
            row["stage_half_us"] = {k: sig(s * 1e6) for k, s in graph["T/2"].items()}
        kind = "+graph" if on_graph else ""
        if v.startswith("tbo") and kind in ideal:
            row["ideal_us"] = sig(ideal[kind] * 1e6)
            row["share_of_ideal"] = sig(ideal[kind] / med[v])
        if "shared" in v and not v.startswith("tbo"):
            row["shared_hidden"] = sig((base - med[v]) / max(stages["shared"], 1e-9))
            row["shared_us"] = sig(stages["shared"] * 1e6)


def profile(variants: dict, out_dir: str, tag: str, trace: bool) -> None:
    """A torch.profiler trace (chrome JSON) of three calls of each variant, written where `trace` (rank 0);
    every rank makes the calls (they are collectives)."""
    import contextlib

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.makedirs(out_dir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for v, fn in variants.items():
        with torch_profile(activities=acts) if trace else contextlib.nullcontext() as prof:
            for _ in range(3):
                fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        if trace:
            prof.export_chrome_trace(os.path.join(out_dir, f"layer_{tag}_{v.replace('+', '_')}.json"))
