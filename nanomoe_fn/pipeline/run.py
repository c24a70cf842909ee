"""Run a plan: split the inputs into micro-batches, execute the steps in order, merge the outputs.

Dimension legend: none (values are whatever the program's stages pass; the MoE layer's are in moe.py).

Each micro-batch has its own environment (name -> value) and its own context (the comm, placement,
config...); a schedule that keeps two exchanges in flight at once on a comm that allows one dispatch
in flight per instance (nvlink) gets one context per micro-batch. Every step runs inside a named scope
(`program/stage/mbN`), so a timeline shows what ran when: a torch.profiler range while that profiler
records, an NVTX range (for nsys) when NANOMOE_NVTX=1 was set at import and CUDA is there, else nothing
(a range costs ~6 us of host time on a fast CPU, and eager decode is host-bound), and nothing while
torch.compile traces. The steps run on the current stream in plan order: an exchange overlaps
the other micro-batch's compute through the comm's own asynchrony (NCCL's stream for `torch`, DeepEP's
async handles), not through streams chosen here.
"""

from __future__ import annotations

import contextlib
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


def run(plan: Plan, params: Any, inputs: dict, ctx: Any | Sequence[Any]) -> Any:
    """Execute `plan` on inputs (a dict with the program's input names) -> the program's output.

    ctx: the context every stage gets, or a list/tuple with one per micro-batch. With more than one
    micro-batch the program's `split` cuts the inputs and its `merge` joins the outputs.
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
    for mb, stage in plan.steps:
        env = envs[mb]
        with scope(f"{program.name}/{stage.name}/mb{mb}"):
            out = stage.fn(params, env, ctxs[mb])
        env.update(out)
    outs = [env[program.output] for env in envs]
    return outs[0] if n == 1 else program.merge(outs)
