"""One output tile of the grouped MoE GEMM (Triton): the K loop and the fused epilogues, for one row block of one
expert; kernels/fused_moe_kernel.py's programs call it (its module docstring describes the epilogues).

Dimension legend: BM/BN/BK the tile (BLOCK_M rows x BLOCK_N output columns, BLOCK_K deep steps), N output columns
(I for gate/up with SwiGLU), K the reduction depth, NW = weight rows per expert (2N with SwiGLU, else N).

PAIR: the tile covers two column tiles, pid_n * BN .. + 2 BN, with one A stream and two accumulator sets. A
64-row tail block runs it so that it does a 128-row main block's MMA work per K step: both programs then walk K
at one pace, and the tail reads each weight chunk while the main blocks of its expert still hold it in L2
(a tail alone does half the work per step, runs ahead, and by the end of a deep K loop the main block reads its
chunks from DRAM again: bench/results/expert_ffn_notes.md, run 192).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_tile(acc, acc_up, c_ptr, w_ptr, ids, row_ok, offs_m, col0, N, stride_cm, SWIGLU: tl.constexpr,
                MUL_WEIGHT: tl.constexpr, SCATTER_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """silu(gate) * up (SWIGLU), the row weight (MUL_WEIGHT), then the valid rows and columns col0.. stored."""
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(w_ptr + ids, mask=row_ok, other=0.0)[:, None]
    if SCATTER_C:
        c_rows = ids.to(tl.int64)
    else:
        c_rows = offs_m.to(tl.int64)
    offs_cn = col0 + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_cn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_cn[None, :] < N))


@triton.jit
def _load_b(b_desc, b_ptrs, tma_row, k_ok, kk, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [BK, BN] weight chunk: through TMA (rows tma_row.. of W seen as [E * NW, K]) or by pointers."""
    if USE_TMA:
        b = b_desc.load([tma_row, kk * BLOCK_K]).T
    elif EVEN_K:
        b = tl.load(b_ptrs)
    else:
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
    return b


@triton.jit
def gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0, expert, pid_n,
              num_rows, N, K, stride_am, stride_be, stride_bn, stride_cm,
              A_DIV: tl.constexpr, GATHER_A: tl.constexpr, A_INDEX: tl.constexpr, SCATTER_C: tl.constexpr,
              SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr, USE_TMA: tl.constexpr, A_TMA: tl.constexpr,
              EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PAIR: tl.constexpr = False):
    """One BLOCK_M x BLOCK_N output tile (PAIR: x 2 BLOCK_N): aligned rows row0.. (all of one expert) times that
    expert's weight columns pid_n * BLOCK_N..; the epilogues; stores its valid rows."""
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
    # weight columns wrap (% N) so loads stay in bounds; wrapped columns are masked at the store
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    offs_bn2 = (pid_n * BLOCK_N + BLOCK_N + tl.arange(0, BLOCK_N)) % N  # PAIR: the second column tile
    b2_ptrs = b_ptr + expert * stride_be + offs_bn2[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    tma_row = (expert * (2 * N if SWIGLU else N) + pid_n * BLOCK_N).to(tl.int32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kk * BLOCK_K
        if A_TMA:  # contiguous A rows (the down GEMM): padding rows hold garbage, masked at the store
            a = a_desc.load([row0.to(tl.int32), kk * BLOCK_K])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, _load_b(b_desc, b_ptrs, tma_row, k_ok, kk, USE_TMA, EVEN_K, BLOCK_K), acc)
        if SWIGLU:  # the up rows of the same columns, N rows further
            acc_up = tl.dot(a, _load_b(b_desc, b_ptrs + N * stride_bn, tma_row + N, k_ok, kk, USE_TMA, EVEN_K,
                                       BLOCK_K), acc_up)
        if PAIR:
            acc2 = tl.dot(a, _load_b(b_desc, b2_ptrs, tma_row + BLOCK_N, k_ok, kk, USE_TMA, EVEN_K, BLOCK_K), acc2)
            if SWIGLU:
                acc2_up = tl.dot(a, _load_b(b_desc, b2_ptrs + N * stride_bn, tma_row + N + BLOCK_N, k_ok, kk,
                                            USE_TMA, EVEN_K, BLOCK_K), acc2_up)
            b2_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    _store_tile(acc, acc_up, c_ptr, w_ptr, ids, row_ok, offs_m, pid_n * BLOCK_N, N, stride_cm, SWIGLU, MUL_WEIGHT,
                SCATTER_C, BLOCK_N)
    if PAIR:
        _store_tile(acc2, acc2_up, c_ptr, w_ptr, ids, row_ok, offs_m, pid_n * BLOCK_N + BLOCK_N, N, stride_cm,
                    SWIGLU, MUL_WEIGHT, SCATTER_C, BLOCK_N)
