"""The FP8 grouped GEMM's tile (kernels/fused_moe_fp8_kernel.py launches it): one BLOCK_M x BLOCK_N output
tile of one expert's aligned rows, its K loop and its epilogues (that module's docstring describes them).

Dimension legend: BM/BN/BK the tile (BK = 128, one scale group), N output columns, K reduction depth,
G = 128 the scale group. A_FP8: A is fp8 with per-row group scales, each group's partial product promoted
into the float32 accumulator (DeepSeek-V3's W8A8 scheme); else A is bf16/fp16 and each weight tile is
dequantised to A's dtype before one ordinary MMA chain (W8A16: no activation quantisation).
A_TERMS = 2 (A_FP8 only; kernels/fp8_quant.py's two-term scheme): A's rows are [hi | lo], K columns each, a
value (hi + lo) * scale; each step's partial is dot(lo, b) accumulated onto dot(hi, b) (one MMA chain), and a
quantised output (QUANT_OUT) is written the same way, [hi | lo] of N columns each. SWAP_AB computes each partial
as (b^T a^T)^T: the weight tile is then the MMA's M side (Hopper's wgmma needs M >= 64 rows per warp group,
which decode tiles of 16-32 token rows do not have), the token rows its N side. W_TILES: the weights are stored
as 128 x 128 blocks, each block's 16 KB contiguous ([E, NW/128, K/128, 128, 128];
kernels/fused_moe_fp8_kernel.py's tile_weights): a tile's K loop streams whole blocks where the [E, NW, K] rows
give 128-byte runs.
"""

import triton
import triton.language as tl
from nanomoe_kernels.fp8_quant import _round_e4m3

_GROUP = tl.constexpr(128)  # the scale group (a jit function reads constexpr globals only)
_BLOCK_BYTES = tl.constexpr(128 * 128)  # one fp8 weight block (W_TILES)


@triton.jit
def _mma(a, b, acc, SWAP_AB: tl.constexpr):
    """acc + a [BM, BK] @ b [BK, BN] in float32, [BM, BN]; SWAP_AB: acc + b^T a^T, [BN, BM] (the tile
    stays transposed through the K loop: one transposition in the epilogue, not one per step)."""
    if SWAP_AB:
        out = tl.dot(tl.trans(b), tl.trans(a), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _partial(a, a_lo, b, zero, A_TERMS: tl.constexpr, SWAP_AB: tl.constexpr):
    """One scale group's float32 partial of fp8 A (hi, and lo when A_TERMS = 2) times the fp8 tile b; zero is
    a float32 zero tile of the partial's (possibly transposed) shape."""
    if A_TERMS == 2:  # both terms share the scale: lo accumulates onto hi in the MMA chain
        out = _mma(a_lo, b, _mma(a, b, zero, SWAP_AB), SWAP_AB)
    else:
        out = _mma(a, b, zero, SWAP_AB)
    return out


@triton.jit
def _promote(acc, part, a_s, bs_ptrs, g, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """acc + one scale group's float32 partial times its row (activation) and block (weight) scales; rows
    are dim 1 of the transposed tiles (SWAP_AB)."""
    if SWAP_AB:
        if BLOCK_N <= _GROUP:
            out = acc + part * (a_s * tl.load(bs_ptrs + g))[None, :]
        else:
            out = acc + part * a_s[None, :] * tl.load(bs_ptrs + g)[:, None]
    elif BLOCK_N <= _GROUP:  # an else, not an early return: the compiler visits code after a return too
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
              K_STEPS: tl.constexpr, A_FP8: tl.constexpr, A_TERMS: tl.constexpr, SWAP_AB: tl.constexpr,
              W_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    if W_TILES:  # [E, NW/128, K/128, 128, 128]: weight row n, group g is row n % 128 of block (n // 128, g)
        kg = K // _GROUP
        col = (offs_bn // _GROUP) * kg * _BLOCK_BYTES + (offs_bn % _GROUP) * _GROUP
        up_off = (N // _GROUP) * kg * _BLOCK_BYTES
        k_step = _BLOCK_BYTES  # the next scale group is the next 16 KB block
        # TMA over the blocks' 128-byte rows: (block * KG + g) * 128 + the tile's first row in its block
        tma_row = (expert * ((2 * N if SWIGLU else N) // _GROUP) + (pid_n * BLOCK_N) // _GROUP) * kg * _GROUP + \
            (pid_n * BLOCK_N) % _GROUP
        up_row = tma_row + (N // _GROUP) * kg * _GROUP
        row_step = _GROUP
        col_step = 0
    else:  # [E, NW, K] rows
        col = offs_bn.to(tl.int64) * stride_bn
        up_off = N * stride_bn
        k_step = BLOCK_K
        tma_row = expert * (2 * N if SWIGLU else N) + pid_n * BLOCK_N
        up_row = tma_row + N
        row_step = 0
        col_step = BLOCK_K
    b_ptrs = b_ptr + expert * stride_be + col[None, :].to(tl.int64) + offs_k[:, None]
    up_ptrs = b_ptrs + up_off
    tma_row = tma_row.to(tl.int32)
    up_row = up_row.to(tl.int32)
    bs_row = bs_ptr + expert * stride_bse
    if BLOCK_N <= _GROUP:
        bs_ptrs = bs_row + ((pid_n * BLOCK_N) // _GROUP) * stride_bsn  # one weight block: a scalar per step
    else:
        bs_ptrs = bs_row + (offs_bn // _GROUP) * stride_bsn  # per column
    up_bs_ptrs = bs_ptrs + (N // _GROUP) * stride_bsn

    if SWAP_AB:  # transposed accumulators, [BLOCK_N, BLOCK_M], until the epilogue
        zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = zero
    acc_up = zero
    for kk in range(0, K // (BLOCK_K * K_STEPS)):
        for st in tl.static_range(K_STEPS):  # K_STEPS scale groups per iteration: more bytes in flight per step
            g = kk * K_STEPS + st
            a = tl.load(a_ptrs + st * BLOCK_K, mask=row_ok[:, None], other=0.0)
            a_lo = a
            if A_TERMS == 2:  # the lo term: the same row, K columns on
                a_lo = tl.load(a_ptrs + K + st * BLOCK_K, mask=row_ok[:, None], other=0.0)
            if A_FP8:
                a_s = tl.load(as_ptrs + g * stride_ask, mask=row_ok, other=0.0)
            if USE_TMA:
                b = b_desc.load([tma_row + g * row_step, g * col_step]).T
            else:
                b = tl.load(b_ptrs + st * k_step)
            if A_FP8:
                acc = _promote(acc, _partial(a, a_lo, b, zero, A_TERMS, SWAP_AB), a_s, bs_ptrs, g, BLOCK_N, SWAP_AB)
            else:  # W8A16: the weight tile dequantised to A's dtype, one MMA chain (no per-step promotion)
                acc = tl.dot(a, _dequant(b, bs_ptrs, g, BLOCK_N, a.dtype), acc)
            if SWIGLU:
                if USE_TMA:
                    up = b_desc.load([up_row + g * row_step, g * col_step]).T
                else:
                    up = tl.load(up_ptrs + st * k_step)
                if A_FP8:
                    acc_up = _promote(acc_up, _partial(a, a_lo, up, zero, A_TERMS, SWAP_AB), a_s, up_bs_ptrs,
                                      g, BLOCK_N, SWAP_AB)
                else:
                    acc_up = tl.dot(a, _dequant(up, up_bs_ptrs, g, BLOCK_N, a.dtype), acc_up)
        up_ptrs += k_step * K_STEPS
        a_ptrs += BLOCK_K * K_STEPS
        b_ptrs += k_step * K_STEPS

    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if SWAP_AB:
        acc = tl.trans(acc)
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
        v = tl.minimum(tl.maximum(tl.div_rn(acc, scale[:, None]), -448.0), 448.0)
        q = _round_e4m3(v)
        tl.store(c_ptrs, q.to(c_ptr.dtype.element_ty), mask=c_mask)
        if A_TERMS == 2:  # the lo term (v - q exact in float32), N columns on
            lo = _round_e4m3(v - q)
            tl.store(c_ptrs + N, lo.to(c_ptr.dtype.element_ty), mask=c_mask)
        tl.store(cs_ptr + c_rows * stride_csm + pid_n * stride_csk, scale, mask=row_ok)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
