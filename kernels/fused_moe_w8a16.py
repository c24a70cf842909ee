"""W8A16 fused MoE: DeepSeek-V3's block-scaled FP8 expert weights with bf16/fp16 activations.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, N rows of a contiguous or
gathered batch, R token rows of a gathered batch, cap rows per expert (masked), RA aligned rows.

The weights are kernels/fused_moe_fp8.py's (w13_q [E, 2I, H] / w2_q [E, H, I] float8_e4m3fn with one float32
scale per 128 x 128 block); nothing else is quantised. The FP8 grouped GEMM runs with a_scale None: each
weight tile is dequantised to the activations' dtype in registers and fed to the ordinary bf16/fp16 MMA
(kernels/fused_moe_fp8_tile.py). So the only error left against the float64 FFN on the dequantised weights
is bf16 rounding (the SwiGLU output [RA, I] is stored in x's dtype, as the bf16 kernels do), where W8A8
(fused_moe_fp8) adds the e4m3 rounding of x and of that output (~4.3% on Gaussian data). Weight bytes are
halved as in W8A8: for the weight-bound decode sizes it is as fast, for prefill it runs at the bf16 MMA
rate. Entry points mirror fused_moe_fp8's; tables: ops up_w8a16 / down_w8a16 (fp8_configs(w8a16=True)).
"""

from __future__ import annotations

import torch
from nanomoe_kernels.checks import check_routing, check_values
from nanomoe_kernels.fused_moe import _check_counts
from nanomoe_kernels.fused_moe_fp8 import _check_fp8_weights, fp8_configs
from nanomoe_kernels.fused_moe_fp8_kernel import moe_gemm_fp8
from nanomoe_kernels.moe_align import Alignment, _check_ids, moe_align, moe_align_contiguous, moe_align_masked
from nanomoe_kernels.moe_blocks import block_tables
from nanomoe_kernels.moe_sum import sum_pairs

ACT_DTYPES = (torch.bfloat16, torch.float16)


def _check_act(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != dim or x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be a {dim}-dim bfloat16/float16 tensor (W8A16 activations), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x


def w8a16_ffn_aligned(x: torch.Tensor, align: Alignment, w13_q: torch.Tensor, w13_scale: torch.Tensor,
                      w2_q: torch.Tensor, w2_scale: torch.Tensor, up: dict, down: dict, out: torch.Tensor,
                      a_div: int = 1, row_weights: torch.Tensor | None = None,
                      a_index: torch.Tensor | None = None) -> torch.Tensor:
    """The two W8A16 GEMMs on aligned rows: out [align.num_rows, H] row r = expert(x[r // a_div]) (through
    a_index when given), times row_weights[r] when given. Checks are the callers'."""
    R, I = align.sorted_ids.numel(), w2_q.shape[2]
    tables = {c["BLOCK_M"]: block_tables(align, c["BLOCK_M"]) for c in (up, down) if c["BLOCK_M"] > align.block_m}
    inter = torch.empty((R, I), dtype=x.dtype, device=x.device)
    moe_gemm_fp8(x, None, w13_q, w13_scale, inter, align, up, gather_a=True, scatter_c=False, a_div=a_div,
                 swiglu=True, tables=tables.get(up["BLOCK_M"]), a_index=a_index)
    return moe_gemm_fp8(inter, None, w2_q, w2_scale, out, align, down, gather_a=False, scatter_c=True,
                        row_weights=row_weights, tables=tables.get(down["BLOCK_M"]))


def fused_moe_w8a16(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_q: torch.Tensor,
                    w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                    config: dict | None = None, validate: bool = False) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H] bf16/fp16 -> [T, H] in x.dtype,
    FP8 weights dequantised tile by tile (module docstring); routing as fused_moe_fp8."""
    T, H = _check_act("x", x, 2).shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, x, H)
    k = check_routing(topk_ids, topk_weights, T, E)
    up, down, bm = fp8_configs(config, E, H, I, T * k, x.device, w8a16=True)
    if T == 0:
        return x.new_zeros((0, H))
    align = moe_align(topk_ids, E, bm, validate=validate)
    row_w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    pairs = w8a16_ffn_aligned(x if x.stride(1) == 1 else x.contiguous(), align, w13_q, w13_scale, w2_q, w2_scale,
                              up, down, x.new_empty((T * k, H)), a_div=k, row_weights=row_w)
    return sum_pairs(pairs, k) if k > 1 else pairs


def fused_moe_w8a16_contiguous(rows: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                               w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                               config: dict | None = None, validate: bool = False) -> torch.Tensor:
    """rows [N, H] sorted by expert -> [N, H], row i = expert(rows[i]); rows past sum(counts) unwritten."""
    N, H = _check_act("rows", rows, 2).shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, rows, H)
    _check_counts(counts, E)
    up, down, bm = fp8_configs(config, E, H, I, N, rows.device, w8a16=True)
    out = rows.new_empty((N, H))
    if N == 0:
        return out
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    return w8a16_ffn_aligned(rows.contiguous(), align, w13_q, w13_scale, w2_q, w2_scale, up, down, out)


def fused_moe_w8a16_gathered(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                             w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                             config: dict | None = None, validate: bool = False) -> torch.Tensor:
    """rows [R, H] token rows, index [N] in [0, R), counts [E] -> [N, H], row i = expert(rows[index[i]])."""
    R, H = _check_act("rows", rows, 2).shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, rows, H)
    _check_counts(counts, E)
    if _check_ids("index", index, (1,)).device != rows.device:
        raise ValueError(f"index must be on {rows.device} (with the rows), got {index.device}")
    N = index.shape[0]
    up, down, bm = fp8_configs(config, E, H, I, N, rows.device, w8a16=True)
    out = rows.new_empty((N, H))
    if N == 0:
        return out
    if validate:
        lo, hi = torch.aminmax(index)
        check_values((lo >= 0) & (hi < R), f"index must lie in [0, {R}) (the rows)")
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    return w8a16_ffn_aligned(rows if rows.stride(1) == 1 else rows.contiguous(), align, w13_q, w13_scale, w2_q,
                             w2_scale, up, down, out, a_index=index.contiguous())


def fused_moe_w8a16_masked(x: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor,
                           w2_q: torch.Tensor, w2_scale: torch.Tensor, config: dict | None = None,
                           expected_m: int | None = None, validate: bool = False) -> torch.Tensor:
    """x [E, cap, H], expert e's rows x[e, :counts[e]] -> [E, cap, H]; rows past counts[e] unwritten."""
    E_x, cap, H = _check_act("x", x, 3).shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, x, H)
    if E_x != E:
        raise ValueError(f"x must be [E={E}, cap, {H}] (one slab per expert), got {tuple(x.shape)}")
    _check_counts(counts, E)
    M = E * (cap if expected_m is None else max(1, expected_m))
    up, down, bm = fp8_configs(config, E, H, I, M, x.device, w8a16=True)
    align = moe_align_masked(counts, cap, bm, validate=validate)
    out = x.new_empty((E, cap, H))
    if E * cap == 0:
        return out
    w8a16_ffn_aligned(x.reshape(E * cap, H).contiguous(), align, w13_q, w13_scale, w2_q, w2_scale, up, down,
                      out.view(E * cap, H))
    return out
