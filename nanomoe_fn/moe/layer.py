"""`moe_layer`: route -> dispatch -> expert_ffn -> combine, plus the shared experts, as a program of stages.

Dimension legend: T tokens on this rank, H hidden, E logical experts, P physical slots, W ranks.

MOE_PROGRAM names the stages and the values between them (nanomoe_fn/pipeline: stages as data);
`moe_layer` runs it sequentially, `run_moe` under any plan of it (two-batch overlap, the shared experts
inside the dispatch window). Values: x [T, H] -> routing -> dispatch_pending -> batch, handle -> y ->
combine_pending -> routed [T, H]; shared_out [T, H] (or None); out = routed + shared_out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from nanomoe_kernels.activation import swiglu_act

from nanomoe_fn.batch import to_contiguous, to_masked
from nanomoe_fn.checks import check_int_field
from nanomoe_fn.comm.base import Comm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.experts import expert_ffn, get_expert_backend
from nanomoe_fn.moe.param_checks import check_dense, check_params
from nanomoe_fn.moe.params import MoEParams, SharedMLP
from nanomoe_fn.moe.route import route
from nanomoe_fn.pipeline.program import Program, Stage
from nanomoe_fn.pipeline.run import run
from nanomoe_fn.pipeline.schedule import Plan, sequential


def shared_mlp(params: SharedMLP, x: torch.Tensor) -> torch.Tensor:
    """The shared experts as one dense SwiGLU: x [T, H] -> [T, H] (x of the weights' dtype and device)."""
    check_dense("params", params, x)
    return swiglu_act(x @ params.w13.T, x.dtype) @ params.w2.T


@dataclass(frozen=True)
class MoEContext:
    """What the MoE layer's stages need besides parameters and values: static per call (one per
    micro-batch when micro-batches need their own comm)."""

    cfg: MoEConfig
    comm: Comm
    placement: Placement
    backend: str = "bmm"
    capacity: int | None = None


def moe_stages(src: str = "x", dst: str = "out", params_of: Callable[[Any], MoEParams] = lambda p: p,
               ctx_of: Callable[[Any], MoEContext] = lambda c: c) -> tuple[Stage, ...]:
    """The MoE layer's stages on tokens env[src] [T, H] -> env[dst] [T, H]: route, dispatch (send, recv),
    experts, combine (send, recv), shared experts, sum. params_of / ctx_of pick the MoE parameters and
    MoEContext out of a bigger layer's (the decoder layer's) parameters and context."""

    def route_(p: Any, env: dict, c: Any) -> dict:
        return {"routing": route(params_of(p).gate, env[src], ctx_of(c).cfg)}

    def dispatch_send(p: Any, env: dict, c: Any) -> dict:
        ctx = ctx_of(c)
        return {"dispatch_pending": ctx.comm.dispatch_send(env[src], env["routing"], ctx.placement)}

    def dispatch_recv(p: Any, env: dict, c: Any) -> dict:
        batch, handle = ctx_of(c).comm.dispatch_recv(env["dispatch_pending"])
        return {"batch": batch, "handle": handle}

    def experts(p: Any, env: dict, c: Any) -> dict:
        ctx, ex, batch = ctx_of(c), params_of(p).experts, env["batch"]
        if ctx.capacity is None or batch.layout == "masked":
            return {"y": expert_ffn(ex, batch, ctx.backend)}
        return {"y": to_contiguous(expert_ffn(ex, to_masked(batch, ctx.capacity), ctx.backend), batch)}

    def combine_send(p: Any, env: dict, c: Any) -> dict:
        return {"combine_pending": ctx_of(c).comm.combine_send(env["y"], env["handle"])}

    def combine_recv(p: Any, env: dict, c: Any) -> dict:
        return {"routed": ctx_of(c).comm.combine_recv(env["combine_pending"])}

    def shared(p: Any, env: dict, c: Any) -> dict:
        sh = params_of(p).shared
        return {"shared_out": None if sh is None else shared_mlp(sh, env[src])}

    def add(p: Any, env: dict, c: Any) -> dict:
        sh = env["shared_out"]
        return {dst: env["routed"] if sh is None else env["routed"] + sh}

    return (Stage("route", route_, (src,), ("routing",)),
            Stage("dispatch_send", dispatch_send, (src, "routing"), ("dispatch_pending",), "send", "dispatch"),
            Stage("dispatch_recv", dispatch_recv, ("dispatch_pending",), ("batch", "handle"), "recv", "dispatch"),
            Stage("experts", experts, ("batch",), ("y",)),
            Stage("combine_send", combine_send, ("y", "handle"), ("combine_pending",), "send", "combine"),
            Stage("combine_recv", combine_recv, ("combine_pending",), ("routed",), "recv", "combine"),
            Stage("shared", shared, (src,), ("shared_out",)),
            Stage("add", add, ("routed", "shared_out"), (dst,)))


def split_tokens(inputs: dict, n: int) -> list[dict]:
    """x [T, H] -> n micro-batches of consecutive tokens, sizes differing by at most one (some may be empty)."""
    T = inputs["x"].shape[0]
    bounds = [T * i // n for i in range(n + 1)]
    return [{**inputs, "x": inputs["x"][bounds[i]:bounds[i + 1]]} for i in range(n)]


def _merge_tokens(outs: list) -> torch.Tensor:
    return torch.cat(outs, 0)


MOE_PROGRAM = Program("moe", moe_stages(), ("x",), "out", split_tokens, _merge_tokens).check()
_SEQUENTIAL = sequential(MOE_PROGRAM)


def run_moe(
    plan: Plan,
    params: MoEParams,
    x: torch.Tensor,
    cfg: MoEConfig,
    comm: Comm | Sequence[Comm] | None = None,
    placement: Placement | None = None,
    backend: str = "bmm",
    capacity: int | None = None,
) -> torch.Tensor:
    """The MoE layer (moe_layer's arguments) under a plan of MOE_PROGRAM (sequential, two_batch_overlap,
    a shared-expert-overlap program...). comm: one comm, or one per micro-batch (two for two-batch
    overlap on a comm with one dispatch in flight per instance, such as nvlink)."""
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    comms = list(comm) if isinstance(comm, (list, tuple)) else [comm if comm is not None else LocalComm()]
    if not comms or not all(hasattr(c, "dispatch_send") and hasattr(c, "world_size") for c in comms):
        raise TypeError(f"comm must be a comm (make_comm, LocalComm...) or a list of them, got "
                        f"{[type(c).__name__ for c in comms]}")
    placement = placement if placement is not None else Placement.identity(cfg.num_experts, comms[0].world_size)
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement, got {type(placement).__name__}")
    check_params(params, cfg, x, num_experts=placement.local_experts)
    check_capacity(capacity)
    get_expert_backend(backend, cfg, x.device)
    check_shared_comm(plan, comms, backend, capacity)
    ctxs = [MoEContext(cfg, c, placement, backend, capacity) for c in comms]
    return run(plan, params, {"x": x}, ctxs if len(ctxs) > 1 else ctxs[0])


def check_capacity(capacity: object, owner: str = "moe_layer") -> None:
    """capacity: None or an int >= 1 (rows per expert of the masked layout); TypeError/ValueError naming
    `owner`.capacity otherwise."""
    if capacity is not None:
        check_int_field(owner, "capacity", capacity)


def check_shared_comm(plan: Plan, comms: Sequence[Any], backend: str = "triton", capacity: int | None = None) -> None:
    """A plan with several micro-batches over one comm needs a comm that lets them share it
    (`shares_micro_batches`, default yes); an OpComm whose batch size depends on the routing (comm/ops.py) needs
    an expert backend that traces such a batch (triton) or a capacity. ValueError naming the comm otherwise."""
    if plan.micro_batches > 1 and len(comms) == 1 and not getattr(comms[0], "shares_micro_batches", True):
        raise ValueError(f"comm {comms[0].name!r} cannot carry {plan.micro_batches} micro-batches on one instance "
                         f"(plan {plan.name!r}): pass one comm per micro-batch, or a sequential plan")
    sized = [c.name for c in comms if c.name.startswith("op:") and getattr(c, "rows", 0) is None]
    if sized and backend != "triton" and capacity is None:
        raise ValueError(f"comm {sized[0]!r} hands over batches sized by the routing (unbacked sizes under "
                         f"torch.compile), which expert backend {backend!r} cannot trace (it reads the counts on the "
                         f"host): use backend='triton', a capacity, or a decode-mode comm")


def moe_layer(
    params: MoEParams,
    x: torch.Tensor,
    cfg: MoEConfig,
    comm: Comm | None = None,
    placement: Placement | None = None,
    backend: str = "bmm",
    capacity: int | None = None,
) -> torch.Tensor:
    """One MoE layer on this rank's tokens x [T, H] -> [T, H]: `sequential` of MOE_PROGRAM's stages
    (route, dispatch, experts, combine, shared experts, sum).

    params holds this rank's local experts (see params.shard_moe_params); with the default local comm and
    identity placement they are all the experts. With `capacity`, experts run on the masked
    layout [P_local, capacity, H] (fixed shapes; more rows than capacity is an error, not a drop);
    a comm that already delivers the masked layout (torch_fixed) needs no conversion.
    Parameters and x are checked against cfg first (check_params: host-only); NaN/inf in x or router
    logits that overflow float32 are an error (a device assert on accelerators, see route).
    """
    return run_moe(_SEQUENTIAL, params, x, cfg, comm, placement, backend, capacity)
