"""MLA decode stage 1, key-major: the same partials as kernels/mla_decode.py, computed transposed.

Dimension legend: R query rows, N heads, C latent (value) dims, Dr rope dims, Dc = C + Dr, L context,
G page size, K splits of the context, BH heads per program, BN cache rows per tile, BV = C / 2 value
rows of each accumulator half, BR rope dims padded.

Why transposed: the head-major kernel computes scores [BH, BN] and acc [BH, C] += p . v. With many
heads its [BH, C] float32 accumulator does not fit one program, so each program owns half of the value
columns and scores every tile twice (1.53x the counted FLOPs at V3 dims). Here the keys are the M side:
scores^T [BN, BH] = k . q^T, and acc^T [C, BH] += v^T . p^T, where v^T is the loaded tile seen
transposed (a shared-memory view, no copy) and p^T goes through shared memory as the MMA's B operand.
The C value rows of the accumulator spread over the warps (two halves of BV rows: a TMA box is at most
256 wide), so one program holds all 512 value columns of its heads, and the Hopper MMA (64 rows per
warpgroup) runs on BN = 64 key rows at any head count (16 heads as well). Softmax statistics reduce over
axis 0 (keys). Measured on the H200 (bench/results/mla_notes.md): Triton still puts every warp of the score
dot along M (8 warps over 64 keys score twice) and 4-warp programs need 32 heads at 255 registers, so this
is slower than the head-major kernel except for one query row with <= 16 heads, where it is the default.
Outputs, partials and lse match `_mla_decode_partial`, so the split reduction (`_mla_decode_reduce`) is shared.
"""

from __future__ import annotations

import triton
import triton.language as tl
from nanomoe_kernels.mla_tile_rows import split_range, tile_offsets, tile_row0
from nanomoe_kernels.reduce_ops import add as _add
from nanomoe_kernels.reduce_ops import maximum as _maximum


@triton.jit
def _tile_km(acc0, acc1, m_i, l_i, q0, q1, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr, seq, n0, end,
             stride_kv0, stride_kv1, stride_bt, max_len, scale_log2,
             C: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, PAGE_TILE: tl.constexpr,
             TMA: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
             BLOCK_R: tl.constexpr):
    """One tile of BN cache rows from n0: scores^T [BN, BH], online softmax over keys, acc^T += v^T p^T."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    if TMA and not MASKED:
        row0 = tile_row0(bt_ptr, seq, n0, stride_bt, max_len, PAGE, PAGED)
        k0 = lat_desc.load([row0, 0])
        k1 = lat_desc.load([row0, BLOCK_V])
        k_pe = pe_desc.load([row0, 0])
    else:
        mask_n = offs_n < end
        base = tile_offsets(bt_ptr, seq, n0, offs_n, mask_n, stride_kv0, stride_kv1, stride_bt, PAGE, PAGED,
                            PAGE_TILE, BLOCK_N)
        k_row = kv_ptr + base[:, None]
        row_ok = mask_n[:, None] if MASKED else offs_n[:, None] >= 0
        k0 = tl.load(k_row + offs_v[None, :], mask=row_ok & (offs_v[None, :] < C), other=0.0)
        k1 = tl.load(k_row + BLOCK_V + offs_v[None, :], mask=row_ok & (BLOCK_V + offs_v[None, :] < C), other=0.0)
        k_pe = tl.load(k_row + C + offs_r[None, :], mask=row_ok & (offs_r[None, :] < DR), other=0.0)
    s = tl.dot(k0, q0)
    s = tl.dot(k1, q1, s)
    s = tl.dot(k_pe, q_pe, s) * scale_log2                     # [BN, BH], base-2 logits
    if MASKED:
        s = tl.where((offs_n < end)[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 0, _maximum))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    l_i = l_i * alpha + tl.reduce(p, 0, _add)
    p = p.to(k0.dtype)
    acc0 = tl.dot(tl.trans(k0), p, acc0 * alpha[None, :])
    acc1 = tl.dot(tl.trans(k1), p, acc1 * alpha[None, :])
    return acc0, acc1, m_new, l_i


@triton.jit(do_not_specialize=["S", "SPLITS", "max_len"])
def _mla_decode_partial_km(
    q_ptr, kv_ptr, lat_desc, pe_desc, bt_ptr, len_ptr, o_ptr, lse_ptr,
    stride_qr, stride_qn, stride_kv0, stride_kv1, stride_bt,
    stride_or, stride_on, stride_ok, stride_lr, stride_ln,
    S, N, SPLITS, max_len, scale_log2,
    C: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, PAGE_TILE: tl.constexpr,
    TMA: tl.constexpr, FINAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, TRIGGER: tl.constexpr = False,
):
    """Program (head block, row, split): the split's partial output [BH, C] and base-2 lse [BH]
    (the normalised output when FINAL, K == 1). Same arguments as `_mla_decode_partial` less VSPLIT."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    hblk = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    seq = row // S
    start, end, end_full = split_range(len_ptr, row, split, SPLITS, max_len, BLOCK_N)

    offs_h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v = tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < N
    q_col = q_ptr + row.to(tl.int64) * stride_qr + offs_h[None, :] * stride_qn   # queries as columns
    q0 = tl.load(q_col + offs_v[:, None], mask=mask_h[None, :] & (offs_v[:, None] < C), other=0.0)
    q1 = tl.load(q_col + BLOCK_V + offs_v[:, None], mask=mask_h[None, :] & (BLOCK_V + offs_v[:, None] < C),
                 other=0.0)
    q_pe = tl.load(q_col + C + offs_r[:, None], mask=mask_h[None, :] & (offs_r[:, None] < DR), other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc0 = tl.full([BLOCK_V, BLOCK_H], 0.0, tl.float32)
    acc1 = tl.full([BLOCK_V, BLOCK_H], 0.0, tl.float32)
    if TMA:  # full tiles by TMA, then the row's ragged last tile by masked loads
        for n0 in range(start, end_full, BLOCK_N):
            acc0, acc1, m_i, l_i = _tile_km(acc0, acc1, m_i, l_i, q0, q1, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr,
                                            seq, n0, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2,
                                            C, DR, PAGE, PAGED, PAGE_TILE, True, False, BLOCK_N, BLOCK_V, BLOCK_R)
        # a loop of at most one tile, so it is pipelined like the plain path (loads straight into shared
        # memory): the same tile staged in registers came out wrong on Triton 3.6 (bench/gpu/mla_km_probe.py)
        for n0 in range(end_full, end, BLOCK_N):
            acc0, acc1, m_i, l_i = _tile_km(acc0, acc1, m_i, l_i, q0, q1, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr,
                                            seq, n0, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2,
                                            C, DR, PAGE, PAGED, PAGE_TILE, True, True, BLOCK_N, BLOCK_V, BLOCK_R)
    else:
        for n0 in range(start, end, BLOCK_N):
            acc0, acc1, m_i, l_i = _tile_km(acc0, acc1, m_i, l_i, q0, q1, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr,
                                            seq, n0, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2,
                                            C, DR, PAGE, PAGED, PAGE_TILE, False, True, BLOCK_N, BLOCK_V, BLOCK_R)

    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    o_ptrs = o_ptr + row.to(tl.int64) * stride_or + offs_h[None, :] * stride_on + split * stride_ok + offs_v[:, None]
    tl.store(o_ptrs, (acc0 * inv[None, :]).to(o_ptr.dtype.element_ty), mask=mask_h[None, :] & (offs_v[:, None] < C))
    tl.store(o_ptrs + BLOCK_V, (acc1 * inv[None, :]).to(o_ptr.dtype.element_ty),
             mask=mask_h[None, :] & (BLOCK_V + offs_v[:, None] < C))
    if not FINAL:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row.to(tl.int64) * stride_lr + offs_h * stride_ln + split, lse, mask=mask_h)


def block_v(latent: int) -> int:
    """BV: half of the latent width padded to a power of two, at least 16 (an MMA's smallest K/M)."""
    return max(16, triton.next_power_of_2(latent) // 2)
