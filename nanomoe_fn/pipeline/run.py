"""Run a plan: split the inputs into micro-batches, execute the steps in order, merge the outputs.

Dimension legend: none (values are whatever the program's stages pass; the MoE layer's are in moe.py).

Each micro-batch has its own environment (name -> value) and its own context (the comm, placement,
config...); a schedule that keeps two exchanges in flight at once on a comm that allows one dispatch
in flight per instance (nvlink) gets one context per micro-batch. Every step runs inside a named scope
(`program/stage/mbN`), so a timeline shows what ran when: a torch.profiler range while that profiler
records, an NVTX range (for nsys) when NANOMOE_NVTX=1 was set at import and CUDA is there, else nothing
(a range costs ~6 us of host time on a fast CPU, and eager decode is host-bound), and nothing while
torch.compile traces.

Streams (streams.py, on CUDA): an exchange with work in its window runs on its micro-batch's exchange
stream, so NVLink kernels, NCCL calls and their waits run beside the compute queued in the window (and a
host read inside an exchange waits only for that exchange's stream, not for the other micro-batch's
experts); events order the streams as the stages' declared values require. On CPUs, while torch.compile
traces, and for plans whose exchanges have empty windows (sequential), every step runs on the current
stream. A compute stage that names a stream (the shared experts) runs on its own at the lowest priority,
and lane 0's steps then run on a critical stream above it (forked from and joined to the current stream),
so the critical path's small kernels are scheduled before that stage's queued GEMM blocks. Side streams are
made once per device, lane and role (exchanges at the highest priority).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd import profiler as _profiler

from nanomoe_fn.pipeline.schedule import Plan

_NVTX = os.environ.get("NANOMOE_NVTX", "0") not in ("", "0")


def scope(name: str) -> contextlib.AbstractContextManager:
    """A range named `name` for the timeline (module docstring): torch.profiler's while it records, NVTX
    with NANOMOE_NVTX=1 on CUDA, else (and while torch.compile traces) nothing."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _profiler._is_profiler_enabled:
        return _profiler.record_function(name)
    if _NVTX and torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


@functools.cache
def side_stream(device_index: int, lane: int, role: str) -> torch.cuda.Stream:
    """The stream of `lane` on a CUDA device, made once. role: "exchange" (the highest priority: an exchange's
    few blocks start ahead of queued GEMM blocks), "critical" (lane 0's steps, when the plan also has a
    compute stage on its own stream: next priority) or "side" (such a compute stage: the default, lowest
    priority, so it fills what the critical path leaves)."""
    lo, hi = torch.cuda.Stream.priority_range()  # lo: the lowest priority (0), hi: the highest (negative)
    priority = {"exchange": hi, "critical": min(lo, hi + 1) if hi < lo - 1 else hi, "side": lo}[role]
    return torch.cuda.Stream(device=device_index, priority=priority)


def _device(inputs: dict) -> torch.device | None:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def run(plan: Plan, params: Any, inputs: dict, ctx: Any | Sequence[Any]) -> Any:
    """Execute `plan` on inputs (a dict with the program's input names) -> the program's output.

    ctx: the context every stage gets, or a list/tuple with one per micro-batch. With more than one
    micro-batch the program's `split` cuts the inputs and its `merge` joins the outputs. Exchanges with
    work in their window run on exchange streams on CUDA (module docstring).
    """
    program, n = plan.program, plan.micro_batches
    missing = [k for k in program.inputs if k not in inputs]
    if missing:
        raise ValueError(f"inputs must hold {list(program.inputs)} for program {program.name!r}, missing {missing}")
    ctxs = list(ctx) if isinstance(ctx, (list, tuple)) else [ctx] * n
    if len(ctxs) != n:
        raise ValueError(f"ctx must be one context or {n} (one per micro-batch), got {len(ctxs)}")
    if n == 1:
        envs = [dict(inputs)]
    elif program.split is None or program.merge is None:
        raise ValueError(f"program {program.name!r} has no split/merge: it cannot run as {n} micro-batches")
    else:
        envs = [dict(part) for part in program.split(inputs, n)]
    sp, dev = plan.streams, _device(inputs)
    if sp.side_lanes and dev is not None and dev.type == "cuda" and not torch.compiler.is_compiling():
        _run_on_streams(plan, params, envs, ctxs, dev)
    else:
        compiling = torch.compiler.is_compiling()  # no range names then: dynamo may see mb as a symbolic int
        for mb, stage in plan.steps:
            with contextlib.nullcontext() if compiling else scope(f"{program.name}/{stage.name}/mb{mb}"):
                envs[mb].update(stage.fn(params, envs[mb], ctxs[mb]))
    outs = [env[program.output] for env in envs]
    return outs[0] if n == 1 else program.merge(outs)


def _run_on_streams(plan: Plan, params: Any, envs: list[dict], ctxs: list, dev: torch.device) -> None:
    """The steps on their lanes: fork the side streams, order them with events, join them (streams.py).
    A plan with a compute stage on its own stream runs lane 0 on a critical stream above that one's priority."""
    sp, main = plan.streams, torch.cuda.current_stream(dev)
    lanes = {0: main} | {lane: side_stream(dev.index, lane, "exchange" if high else "side")
                         for lane, high in zip(sp.side_lanes, sp.high)}
    if not all(sp.high):
        lanes[0] = side_stream(dev.index, 0, "critical")
    forked = [s for s in lanes.values() if s != main]
    for stream in forked:
        stream.wait_stream(main)
    events: dict[int, torch.cuda.Event] = {}
    for i, (mb, stage) in enumerate(plan.steps):
        stream = lanes[sp.lanes[i]]
        for w in sp.waits[i]:
            stream.wait_event(events[w])
        with scope(f"{plan.program.name}/{stage.name}/mb{mb}"), (
                torch.cuda.stream(stream) if stream != main else contextlib.nullcontext()):
            envs[mb].update(stage.fn(params, envs[mb], ctxs[mb]))
            if sp.records[i]:
                events[i] = torch.cuda.Event()
                events[i].record(stream)
    for stream in forked:
        main.wait_stream(stream)
