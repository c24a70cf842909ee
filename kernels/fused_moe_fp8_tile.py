"""The FP8 grouped GEMM's tile (kernels/fused_moe_fp8_kernel.py launches it): one BLOCK_M x BLOCK_N output
tile of one expert's aligned rows, its K loop and its epilogues (that module's docstring describes them).

Dimension legend: BM/BN/BK the tile (BK = 128, one scale group), N output columns, K reduction depth,
G = 128 the scale group. A_FP8: A is fp8 with per-row group scales, each group's partial product promoted
into the float32 accumulator (DeepSeek-V3's W8A8 scheme); else A is bf16/fp16 and each weight tile is
dequantised to A's dtype before one ordinary MMA chain (W8A16: no activation quantisation).
"""

import triton
import triton.language as tl
from nanomoe_kernels.fp8_quant import _round_e4m3

_GROUP = tl.constexpr(128)  # the scale group (a jit function reads constexpr globals only)


@triton.jit
def _promote(acc, part, a_s, bs_ptrs, g, BLOCK_N: tl.constexpr):
    """acc + one scale group's float32 partial times its row (activation) and block (weight) scales."""
    if BLOCK_N <= _GROUP:  # an else, not an early return: the compiler visits code after a return too
        out = acc + part * (a_s * tl.load(bs_ptrs + g))[:, None]
    else:
        out = acc + part * a_s[:, None] * tl.load(bs_ptrs + g)[None, :]
    return out


@triton.jit
def _dequant(b, bs_ptrs, g, BLOCK_N: tl.constexpr, dtype: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] fp8 weight tile times its block scale(s), in `dtype` (the W8A16 path)."""
    if BLOCK_N <= _GROUP:
        out = (b.to(tl.float32) * tl.load(bs_ptrs + g)).to(dtype)
    else:
        out = (b.to(tl.float32) * tl.load(bs_ptrs + g)[None, :]).to(dtype)
    return out


@triton.jit
def _fp8_tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0,
              expert, pid_n, num_rows, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
              stride_bsn, stride_cm, stride_csm, stride_csk,
              A_DIV: tl.constexpr, GATHER_A: tl.constexpr, A_INDEX: tl.constexpr, SCATTER_C: tl.constexpr,
              SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr, QUANT_OUT: tl.constexpr, USE_TMA: tl.constexpr,
              K_STEPS: tl.constexpr, A_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """One BLOCK_M x BLOCK_N output tile of one expert's aligned rows; epilogues of the module docstring."""
    offs_m = row0 + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_ok = ids < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    if GATHER_A:
        a_rows = (ids // A_DIV).to(tl.int64)
        if A_INDEX:
            a_rows = tl.load(a_index_ptr + a_rows, mask=row_ok, other=0).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    as_ptrs = as_ptr + a_rows * stride_asm
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrapped columns are masked at the store
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    up_ptrs = b_ptrs + N * stride_bn
    tma_row = (expert * (2 * N if SWIGLU else N) + pid_n * BLOCK_N).to(tl.int32)
    bs_row = bs_ptr + expert * stride_bse
    if BLOCK_N <= _GROUP:
        bs_ptrs = bs_row + ((pid_n * BLOCK_N) // _GROUP) * stride_bsn  # one weight block: a scalar per step
    else:
        bs_ptrs = bs_row + (offs_bn // _GROUP) * stride_bsn  # per column
    up_bs_ptrs = bs_ptrs + (N // _GROUP) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K // (BLOCK_K * K_STEPS)):
        for st in tl.static_range(K_STEPS):  # K_STEPS scale groups per iteration: more bytes in flight per step
            g = kk * K_STEPS + st
            a = tl.load(a_ptrs + st * BLOCK_K, mask=row_ok[:, None], other=0.0)
            if A_FP8:
                a_s = tl.load(as_ptrs + g * stride_ask, mask=row_ok, other=0.0)
            if USE_TMA:
                b = b_desc.load([tma_row, g * BLOCK_K]).T
            else:
                b = tl.load(b_ptrs + st * BLOCK_K)
            if A_FP8:
                acc = _promote(acc, tl.dot(a, b, out_dtype=tl.float32), a_s, bs_ptrs, g, BLOCK_N)
            else:  # W8A16: the weight tile dequantised to A's dtype, one MMA chain (no per-step promotion)
                acc = tl.dot(a, _dequant(b, bs_ptrs, g, BLOCK_N, a.dtype), acc)
            if SWIGLU:
                if USE_TMA:
                    up = b_desc.load([tma_row + N, g * BLOCK_K]).T
                else:
                    up = tl.load(up_ptrs + st * BLOCK_K)
                if A_FP8:
                    acc_up = _promote(acc_up, tl.dot(a, up, out_dtype=tl.float32), a_s, up_bs_ptrs, g, BLOCK_N)
                else:
                    acc_up = tl.dot(a, _dequant(up, up_bs_ptrs, g, BLOCK_N, a.dtype), acc_up)
        up_ptrs += BLOCK_K * K_STEPS
        a_ptrs += BLOCK_K * K_STEPS
        b_ptrs += BLOCK_K * K_STEPS

    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + ids, mask=row_ok, other=0.0)[:, None]
    if SCATTER_C:
        c_rows = ids.to(tl.int64)
    else:
        c_rows = offs_m.to(tl.int64)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_cn[None, :]
    c_mask = row_ok[:, None] & (offs_cn[None, :] < N)
    if QUANT_OUT:  # BLOCK_N == _GROUP: this tile is one scale group of each of its rows
        amax = tl.max(tl.abs(acc), axis=1)
        scale = tl.div_rn(amax, tl.full([BLOCK_M], 448.0, tl.float32))  # div_rn: a GPU's `/` is approximate
        scale = tl.where(scale > 0.0, scale, 1.0)
        q = _round_e4m3(tl.minimum(tl.maximum(tl.div_rn(acc, scale[:, None]), -448.0), 448.0))
        tl.store(c_ptrs, q.to(c_ptr.dtype.element_ty), mask=c_mask)
        tl.store(cs_ptr + c_rows * stride_csm + pid_n * stride_csk, scale, mask=row_ok)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
