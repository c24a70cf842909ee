"""Triton causal flash attention for MLA's expanded (prefill) path, variable lengths by position.

Dimension legend: B sequences, S query slots per sequence (right-padded), L keys per sequence,
N heads, Dn nope dims, Dr rope dims (Dqk = Dn + Dr, 192 in DeepSeek-V3), Dv value dims (128),
BM query rows per program, BN keys per tile.

Query s of sequence b sits at absolute position q_pos[b, s] (-1 marks padding) and sees keys
[0, q_pos[b, s]]: this covers a fresh prompt, a chunk after a cached prefix, and sequences of
different lengths in one launch. Scores are q_nope . k_nope + q_pe . k_pe; the rope key is shared by
all heads, so k_pe may have head stride 0 (no per-head copy). Each program walks the keys that all
its rows see without a mask first, then the diagonal band with the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.reduce_ops import add as _add
from nanomoe_kernels.reduce_ops import maximum as _maximum
from nanomoe_kernels.reduce_ops import minimum as _minimum

# tl.reduce combine functions and tl.full zeros: see kernels/reduce_ops.py for why not tl.max/tl.sum


@triton.jit
def _tile(acc, m_i, l_i, q_n, q_p, kn_ptr, kp_ptr, v_ptr, n0, pos, L, DN, DR, DV, scale_log2,
          stride_knl, stride_kpl, stride_vl, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < L
    k_n = tl.load(kn_ptr + offs_n[:, None] * stride_knl + offs_dn[None, :],
                  mask=mask_n[:, None] & (offs_dn[None, :] < DN), other=0.0)
    k_p = tl.load(kp_ptr + offs_n[:, None] * stride_kpl + offs_dr[None, :],
                  mask=mask_n[:, None] & (offs_dr[None, :] < DR), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vl + offs_dv[None, :],
                mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0)
    qk = tl.dot(q_n, tl.trans(k_n))
    qk = tl.dot(q_p, tl.trans(k_p), qk) * scale_log2
    if MASKED:
        qk = tl.where(offs_n[None, :] <= pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _maximum))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet (padding)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _mla_prefill_fwd(
    qn_ptr, qp_ptr, kn_ptr, kp_ptr, v_ptr, pos_ptr, o_ptr,
    s_qnb, s_qns, s_qnh, s_qpb, s_qps, s_qph, s_knb, s_knl, s_knh, s_kpb, s_kpl, s_kph,
    s_vb, s_vl, s_vh, s_pb, s_ob, s_os, s_oh,
    S, L, DN, DR, DV, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    mb = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) query blocks start first
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < S
    pos = tl.load(pos_ptr + b * s_pb + offs_m, mask=mask_m, other=-1)
    valid = pos >= 0
    hi = tl.minimum(tl.reduce(pos, 0, _maximum) + 1, L)               # 0 when every row is padding
    lo = tl.reduce(tl.where(valid, pos + 1, hi), 0, _minimum)       # keys every valid row sees ...
    lo = lo // BLOCK_N * BLOCK_N                                    # ... in whole tiles

    q_n = tl.load(qn_ptr + b * s_qnb + h * s_qnh + offs_m[:, None] * s_qns + offs_dn[None, :],
                  mask=mask_m[:, None] & (offs_dn[None, :] < DN), other=0.0)
    q_p = tl.load(qp_ptr + b * s_qpb + h * s_qph + offs_m[:, None] * s_qps + offs_dr[None, :],
                  mask=mask_m[:, None] & (offs_dr[None, :] < DR), other=0.0)
    kn = kn_ptr + b * s_knb + h * s_knh
    kp = kp_ptr + b * s_kpb + h * s_kph
    vp = v_ptr + b * s_vb + h * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    for n0 in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q_n, q_p, kn, kp, vp, n0, pos, L, DN, DR, DV, scale_log2,
                              s_knl, s_kpl, s_vl, False, BLOCK_N, BLOCK_DN, BLOCK_DR, BLOCK_DV)
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q_n, q_p, kn, kp, vp, n0, pos, L, DN, DR, DV, scale_log2,
                              s_knl, s_kpl, s_vl, True, BLOCK_N, BLOCK_DN, BLOCK_DR, BLOCK_DV)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = tl.where(valid[:, None], out, 0.0)
    o_ptrs = o_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < DV))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def mla_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                v: torch.Tensor, q_pos: torch.Tensor, sm_scale: float, block_m: int = 128, block_n: int = 64,
                num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """Causal attention by position; returns [B, S, N, Dv] in q's dtype (padded rows are 0).

    q_nope [B, S, N, Dn], q_pe [B, S, N, Dr], k_nope [B, L, N, Dn], k_pe [B, L, Dr] (shared by all
    heads), v [B, L, N, Dv], q_pos [B, S] int32 positions (< L, or -1 for padding). All float tensors
    share one dtype and have unit stride in their last dim. No host sync.
    """
    for name, t, d in (("q_nope", q_nope, 4), ("q_pe", q_pe, 4), ("k_nope", k_nope, 4), ("k_pe", k_pe, 3),
                       ("v", v, 4)):
        if t.dim() != d:
            raise ValueError(f"{name} must have {d} dims, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
        if t.dtype != q_nope.dtype:
            raise TypeError(f"{name} must have q_nope's dtype ({q_nope.dtype}), got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dim")
    B, S, N, DN = q_nope.shape
    L, DR, DV = k_nope.shape[1], q_pe.shape[-1], v.shape[-1]
    if q_pe.shape[:3] != (B, S, N) or k_nope.shape != (B, L, N, DN) or k_pe.shape != (B, L, DR):
        raise ValueError(f"shape mismatch: q_nope {tuple(q_nope.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"k_nope {tuple(k_nope.shape)}, k_pe {tuple(k_pe.shape)}")
    if v.shape[:3] != (B, L, N):
        raise ValueError(f"v must be [B={B}, L={L}, N={N}, Dv], got {tuple(v.shape)}")
    if q_pos.shape != (B, S) or q_pos.dtype != torch.int32 or q_pos.stride(1) != 1:
        raise ValueError(f"q_pos must be [B={B}, S={S}] int32 with unit inner stride, got "
                         f"{tuple(q_pos.shape)} {q_pos.dtype}")
    out = torch.empty(B, S, N, DV, dtype=q_nope.dtype, device=q_nope.device)
    _mla_prefill_fwd[(triton.cdiv(S, block_m), N, B)](
        q_nope, q_pe, k_nope, k_pe, v, q_pos, out,
        *q_nope.stride()[:3], *q_pe.stride()[:3], *k_nope.stride()[:3], k_pe.stride(0), k_pe.stride(1), 0,
        *v.stride()[:3], q_pos.stride(0), *out.stride()[:3],
        S, L, DN, DR, DV, sm_scale * 1.4426950408889634,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DN=_pow2(DN), BLOCK_DR=_pow2(DR), BLOCK_DV=_pow2(DV),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
