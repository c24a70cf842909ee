"""Run a plan: split the inputs into micro-batches, execute the steps in order, merge the outputs.

Dimension legend: none (values are whatever the program's stages pass; the MoE layer's are in moe.py).

Each micro-batch has its own environment (name -> value) and its own context (the comm, placement,
config...); a schedule that keeps two exchanges in flight at once on a comm that allows one dispatch
in flight per instance (nvlink) gets one context per micro-batch. Every step runs inside a named scope
(`program/stage/mbN`): an NVTX range on GPUs, so a profiler timeline shows the overlap; nothing on CPUs
or while torch.compile traces. The steps run on the current stream in plan order: an exchange overlaps
the other micro-batch's compute through the comm's own asynchrony (NCCL's stream for `torch`, DeepEP's
async handles), not through streams chosen here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from nanomoe_fn.pipeline.schedule import Plan


def scope(name: str) -> contextlib.AbstractContextManager:
    """An NVTX range named `name` on a CUDA build with a GPU (not while torch.compile traces), else nothing."""
    if torch.compiler.is_compiling() or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return torch.cuda.nvtx.range(name)


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
