"""NanoMoE functional core: pure stage functions over explicit parameter pytrees.

Rooms: moe/ (route -> dispatch -> expert_ffn -> combine, composed by moe_layer; its config and
parameter records), attention/ (mla: DeepSeek-V3 attention, prefill and weight-absorbed decode over
the compressed cache), comm/ (comm backends), eplb/ (expert placement, load recording, rebalancing,
weight moves), pipeline/ (a layer as a program of stages; schedules: sequential, two-batch overlap,
shared-expert overlap; the executor), decoder.py (the DeepSeek-V3 decoder layer as a program: MLA and the
MoE or dense FFN). batch.py holds the records that pass between stages, checks.py the argument checks,
tree.py the one pytree registration. Every public name is re-exported here.
"""

from nanomoe_fn.attention.backends import MLA_BACKENDS, get_mla_backend
from nanomoe_fn.attention.cache import ContiguousCache, PagedCache, init_contiguous_cache, init_paged_cache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.mla import mla
from nanomoe_fn.attention.params import MLAParams, init_mla_params
from nanomoe_fn.batch import ExpertBatch, Handle, HandleOrigin, Routing
from nanomoe_fn.comm import COMM_BACKENDS, LocalComm, NvlinkComm, TorchComm, TorchFixedComm, make_comm, supports_comm
from nanomoe_fn.comm.handshake import handshake
from nanomoe_fn.comm.ops import OpComm
from nanomoe_fn.decoder import (
    DECODER_DENSE_PROGRAM,
    DECODER_MOE_PROGRAM,
    DecoderContext,
    DecoderParams,
    decoder_context,
    decoder_layer,
)
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.combine import combine
from nanomoe_fn.moe.config import PRESETS, MoEConfig, preset
from nanomoe_fn.moe.dispatch import dispatch
from nanomoe_fn.moe.experts import EXPERT_BACKENDS, expert_ffn, get_expert_backend
from nanomoe_fn.moe.layer import MOE_PROGRAM, MoEContext, moe_layer, moe_stages, run_moe, shared_mlp
from nanomoe_fn.moe.param_checks import check_params
from nanomoe_fn.moe.params import (
    GateParams,
    LinearExperts,
    MoEParams,
    SharedMLP,
    SwiGLUExperts,
    SwiGLUExpertsFP8,
    cast_params,
    expert_tensors,
    init_moe_params,
    shard_moe_params,
)
from nanomoe_fn.moe.route import route
from nanomoe_fn.pipeline import (
    Plan,
    Program,
    Stage,
    auto_schedule,
    default_threshold,
    format_plan,
    run,
    sequential,
    shared_expert_overlap,
    two_batch_overlap,
)

__all__ = [
    "COMM_BACKENDS", "EXPERT_BACKENDS", "PRESETS", "ExpertBatch", "GateParams", "Handle", "LinearExperts",
    "LocalComm", "MoEConfig", "NvlinkComm", "MoEParams", "Placement", "Routing", "SharedMLP", "SwiGLUExperts",
    "TorchComm", "TorchFixedComm", "OpComm",
    "HandleOrigin", "SwiGLUExpertsFP8", "cast_params", "check_params", "combine", "handshake", "dispatch", "expert_ffn",
    "expert_tensors", "get_expert_backend",
    "init_moe_params", "make_comm", "moe_layer", "preset", "route", "shard_moe_params", "shared_mlp",
    "supports_comm", "mla", "MLAParams", "init_mla_params", "MLAConfig", "ContiguousCache", "PagedCache",
    "init_contiguous_cache", "init_paged_cache", "MLA_BACKENDS", "get_mla_backend",
    "MOE_PROGRAM", "MoEContext", "moe_stages", "run_moe", "Plan", "Program", "Stage", "auto_schedule",
    "default_threshold", "format_plan", "run", "sequential", "shared_expert_overlap", "two_batch_overlap",
    "DECODER_DENSE_PROGRAM", "DECODER_MOE_PROGRAM", "DecoderContext", "DecoderParams", "decoder_context",
    "decoder_layer",
]
