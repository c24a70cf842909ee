"""The grouped MoE GEMM as one persistent launch (Triton): a program per SM walks the merged block list's tiles.

Dimension legend: BM/BN/BK the tile, TM the alignment block (tail rows), N output columns (I for gate/up with
SwiGLU), K depth, NW weight rows per expert, P = #SMs programs, R aligned rows.

Why: kernels/fused_moe_kernel.py launches one program per (block, column tile); each program fills its pipeline,
runs its K loop, and writes its epilogue while no load of the next tile is in flight. At the down GEMM's short
K loop (2048 deep: 32 steps) that fill and that epilogue are a large share of a program. Here program p takes
tiles p, p + P, ... of the same order (GROUP_M blocks a group, or one expert's blocks: moe_blocks.expert_group),
and `tl.range(..., flatten=True)` lets Triton pipeline across the tile boundary, so the next tile's loads run
under this tile's epilogue. Every tile has BM rows, so a tail block runs as a BM-row tile: after a main block of
its expert it ends at its last row (the first BM - TM rows are the main block's, as OVERLAP_TAILS in
fused_moe_kernel), else (an expert with fewer than BM rows) it starts at its first row and its rows past TM are
masked. Rows outside [lo, hi) of a tile read as zeros (gathered A) and are never stored.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_blocks import expert_group


@functools.cache
def num_programs(device_index: int) -> int:
    """Programs of a persistent launch: one per SM (4 under the interpreter)."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _load_w(b_desc, b_ptrs, tma_row, k_ok, kk, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # a [BK, BN] weight chunk: through TMA (rows tma_row.. of W seen as [E * NW, K]) or by pointers
    if USE_TMA:
        b = b_desc.load([tma_row, kk * BLOCK_K]).T
    elif EVEN_K:
        b = tl.load(b_ptrs)
    else:
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
    return b


@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def moe_gemm_persistent_kernel(
    a_ptr, b_ptr, b_desc, a_desc, c_ptr, w_ptr, sorted_ids_ptr, block_rows_ptr, block_codes_ptr, used_ptr,
    a_index_ptr, expert_first_ptr, expert_blocks_ptr,
    num_rows, R, N, K, num_blocks, stride_am, stride_be, stride_bn, stride_cm,
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, A_INDEX: tl.constexpr, SCATTER_C: tl.constexpr, SWIGLU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, USE_TMA: tl.constexpr, A_TMA: tl.constexpr, EVEN_K: tl.constexpr, TAIL_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EXPERT_GROUP: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    num_pid_n = tl.cdiv(N, BLOCK_N)
    used = tl.load(used_ptr) + tl.load(used_ptr + 1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    r = tl.arange(0, BLOCK_M)
    for t in tl.range(tl.program_id(0), used * num_pid_n, NUM_PROGRAMS, flatten=True):
        if EXPERT_GROUP > 0:
            pid_m, pid_n = expert_group(t, num_pid_n, block_codes_ptr, expert_first_ptr, expert_blocks_ptr,
                                        EXPERT_GROUP)
        else:
            per_group = GROUP_M * num_pid_n
            first_m = (t // per_group) * GROUP_M
            group_m = tl.minimum(used - first_m, GROUP_M)
            pid_m = first_m + (t % per_group) % group_m
            pid_n = (t % per_group) // group_m
        row0 = tl.load(block_rows_ptr + pid_m)
        code = tl.load(block_codes_ptr + pid_m)
        expert = (code & 0xFFFFFF).to(tl.int64)
        prev = tl.load(block_codes_ptr + tl.maximum(pid_m - 1, 0))
        tail = code >= 0x40000000
        after_main = tail & (pid_m > 0) & (prev == (code & 0xFFFFFF))
        # [lo, hi): this tile's own rows; a tail after a main block ends at its last row, a lone tail starts there
        row0 = tl.where(after_main, row0 - (BLOCK_M - TAIL_M), row0)
        lo = tl.where(after_main, BLOCK_M - TAIL_M, 0)
        hi = tl.where(tail & ~after_main, TAIL_M, BLOCK_M)
        offs_m = row0 + r
        in_tile = (r >= lo) & (r < hi) & (offs_m < R)
        ids = tl.load(sorted_ids_ptr + offs_m, mask=in_tile, other=num_rows)
        row_ok = ids < num_rows
        if GATHER_A:
            a_rows = (tl.where(row_ok, ids, 0) // A_DIV).to(tl.int64)
            if A_INDEX:
                a_rows = tl.load(a_index_ptr + a_rows, mask=row_ok, other=0).to(tl.int64)
        else:
            a_rows = offs_m.to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N   # wrapped columns are masked at the store
        b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        tma_row = (expert * (2 * N if SWIGLU else N) + pid_n * BLOCK_N).to(tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, k_tiles):
            k_ok = offs_k < K - kk * BLOCK_K
            if A_TMA:  # contiguous A rows (the down GEMM): rows outside [lo, hi) are masked at the store
                a = a_desc.load([row0.to(tl.int32), kk * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, _load_w(b_desc, b_ptrs, tma_row, k_ok, kk, USE_TMA, EVEN_K, BLOCK_K), acc)
            if SWIGLU:  # the up rows of the same columns, N rows further
                acc_up = tl.dot(a, _load_w(b_desc, b_ptrs + N * stride_bn, tma_row + N, k_ok, kk, USE_TMA, EVEN_K,
                                           BLOCK_K), acc_up)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + ids, mask=row_ok, other=0.0)[:, None]
        c_rows = ids.to(tl.int64) if SCATTER_C else offs_m.to(tl.int64)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + c_rows[:, None] * stride_cm + offs_cn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_cn[None, :] < N))
