"""`moe_layer`: route -> dispatch -> expert_ffn -> combine, plus the shared experts.

Dimension legend: T tokens on this rank, H hidden, E logical experts, P physical slots, W ranks.
"""

from __future__ import annotations

import torch

from kernels.activation import swiglu_act
from nanomoe_fn.batch import to_contiguous, to_masked
from nanomoe_fn.comm.base import Comm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.dispatch import combine, dispatch
from nanomoe_fn.moe.experts import expert_ffn, get_expert_backend
from nanomoe_fn.moe.params import MoEParams, SharedMLP, check_params
from nanomoe_fn.moe.route import route


def shared_mlp(params: SharedMLP, x: torch.Tensor) -> torch.Tensor:
    """The shared experts as one dense SwiGLU: x [T, H] -> [T, H]."""
    return swiglu_act(x @ params.w13.T, x.dtype) @ params.w2.T


def moe_layer(
    params: MoEParams,
    x: torch.Tensor,
    cfg: MoEConfig,
    comm: Comm | None = None,
    placement: Placement | None = None,
    backend: str = "bmm",
    capacity: int | None = None,
) -> torch.Tensor:
    """One MoE layer on this rank's tokens x [T, H] -> [T, H].

    params holds this rank's local experts (see params.shard_moe_params); with the default local comm and
    identity placement they are all the experts. With `capacity`, experts run on the masked
    layout [P_local, capacity, H] (fixed shapes; more rows than capacity is an error, not a drop);
    a comm that already delivers the masked layout (torch_fixed) needs no conversion.
    Parameters and x are checked against cfg first (check_params: host-only); NaN/inf in x or router
    logits that overflow float32 are an error (a device assert on accelerators, see route).
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    comm = comm if comm is not None else LocalComm()
    placement = placement if placement is not None else Placement.identity(cfg.num_experts, comm.world_size)
    check_params(params, cfg, x, num_experts=placement.local_experts)
    get_expert_backend(backend, cfg, x.device)
    routing = route(params.gate, x, cfg)
    batch, handle = dispatch(x, routing, comm, placement)
    if capacity is None or batch.layout == "masked":
        y = expert_ffn(params.experts, batch, backend)
    else:
        y = to_contiguous(expert_ffn(params.experts, to_masked(batch, capacity), backend), batch)
    out = combine(y, handle, comm)
    if params.shared is not None:
        out = out + shared_mlp(params.shared, x)
    return out
