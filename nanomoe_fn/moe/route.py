"""`route`: token -> top-k experts and weights (softmax, or DeepSeek-V3 sigmoid + bias + grouped top-k).

Dimension legend: T tokens, H hidden, E experts, k experts per token, G expert groups (n_group).

Logits are computed in float32 whatever the activation dtype: bf16 logits carry about three significant digits
and would turn near-ties into arbitrary choices. On GPUs the router GEMM runs as a float32 GEMM split over H up
to 1024 tokens, and above that (bf16 activations) on tensor cores over a bf16 split of the weight
(router_logits). On GPUs everything after the router
GEMM is one Triton kernel (kernels/moe_route.py): eager, in CUDA-graph capture, and under torch.compile as the
custom op nanomoe::fused_route, so a compiled layer routes bit for bit as an eager one (inductor's own fusion
of the torch ops rounds the weights differently in the last bits, enough to change a bf16 model's tokens); on
the CPU the torch ops below run. The Routing record lives in nanomoe_fn/batch.py with the other records that
pass between stages.
"""

from __future__ import annotations

import torch
from einops import rearrange

from nanomoe_fn.batch import Routing
from nanomoe_fn.checks import FLOAT_DTYPES, check_tensor, check_values
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.params import GateParams


def route(gate_params: GateParams, x: torch.Tensor, cfg: MoEConfig) -> Routing:
    """Choose each token's top-k experts and their weights.

    x [T, H] float. Scores: softmax over all experts, or sigmoid (DeepSeek-V3). With a correction
    bias the choice uses score + bias but the weight is the plain score. With n_group > 1 only the
    best topk_group groups are eligible; a group scores by cfg.group_rule: "max" (its best choice score,
    DeepSeek-V2's group_limited_greedy) or "top2_sum" (its two best summed, DeepSeek-V3); cfg.group_score
    None means "top2_sum" with a correction bias, else "max". Weights are renormalised if
    cfg.norm_topk_prob, then scaled by cfg.routed_scaling_factor.
    """
    if not isinstance(cfg, MoEConfig) or not isinstance(gate_params, GateParams):
        raise TypeError(f"route takes (GateParams, x, MoEConfig), got ({type(gate_params).__name__}, x, "
                        f"{type(cfg).__name__})")
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    w = check_tensor("gate_params.weight", gate_params.weight, dim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] != cfg.hidden:
        raise ValueError(f"x must be [T, hidden={cfg.hidden}], got shape {tuple(x.shape)}")
    if tuple(w.shape) != (cfg.num_experts, cfg.hidden):
        raise ValueError(f"gate_params.weight must be [{cfg.num_experts}, {cfg.hidden}], got {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"x must be on {w.device} (where the gate weight is), got {x.device}")
    bias = gate_params.bias
    if cfg.correction_bias != (bias is not None):
        raise ValueError(f"gate_params.bias must be {'a [E] tensor' if cfg.correction_bias else 'None'} "
                         f"for this config (correction_bias={cfg.correction_bias})")
    if bias is not None and tuple(check_tensor("gate_params.bias", bias, dtypes=FLOAT_DTYPES, device=w.device).shape
                                  ) != (cfg.num_experts,):
        raise ValueError(f"gate_params.bias must be [{cfg.num_experts}], got {tuple(bias.shape)}")

    logits = router_logits(x, w)  # [T, E] float32
    # one reduction catches NaN/inf in x or the weight and activations too large for float32 logits
    check_values(torch.isfinite(logits).all(), "router logits contain NaN/inf: x holds NaN/inf or values too "
                 "large for float32 logits (check x and gate_params.weight)")
    return select_experts(logits, None if bias is None else bias.float(), cfg)


HALF = (torch.bfloat16, torch.float16)  # serving dtypes; float32/float64 activations keep the exact float32 GEMM
SPLITK_MAX_TOKENS = 1024  # the float32 GEMM split over H beats cuBLAS's float32 GEMM up to here (run 119)
SPLIT_MIN_TOKENS = 256    # above it bf16 x takes the bf16 split, faster than the split-H kernel (run 156,
# bench/results/pipeline_notes.md: 23.5 / 27.7 / 32.8 us at 256 / 512 / 1024 tokens against 27.2 / 43.2 / 76.5)


def router_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 logits [T, E] = x [T, H] @ w [E, H].T.

    On CUDA above SPLIT_MIN_TOKENS rows of bf16 x: bf16 tensor-core GEMMs with float32 output over w split into
    bf16 parts (hi, mid, lo hold float32's 24 bits, made in one pass; a bf16 weight is its own one part), one GEMM
    over the stacked parts. Every product is exact; the tensor cores' float32 accumulation is not quite IEEE, so the
    logits are within ~1e-5 of the largest in magnitude (4.4e-6 to 9.6e-6 measured at 256-4096 tokens; bf16 logits
    ~3e-3); the custom op nanomoe::router_logits_split under torch.compile. Otherwise on CUDA, up to
    SPLITK_MAX_TOKENS rows of bf16/fp16 x (a float32 or bf16 w): the float32 GEMM split over H
    (kernels/router_gemm.py: cuBLAS gives [32, 7168] x [7168, 256] too few programs), tf32x3 products on tensor
    cores summed in IEEE float32 over 128-column chunks, ~1e-6 off the float32 GEMM (1.4e-6 at 32 tokens, 3e-6
    at 1024 of DeepSeek-V3, largest logit ~4); the custom op nanomoe::router_logits_splitk under torch.compile.
    Elsewhere x.float() @ w.float().T (a float32 GEMM)."""
    T = x.shape[0]
    if x.is_cuda and x.dtype == torch.bfloat16 and T > SPLIT_MIN_TOKENS:
        if torch.compiler.is_compiling():
            return torch.ops.nanomoe.router_logits_split(x, w)
        return _split_logits(x, w)
    if x.is_cuda and 0 < T <= SPLITK_MAX_TOKENS and x.dtype in HALF and w.dtype in (torch.float32, torch.bfloat16):
        if torch.compiler.is_compiling():
            return torch.ops.nanomoe.router_logits_splitk(x, w)
        from nanomoe_kernels.router_gemm import router_logits_splitk

        return router_logits_splitk(x, w)
    return x.float() @ w.float().T


def bf16_parts(w: torch.Tensor) -> list[torch.Tensor]:
    """bf16 tensors whose sum is w exactly: [w] for a bf16 w, else hi, mid, lo of w in float32 (each part the
    next 8 significant bits of what the others leave; float32 subnormals below 2^-126 aside)."""
    if w.dtype == torch.bfloat16:
        return [w]
    w = w.float()
    hi = w.bfloat16()
    rest = w - hi      # float32 (hi promoted in the same kernel); exact: w less its rounding
    mid = rest.bfloat16()
    return [hi, mid, (rest - mid).bfloat16()]  # five elementwise ops (kernels/router_gemm.split_bf16_parts: one)


def _split_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.is_cuda and w.dtype == torch.float32:
        from nanomoe_kernels.router_gemm import split_bf16_parts

        # one GEMM over the stacked parts [3E, H] (3x the programs of E = 256 columns), then hi + mid + lo in order
        E = w.shape[0]
        part_logits = torch.mm(x, split_bf16_parts(w).view(3 * E, -1).T, out_dtype=torch.float32)
        return part_logits[:, :E] + part_logits[:, E:2 * E] + part_logits[:, 2 * E:]
    parts = bf16_parts(w)
    logits = torch.mm(x, parts[0].T, out_dtype=torch.float32)
    for p in parts[1:]:
        logits += torch.mm(x, p.T, out_dtype=torch.float32)
    return logits


@torch.library.custom_op("nanomoe::router_logits_split", mutates_args=())
def _router_logits_split(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _split_logits(x, w)


@torch.library.custom_op("nanomoe::router_logits_splitk", mutates_args=())
def _router_logits_splitk(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from nanomoe_kernels.router_gemm import router_logits_splitk

    return router_logits_splitk(x, w)


def _logits_like(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Both router GEMM ops under compile: float32 [T, E]."""
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


_router_logits_split.register_fake(_logits_like)
_router_logits_splitk.register_fake(_logits_like)


def select_experts(logits: torch.Tensor, bias: torch.Tensor | None, cfg: MoEConfig,
                   fused: bool | None = None) -> Routing:
    """route after its GEMM: float32 logits [T, E] (and the correction bias [E] float32, or None) -> Routing.
    fused: the one Triton kernel (kernels/moe_route.py) or the torch ops; None = the kernel on GPUs (under
    torch.compile through the custom op nanomoe::fused_route)."""
    if fused is None:
        fused = logits.is_cuda
    if fused:
        args = (logits, None if bias is None else bias.contiguous(), cfg.top_k, cfg.n_group, cfg.topk_group,
                cfg.score_func, cfg.group_rule, cfg.norm_topk_prob, float(cfg.routed_scaling_factor))
        if torch.compiler.is_compiling():
            return Routing(*torch.ops.nanomoe.fused_route(*args))
        from nanomoe_kernels.moe_route import fused_route

        return Routing(*fused_route(*args))   # eager: straight to the kernel (no dispatcher on the decode path)
    if cfg.score_func == "softmax":
        scores = logits.softmax(dim=-1)
    else:
        scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias

    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = rearrange(choice, "t (g e) -> t g e", g=cfg.n_group)
        if cfg.group_rule == "max":
            group_scores = grouped.amax(dim=-1)
        else:  # "top2_sum" (one expert per group: its score)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = _best(group_scores, cfg.topk_group)  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        mask = mask.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)
        choice = choice.masked_fill(~mask, float("-inf"))

    topk_ids = _best(choice, cfg.top_k)  # [T, k], sorted best first
    weights = scores.gather(1, topk_ids)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * cfg.routed_scaling_factor
    return Routing(topk_ids.to(torch.int32), weights.float())


def _best(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, best first, equal values in index order (the lower id first,
    as the kernel and the reference break ties; torch.topk leaves tie order unspecified)."""
    return values.sort(dim=-1, descending=True, stable=True).indices[:, :k]


@torch.library.custom_op("nanomoe::fused_route", mutates_args=())
def _fused_route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                 score_func: str, group_rule: str, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from nanomoe_kernels.moe_route import fused_route

    return fused_route(logits, bias, top_k, n_group, topk_group, score_func, group_rule, norm, scale)


@_fused_route.register_fake
def _(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
      score_func: str, group_rule: str, norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    T = logits.shape[0]   # [T, k] ids and weights
    return (logits.new_empty((T, top_k), dtype=torch.int32), logits.new_empty((T, top_k), dtype=torch.float32))
