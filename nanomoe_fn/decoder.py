"""The DeepSeek-V3 decoder layer as a program of stages: RMSNorm -> MLA -> residual -> RMSNorm -> MoE (with
its shared experts) or a dense SwiGLU FFN (the first layers) -> residual.

Dimension legend: B sequences, S new tokens per sequence (right-padded with position -1), H hidden,
T = B * S tokens the FFN sees, L_max cache rows per sequence.

Values: x [B, S, H], positions [B, S], cache -> h -> attn_out, cache_out -> x1 -> tokens [T, H] -> (the MoE
stages of layer.py, or dense_ffn) -> ffn_out [T, H] -> out [B, S, H] (padding rows keep x1: the FFN's
output there is masked, as MLA's is) -> result (out, cache_out).

Two micro-batches (two_batch_overlap) split the batch by sequences, balancing valid tokens (decode: B // 2
sequences each, no host read; prefill: one host read of the tokens per sequence, which the prefill path
syncs for anyway); a single sequence is cut inside at half its tokens: the second micro-batch attends to the
cache rows the first one wrote (it runs its attention later in every plan) and starts from the cache
length the first one leaves. A micro-batch may be empty (one decode sequence): its attention is skipped,
its FFN still joins every collective with zero tokens. The cache buffer is shared, never copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from nanomoe_fn.attention.cache import ContiguousCache, MLACache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.mla import mla, rms_norm
from nanomoe_fn.attention.params import MLAParams
from nanomoe_fn.comm.base import Comm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.layer import MoEContext, check_capacity, check_shared_comm, moe_stages, shared_mlp
from nanomoe_fn.moe.param_checks import check_dense, check_params
from nanomoe_fn.moe.params import MoEParams, SharedMLP
from nanomoe_fn.pipeline.program import Program, Stage
from nanomoe_fn.pipeline.run import run
from nanomoe_fn.pipeline.schedule import Plan, sequential
from nanomoe_fn.tree import register_dataclass


@dataclass(frozen=True, eq=False)
class DecoderParams:
    """One decoder layer: attn_norm [H], attn (MLA), ffn_norm [H], and either moe (an MoE layer's local
    parameters) or dense (one SwiGLU FFN, DeepSeek-V3's first dense layers)."""

    attn_norm: torch.Tensor
    attn: MLAParams
    ffn_norm: torch.Tensor
    moe: MoEParams | None = None
    dense: SharedMLP | None = None


register_dataclass(DecoderParams, optional=("moe", "dense"))  # the absent one is no leaf


@dataclass(frozen=True)
class DecoderContext:
    """Static per call: the attention config and backend, the MoE context (None for a dense layer),
    `check` for mla's value checks (a CUDA-graph decode passes False)."""

    mla_cfg: MLAConfig
    attn_backend: str = "torch"
    moe: MoEContext | None = None
    check: bool = True


def _attn_norm(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    return {"h": rms_norm(env["x"], p.attn_norm, c.mla_cfg.rms_norm_eps)}


def _attention(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    h = env["h"]
    if h.shape[0] == 0 or h.shape[1] == 0:  # an empty micro-batch: nothing to attend, nothing to write
        return {"attn_out": torch.zeros_like(h), "cache_out": env["cache"]}
    out, cache = mla(p.attn, h, env["positions"], env["cache"], c.mla_cfg, c.attn_backend, check=c.check)
    return {"attn_out": out.to(h.dtype), "cache_out": cache}


def _attn_residual(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    return {"x1": env["x"] + env["attn_out"]}


def _ffn_norm(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    x1 = env["x1"]
    return {"tokens": rms_norm(x1, p.ffn_norm, c.mla_cfg.rms_norm_eps).reshape(-1, x1.shape[-1])}


def _dense_ffn(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    return {"ffn_out": shared_mlp(p.dense, env["tokens"])}


def _ffn_residual(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    x1 = env["x1"]
    if x1.shape[1] == 1:  # decode: every position is valid, nothing to mask
        return {"out": x1 + env["ffn_out"].view(x1.shape)}
    keep = (env["positions"] >= 0)[..., None].to(x1.dtype)
    return {"out": x1 + env["ffn_out"].view(x1.shape) * keep}


def _result(p: DecoderParams, env: dict, c: DecoderContext) -> dict:
    return {"result": (env["out"], env["cache_out"], env["part"])}


def _tokens_per_sequence(positions: torch.Tensor) -> list[int]:
    """Valid tokens per sequence: B at decode (S == 1, every position valid: no host read), else one read."""
    if positions.shape[1] == 1:
        return [1] * positions.shape[0]
    return (positions >= 0).sum(1).tolist()


def _sub_cache(cache: MLACache, b0: int, b1: int) -> MLACache:
    """Sequences b0..b1 of the cache, sharing its kv buffer."""
    if isinstance(cache, ContiguousCache):
        return ContiguousCache(kv=cache.kv[b0:b1], lens=cache.lens[b0:b1])
    return replace(cache, block_table=cache.block_table[b0:b1], lens=cache.lens[b0:b1])


def split_sequences(inputs: dict, n: int) -> list[dict]:
    """Two micro-batches (module docstring): by sequences, or a single sequence cut inside."""
    if n != 2:
        raise ValueError(f"the decoder layer splits into 2 micro-batches, got {n}")
    x, pos, cache = inputs["x"], inputs["positions"], inputs["cache"]
    B = x.shape[0]
    counts = _tokens_per_sequence(pos)
    if B == 1 and x.shape[1] > 1 and counts[0] >= 2:  # fewer valid tokens: no cut (it would leave a padding-only
        k = (counts[0] + 1) // 2                      # [1, 1] decode step); the sequence goes whole to mb 0
        ahead = torch.maximum(cache.lens, (pos[:, k - 1] + 1).to(cache.lens.dtype))  # the rows mb 0 writes
        return [{"x": x[:, :k], "positions": pos[:, :k], "cache": cache, "part": ("cut", cache)},
                {"x": x[:, k:], "positions": pos[:, k:], "cache": replace(cache, lens=ahead), "part": ("cut", cache)}]
    total, run_sum, cut = sum(counts), 0, B // 2 if B > 1 else B
    if B > 1 and x.shape[1] > 1:  # balance valid tokens: the first cut where the prefix reaches half
        cut = 1
        for b in range(B - 1):
            run_sum += counts[b]
            cut = b + 1
            if 2 * run_sum >= total:
                break
    return [{"x": x[b0:b1], "positions": pos[b0:b1], "cache": _sub_cache(cache, b0, b1), "part": ("seq", cache)}
            for b0, b1 in ((0, cut), (cut, B))]


def merge_sequences(outs: list) -> tuple[torch.Tensor, MLACache, Any]:
    """The micro-batches' (out, cache, part) -> (out [B, S, H], the whole cache with its new lens, None)."""
    (o0, c0, (kind, whole)), (o1, c1, _) = outs
    if kind == "cut":
        return torch.cat([o0, o1], 1), replace(whole, lens=c1.lens), None
    return torch.cat([o0, o1], 0), replace(whole, lens=torch.cat([c0.lens, c1.lens])), None


def _program(name: str, ffn: tuple[Stage, ...]) -> Program:
    head = (Stage("attn_norm", _attn_norm, ("x",), ("h",)),
            Stage("attention", _attention, ("h", "positions", "cache"), ("attn_out", "cache_out")),
            Stage("attn_residual", _attn_residual, ("x", "attn_out"), ("x1",)),
            Stage("ffn_norm", _ffn_norm, ("x1",), ("tokens",)))
    tail = (Stage("ffn_residual", _ffn_residual, ("x1", "ffn_out", "positions"), ("out",)),
            Stage("result", _result, ("out", "cache_out", "part"), ("result",)))
    return Program(name, head + ffn + tail, ("x", "positions", "cache", "part"), "result", split_sequences,
                   merge_sequences).check()


DECODER_MOE_PROGRAM = _program("decoder_moe", moe_stages("tokens", "ffn_out", lambda p: p.moe, lambda c: c.moe))
DECODER_DENSE_PROGRAM = _program("decoder_dense", (Stage("dense_ffn", _dense_ffn, ("tokens",), ("ffn_out",)),))


def _same(stages: tuple[Stage, ...]) -> set:
    """What makes two stage tuples the same layer: each stage's function and values (its stream aside)."""
    return {(s.name, s.fn, s.reads, s.writes, s.kind) for s in stages}


def _check_call(params: DecoderParams, x: torch.Tensor, ctxs: list) -> None:
    """Host-only checks of decoder_layer's arguments before any stage runs, naming the argument (mla checks
    positions and the cache): ctx, x [B, S, H], the norms [H], and with ctx.check the FFN's weights against x's
    dtype."""
    if not ctxs or not all(isinstance(c, DecoderContext) for c in ctxs):
        raise TypeError(f"ctx must be a DecoderContext or a list of them, got {[type(c).__name__ for c in ctxs]}")
    H = ctxs[0].mla_cfg.hidden_size
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != H or not x.is_floating_point():
        raise ValueError(f"x must be a floating [B, S, H={H}] tensor, got {tuple(x.shape)} {x.dtype}")
    for name in ("attn_norm", "ffn_norm"):
        t = getattr(params, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H,):
            raise ValueError(f"params.{name} must be a [{H}] tensor, got {tuple(getattr(t, 'shape', ()))}")
    if params.moe is not None and not all(isinstance(c.moe, MoEContext) for c in ctxs):
        raise ValueError("ctx.moe must be a MoEContext (comm, placement, backend) for an MoE decoder layer")
    if not ctxs[0].check:  # the decode loop (check=False) skips the records' checks: ~30 us of host time a layer
        return
    tokens = x.new_empty((0, H))  # the FFN's tokens have x's dtype and device
    if params.moe is None:
        check_dense("params.dense", params.dense, tokens)
        return
    m = ctxs[0].moe
    check_params(params.moe, m.cfg, tokens, num_experts=m.placement.local_experts)
    check_capacity(m.capacity, "ctx.moe")


def decoder_layer(params: DecoderParams, x: torch.Tensor, positions: torch.Tensor, cache: MLACache,
                  ctx: DecoderContext | Sequence[DecoderContext], plan: Plan | None = None
                  ) -> tuple[torch.Tensor, MLACache]:
    """One decoder layer: x [B, S, H] at positions [B, S] -> (out [B, S, H], cache with the new rows).

    plan: a plan of DECODER_MOE_PROGRAM (params.moe set) or DECODER_DENSE_PROGRAM (params.dense set);
    default sequential. ctx: one DecoderContext, or one per micro-batch (their own comms)."""
    if not isinstance(params, DecoderParams):
        raise TypeError(f"params must be a DecoderParams, got {type(params).__name__}")
    program = DECODER_MOE_PROGRAM if params.moe is not None else DECODER_DENSE_PROGRAM
    if (params.moe is None) == (params.dense is None):
        raise ValueError("params must hold exactly one of moe (an MoE layer) and dense (a dense FFN layer)")
    plan = plan if plan is not None else sequential(program)
    if plan.program.stages[-1].name != "result" or _same(plan.program.stages) != _same(program.stages):
        raise ValueError(f"plan must be a plan of {program.name} (its stages, any order, on any stream), got "
                         f"{plan.program.name}")
    ctxs = list(ctx) if isinstance(ctx, (list, tuple)) else [ctx]
    _check_call(params, x, ctxs)
    if params.moe is not None:
        check_shared_comm(plan, [c.moe.comm for c in ctxs], ctxs[0].moe.backend, ctxs[0].moe.capacity)
    out, new_cache, _ = run(plan, params, {"x": x, "positions": positions, "cache": cache,
                                           "part": ("seq", cache)}, ctxs if len(ctxs) > 1 else ctxs[0])
    return out, new_cache


def decoder_context(mla_cfg: MLAConfig, attn_backend: str = "torch", moe_cfg: Any = None,
                    comm: Comm | None = None, placement: Placement | None = None, backend: str = "bmm",
                    capacity: int | None = None, check: bool = True) -> DecoderContext:
    """A DecoderContext; with moe_cfg its MoEContext (local comm and identity placement by default)."""
    if moe_cfg is None:
        return DecoderContext(mla_cfg, attn_backend, None, check)
    comm = comm if comm is not None else LocalComm()
    placement = placement if placement is not None else Placement.identity(moe_cfg.num_experts, comm.world_size)
    return DecoderContext(mla_cfg, attn_backend, MoEContext(moe_cfg, comm, placement, backend, capacity), check)
