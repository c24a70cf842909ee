"""Adapter over DeepGEMM's block-scaled FP8 m-grouped GEMMs (package `deep_gemm` from `sgl-deep-gemm`), optional.

Dimension legend: E experts, H hidden, I expert intermediate, HG = H / 128, IG = I / 128, T tokens,
k experts per token, N rows of a contiguous batch, G token rows a gathered batch reads through its index,
R rows after padding each expert to the alignment A (DeepGEMM's m alignment for the contiguous layout,
128 on Hopper; asked from the package), cap rows per expert in the masked layout, capA = cap rounded
up to A.

Weights as kernels/fused_moe_fp8.py takes them (DeepSeek-V3's): w13_q float8_e4m3fn [E, 2I, H] (gate rows,
then up rows), w13_scale float32 [E, 2I/128, HG], w2_q [E, H, I], w2_scale [E, HG, IG]; H and I
multiples of 128. Activations: one float32 scale per row and 128 channels (kernels/fp8_quant.py's
scheme). DeepGEMM computes D = (A * a_sf) @ (B[g] * b_sf[g]).T per group g, fp8 in, bf16 out:
- contiguous: `m_grouped_fp8_gemm_nt_contiguous((A [R, K], a_sf [R, K/128]), (B [E, rows, K], b_sf),
  D [R, rows], m_indices [R] int32)`: the group of each row, -1 for padding (a block whose first row is
  -1 is skipped); every group starts at a multiple of A.
- masked: `fp8_m_grouped_gemm_nt_masked((A [E, capA, K], a_sf [E, capA, K/128]), (B, b_sf), D [E, capA,
  rows], masked_m [E] int32, expected_m)`.
a_sf is passed in DeepGEMM's own sm_90 LHS layout (MN-major, TMA-aligned: kernels/fp8_glue.mn_major_scales),
which it takes without a transposing copy; b_sf as stored (contiguous, one scale per 128 x 128 block).
The FFN: token rows quantised ONCE (quant_fp8_groups; never the k-times-larger permuted rows), or taken
as given when already float8_e4m3fn with their scales (rows_scale, e.g. a comm's packed receive rows,
strided views allowed); `permute_fp8_rows` moves fp8 rows and scales into the padded layout and writes
m_indices; GEMM 1 -> h [R, 2I] bf16; `silu_mul_quant` -> fp8 [R, I] + scales in the layout GEMM 2 reads
(padding rows skipped); GEMM 2 -> [R, H] bf16; `unpermute_sum` (kernels/moe_permute.py) reads rows back
with the top-k weighted sum in float32. The masked path packs [E, cap, H] into [E, capA, H]
(`pack_masked_fp8`: quantised there, or copied) and runs the masked GEMMs. Output: x's dtype for
bf16/fp16/fp32 rows (DeepGEMM's bf16 results cast), bfloat16 for fp8 rows. No host sync anywhere: with
an alignment made ahead (or moe_align inside the capture) the whole path captures into a CUDA graph.
Hopper only: on Blackwell DeepGEMM casts float32 scales to UE8M0 (powers of two), which would change
this scheme's amax/448 scales. `supports_fp8` says why it cannot run.
"""

from __future__ import annotations

import functools

import torch
from nanomoe_kernels.checks import check_routing, check_values
from nanomoe_kernels.deepgemm import contiguous_alignment, probe_deep_gemm
from nanomoe_kernels.fp8_glue import FP8, pack_masked_fp8, permute_fp8_rows, silu_mul_quant
from nanomoe_kernels.fused_moe_fp8 import _check_fp8_weights, check_rows, quant_rows
from nanomoe_kernels.moe_align import Alignment, moe_align, moe_align_contiguous
from nanomoe_kernels.moe_permute import FLOAT_DTYPES, unpermute_sum

FP8_FNS = ("m_grouped_fp8_gemm_nt_contiguous", "fp8_m_grouped_gemm_nt_masked")


@functools.cache
def _deep_gemm_fp8() -> tuple[object | None, str]:
    """(module, "") or (None, why its FP8 grouped GEMMs are unavailable); imported once."""
    return probe_deep_gemm(FP8_FNS)


def supports_fp8(x: torch.Tensor | None = None,
                 weights: tuple[torch.Tensor, ...] | None = None) -> tuple[bool, str]:
    """(True, "") when DeepGEMM's FP8 GEMMs can run these tensors here, else (False, the reason).
    weights: (w13_q, w13_scale, w2_q, w2_scale) as kernels/fused_moe_fp8.py takes them."""
    if not torch.cuda.is_available():
        return False, "DeepGEMM needs a CUDA GPU; none is visible"
    device = x.device if x is not None else torch.device("cuda")
    if device.type != "cuda":
        return False, f"DeepGEMM needs CUDA tensors, got {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major == 10:
        return False, ("on Blackwell DeepGEMM casts float32 FP8 scales to UE8M0 (powers of two), which changes "
                       "this scheme's amax/448 scales; the deepgemm_fp8 adapter runs on Hopper (sm_90) only")
    if major != 9:
        return False, f"DeepGEMM's FP8 grouped GEMMs need Hopper (sm_90), got sm_{major}{minor}"
    dg, why = _deep_gemm_fp8()
    if dg is None:
        return False, why
    if x is not None and x.dtype not in (*FLOAT_DTYPES, FP8):
        return False, f"rows must be bfloat16/float16/float32 (quantised here) or float8_e4m3fn, got {x.dtype}"
    if weights is not None:
        if len(weights) != 4:
            return False, "this adapter runs SwiGLU experts as (w13_q, w13_scale, w2_q, w2_scale) only"
        ref = x if x is not None else weights[0]
        try:
            _check_fp8_weights(*weights, ref, weights[0].shape[-1] if x is None else x.shape[-1])
        except (TypeError, ValueError, AttributeError, IndexError) as err:
            return False, str(err)
    return True, ""


def _require(x: torch.Tensor, weights: tuple[torch.Tensor, ...]):
    ok, why = supports_fp8(x, weights)
    if not ok:
        raise ValueError(f"deepgemm_fp8 backend cannot run: {why}")
    return _deep_gemm_fp8()[0]


def alignment_fp8() -> int:
    """Rows per expert in the contiguous layout are padded to a multiple of this (128 on Hopper)."""
    dg, why = _deep_gemm_fp8()
    if dg is None:
        raise ValueError(f"deepgemm_fp8 backend cannot run: {why}")
    return contiguous_alignment(dg)


def _out(y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """DeepGEMM's bf16 result in the output dtype: rows' own, bfloat16 for fp8 rows."""
    return y if rows.dtype in (FP8, torch.bfloat16) else y.to(rows.dtype)


def _ffn_contiguous(dg, a: torch.Tensor, a_scale: torch.Tensor, m_indices: torch.Tensor,
                    weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """GEMM 1, silu_mul_quant, GEMM 2 on the padded layout -> [R, H] bf16 (padding rows unspecified)."""
    w13_q, w13_scale, w2_q, w2_scale = weights
    R = a.shape[0]
    h = torch.empty((R, w13_q.shape[1]), dtype=torch.bfloat16, device=a.device)
    dg.m_grouped_fp8_gemm_nt_contiguous((a, a_scale), (w13_q, w13_scale), h, m_indices)
    inter, inter_scale = silu_mul_quant(h, m_indices=m_indices)
    y = torch.empty((R, w2_q.shape[1]), dtype=torch.bfloat16, device=a.device)
    dg.m_grouped_fp8_gemm_nt_contiguous((inter, inter_scale), (w2_q, w2_scale), y, m_indices)
    return y


def _check_alignment(align: Alignment, num_rows: int) -> None:
    A = alignment_fp8()
    if align.block_m % A or align.num_rows != num_rows:
        raise ValueError(f"align must pad experts to a multiple of DeepGEMM's alignment ({A}) and sort "
                         f"{num_rows} rows, got block_m={align.block_m}, num_rows={align.num_rows}")


def deepgemm_fp8_fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor,
                           w2_scale: torch.Tensor, align: Alignment | None = None,
                           validate: bool = False) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H] bf16/fp16/fp32 -> [T, H] in
    x.dtype with FP8 weights and activations (kernels.fused_moe_fp8.fused_moe_fp8's contract). The T
    token rows are quantised once; the weighted k-sum is in float32 over DeepGEMM's bf16 rows.
    align: moe_align(topk_ids, E, alignment_fp8()) made ahead, or None (aligned here). Ids outside
    [0, E) are an error with validate=True (async on GPUs); otherwise their pairs add nothing."""
    weights = (w13_q, w13_scale, w2_q, w2_scale)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be [T, H] bfloat16/float16/float32, got {getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    T, H = x.shape
    E, _ = _check_fp8_weights(*weights, x, H)
    dg = _require(x, weights)
    k = check_routing(topk_ids, topk_weights, T, E)
    if align is None:
        align = moe_align(topk_ids, E, alignment_fp8(), validate=validate)
    _check_alignment(align, T * k)
    if T == 0:
        return x.new_zeros((0, H))
    xq, xs = quant_rows(x)
    a, a_scale, m_indices = permute_fp8_rows(xq, xs, align, a_div=k)
    y = _ffn_contiguous(dg, a, a_scale, m_indices, weights)
    return _out(unpermute_sum(y, align, T, k, topk_weights), x)


def _batch_ffn(rows: torch.Tensor, rows_scale: torch.Tensor | None, index: torch.Tensor | None, N: int,
               counts: torch.Tensor, weights: tuple[torch.Tensor, ...], validate: bool) -> torch.Tensor:
    """[N, H], batch row i = expert(rows[i]) (rows[index[i]] with an index); see the two callers."""
    check_rows("rows", rows, 2, rows_scale)
    E, _ = _check_fp8_weights(*weights, rows, rows.shape[1])
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.shape[0] != E:
        raise ValueError(f"counts must be [E={E}], got {getattr(counts, 'shape', counts)}")
    dg = _require(rows, weights)
    out_dtype = torch.bfloat16 if rows.dtype == FP8 else rows.dtype
    if N == 0:
        return rows.new_empty((0, rows.shape[1]), dtype=out_dtype)
    xq, xs = (rows, rows_scale) if rows_scale is not None else quant_rows(rows)
    align = moe_align_contiguous(counts, N, alignment_fp8(), validate=validate)
    a, a_scale, m_indices = permute_fp8_rows(xq, xs, align, a_index=index)
    return _out(unpermute_sum(_ffn_contiguous(dg, a, a_scale, m_indices, weights), align, N, 1), rows)


def deepgemm_fp8_moe_contiguous(rows: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                                w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                                validate: bool = False, rows_scale: torch.Tensor | None = None) -> torch.Tensor:
    """rows [N, H] sorted by expert, counts [E] -> [N, H] (row i = its expert's FP8 SwiGLU FFN, no weighting).
    rows bf16/fp16/fp32 (quantised here; output in their dtype) or float8_e4m3fn with rows_scale float32
    [N, HG] (strided views allowed; output bfloat16). Rows past sum(counts) come back as zeros."""
    N = rows.shape[0] if isinstance(rows, torch.Tensor) and rows.dim() == 2 else 0
    return _batch_ffn(rows, rows_scale, None, N, counts, (w13_q, w13_scale, w2_q, w2_scale), validate)


def deepgemm_fp8_moe_gathered(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                              w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                              validate: bool = False, rows_scale: torch.Tensor | None = None) -> torch.Tensor:
    """rows [G, H] token rows, index [N] int32/int64 in [0, G), counts [E] -> [N, H], row i =
    expert(rows[index[i]]): the G rows are quantised once (or taken as fp8 with rows_scale [G, HG]) and
    the permute kernel reads them through the index. validate=True checks the index (async on GPUs)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-dim int32/int64 tensor, got {getattr(index, 'shape', index)}")
    if not isinstance(rows, torch.Tensor) or index.device != rows.device:
        raise ValueError(f"index must be on the rows' device, got {index.device}")
    if validate and index.numel():
        lo, hi = torch.aminmax(index)
        check_values((lo >= 0) & (hi < rows.shape[0]), f"index must lie in [0, {rows.shape[0]}) (the rows)")
    return _batch_ffn(rows, rows_scale, index.contiguous(), index.shape[0], counts,
                      (w13_q, w13_scale, w2_q, w2_scale), validate)


def deepgemm_fp8_moe_masked(x: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor,
                            w2_q: torch.Tensor, w2_scale: torch.Tensor, expected_m: int | None = None,
                            rows_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [E, cap, H], expert e's rows x[e, :counts[e]] -> [E, cap, H]; rows past counts[e] are unspecified.
    x bf16/fp16/fp32 (quantised here) or float8_e4m3fn with rows_scale [E, cap, HG] (output bfloat16).
    expected_m: typical rows per expert (default cap), DeepGEMM's tile hint. Counts are clamped to [0, cap]."""
    weights = (w13_q, w13_scale, w2_q, w2_scale)
    check_rows("x", x, 3, rows_scale)
    E, cap, H = x.shape
    E_w, _ = _check_fp8_weights(*weights, x, H)
    if E_w != E or not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (E,):
        raise ValueError(f"x must be [E={E_w}, cap, H] and counts [E], got {tuple(x.shape)} and "
                         f"{tuple(getattr(counts, 'shape', ()))}")
    dg = _require(x, weights)
    out_dtype = torch.bfloat16 if x.dtype == FP8 else x.dtype
    if cap == 0:
        return x.new_empty((E, 0, H), dtype=out_dtype)
    masked_m = counts.clamp(0, cap).to(torch.int32).contiguous()
    expected = max(1, min(cap, cap if expected_m is None else expected_m))
    # DeepGEMM's masked kernel reads whole row blocks: pad the capacity to the alignment (kernels/deepgemm.py)
    cap_a = -(-cap // alignment_fp8()) * alignment_fp8()
    a, a_scale = pack_masked_fp8(x, masked_m, cap_a, rows_scale)
    h = torch.empty((E, cap_a, w13_q.shape[1]), dtype=torch.bfloat16, device=x.device)
    dg.fp8_m_grouped_gemm_nt_masked((a, a_scale), (w13_q, w13_scale), h, masked_m, expected)
    inter, inter_scale = silu_mul_quant(h, masked_m=masked_m)
    y = torch.empty((E, cap_a, H), dtype=torch.bfloat16, device=x.device)
    dg.fp8_m_grouped_gemm_nt_masked((inter, inter_scale), (w2_q, w2_scale), y, masked_m, expected)
    return _out(y[:, :cap], x)
