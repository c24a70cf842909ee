"""NanoMoE functional core: pure stage functions over explicit parameter pytrees.

route -> dispatch -> expert_ffn -> combine (moe_layer composes them); mla (DeepSeek-V3 attention,
prefill and weight-absorbed decode over the compressed cache); configs in config.py,
parameters in params.py, expert placement in placement.py, comm backends in comm/.
"""

from nanomoe_fn.attention.cache import ContiguousCache, PagedCache, init_contiguous_cache, init_paged_cache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.mla import MLAParams, init_mla_params, mla
from nanomoe_fn.batch import ExpertBatch, Handle, HandleOrigin
from nanomoe_fn.comm import COMM_BACKENDS, LocalComm, NvlinkComm, TorchComm, TorchFixedComm, make_comm, supports_comm
from nanomoe_fn.comm.handshake import handshake
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import PRESETS, MoEConfig, preset
from nanomoe_fn.moe.dispatch import combine, dispatch
from nanomoe_fn.moe.experts import EXPERT_BACKENDS, expert_ffn, get_expert_backend
from nanomoe_fn.moe.layer import cast_params, moe_layer, shard_moe_params, shared_mlp
from nanomoe_fn.moe.params import (
                               GateParams,
                               LinearExperts,
                               MoEParams,
                               SharedMLP,
                               SwiGLUExperts,
                               check_params,
                               expert_tensors,
                               init_moe_params,
)
from nanomoe_fn.moe.route import Routing, route

__all__ = [
    "COMM_BACKENDS", "EXPERT_BACKENDS", "PRESETS", "ExpertBatch", "GateParams", "Handle", "LinearExperts",
    "LocalComm", "MoEConfig", "NvlinkComm", "MoEParams", "Placement", "Routing", "SharedMLP", "SwiGLUExperts",
    "TorchComm", "TorchFixedComm",
    "HandleOrigin", "cast_params", "check_params", "combine", "handshake", "dispatch", "expert_ffn",
    "expert_tensors", "get_expert_backend",
    "init_moe_params", "make_comm", "moe_layer", "preset", "route", "shard_moe_params", "shared_mlp",
    "supports_comm", "mla", "MLAParams", "init_mla_params", "MLAConfig", "ContiguousCache", "PagedCache",
    "init_contiguous_cache", "init_paged_cache",
]
