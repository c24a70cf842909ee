"""Swap-AB grouped expert GEMM for Hopper in Gluon: the tokens are wgmma's N, in blocks sized to each expert.

Dimension legend: R aligned rows (kernels.moe_align with block_m = 16), E experts, K depth (H for the up GEMM, I for
down), N output columns, NW weight rows per expert (2N with SwiGLU, else N), BW = 128 weight rows a program (64 per
consumer warpgroup: wgmma's M), BT = 256 tokens in the main ring + QX = 32 in the extra ring, BK = 64 deep steps,
S ring stages, NB the static bound of the blocks (kernels/moe_swap_blocks.py).

Why: the grouped kernel (kernels/fused_moe_wgmma.py) takes tokens as wgmma's M, so an expert's rows are covered by
128-row blocks and a 64-row tail block, and its time follows the weight-tile streams of those blocks, not their MMA
rows: at 272 rows an expert it takes 1.38x its time at 256, with uniform top-8 routing at 32 experts x 1024 tokens
(232-287 rows an expert) 1.15x. Here an expert of up to 288 rows is one block (larger ones are near-equal blocks)
that streams each weight tile once: out^T [BW, n] = W [BW, K] . T [n, K]^T (bench/results/expert_ffn_notes.md,
runs 253-258).

    load / gather   kernels/fused_moe_swap_load.py: the weight tile by TMA (SwiGLU: gate / up rows interleaved in
                    8-row boxes), the block's rows by TMA (aligned, the down GEMM's) or cp.async (gathered)
    consume (2 x 4 warps) kernels/fused_moe_swap_mma.py: warpgroup h's 64 weight rows against the block's tokens in
                    pieces (one n256 wgmma from FULL_FROM * 16 rows on), then the transposed epilogue: SwiGLU, the
                    top-k weight (MUL_WEIGHT), stored at the pair id (SCATTER_C) or the aligned row

Programs take GROUP_M consecutive blocks per sweep of the column tiles (an expert's blocks and the next's share the
weight tiles and the token rows through L2). Padding rows (sentinel ids) read as zeros or stale rows and are never
stored with SCATTER_C. Same sums as the grouped kernel: the FFN's outputs are bitwise equal (runs 258-261).

Measured on an H200, the whole FFN at V3 dims, 32 experts x 1024 tokens (bench/gpu/swap_ffn_probe.py, runs 260-261):
with the up GEMM's rows copied into aligned order first (PERMUTE_A, TMA loads) 3.1-3.2% faster than the grouped
kernels' entries, at 64 x 2048 1.0-1.1%; kernels/tuned uses that at those two sizes only (at 32 x 2048, ~512 rows an
expert, it is 5% slower). With the rows gathered by cp.async it is 14% slower (run 261; the offsets wait in shared
memory) to 50% (run 259; the offsets made again every step): the 4-warp gatherer, 64 registers a thread next to
consumers that need 224, does not keep up with 288 rows a step. Not yet measured: the gatherer's issue rate alone.
"""

from __future__ import annotations

import functools

import torch
import triton
from nanomoe_kernels.fused_moe_wgmma import SMEM_BYTES, supported_triton
from nanomoe_kernels.mla_decode_wgmma import _is_sm90, gluon
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_swap_blocks import GRAIN, MOST, SwapBlocks, max_swap_blocks, swap_blocks

BW, BT, QX, BK = 128, 256, MOST - 256, 64
FULL_FROM = 13   # blocks of more than 192 rows run one n256 wgmma a step (runs 256-257: pieces cost ~15%)

if gluon is not None:
    from nanomoe_kernels.fused_moe_swap_load import gather_partition, load_partition
    from nanomoe_kernels.fused_moe_swap_mma import consume_partition
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    @gluon.jit(do_not_specialize=["num_rows"])
    def _moe_gemm_swap(w_desc, t_desc, a_ptr, a_index_ptr, c_ptr, w_ptr, ids_ptr, rows_ptr, sizes_ptr, experts_ptr,
                       count_ptr, num_rows, N, NW, K, stride_am, stride_cm, GATHER_A: gl.constexpr,
                       A_DIV: gl.constexpr, A_INDEX: gl.constexpr, SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr,
                       SCATTER_C: gl.constexpr, GROUP: gl.constexpr, FULL: gl.constexpr, STAGES: gl.constexpr,
                       num_warps: gl.constexpr):
        W_ROWS: gl.constexpr = 128
        TOKENS: gl.constexpr = 256
        DEPTH: gl.constexpr = 64
        Q: gl.constexpr = 16
        OUT_W: gl.constexpr = W_ROWS // 2 if SWIGLU else W_ROWS   # output columns a program
        pid = gl.program_id(0)
        num_wt = N // OUT_W
        num_blocks = gl.load(count_ptr)
        per_group = GROUP * num_wt
        first = (pid // per_group) * GROUP
        size = gl.maximum(gl.minimum(num_blocks - first, GROUP), 1)
        blk = first + (pid % per_group) % size
        wt = (pid % per_group) // size
        if first >= num_blocks or wt >= num_wt:   # the grid is a static bound (NB blocks)
            return
        t_row0 = gl.load(rows_ptr + blk)
        n_rows = gl.load(sizes_ptr + blk)
        e = gl.load(experts_ptr + blk)
        nq = n_rows // Q
        col0 = wt * OUT_W
        k_steps = K // DEPTH
        dtype: gl.constexpr = w_desc.dtype
        wb = gl.allocate_shared_memory(dtype, [STAGES, W_ROWS, DEPTH], t_desc.layout)   # 128-byte swizzle
        tb = gl.allocate_shared_memory(dtype, [STAGES, TOKENS, DEPTH], t_desc.layout)
        tx = gl.allocate_shared_memory(dtype, [STAGES, 2 * Q, DEPTH], t_desc.layout)    # rows 256..287
        if GATHER_A:   # the gathered rows' offsets in A (kernels/fused_moe_swap_load.py)
            ROW_L: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            rs = gl.allocate_shared_memory(gl.int64, [TOKENS], ROW_L)
            rsx = gl.allocate_shared_memory(gl.int64, [2 * Q], ROW_L)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=2 if GATHER_A else 1)   # gathered: the weights' expect + the copies
            mbarrier.init(free.index(i), count=2)      # both warpgroups release a stage
        NV: gl.constexpr = TOKENS // Q + 2
        w_row0 = e * NW + col0
        # (the partitions' argument tuples are written out: a tuple bound to a name loses its constexprs)
        if GATHER_A:
            gl.warp_specialize([
                (consume_partition, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, nq,
                                     col0, k_steps, stride_cm, 0, FULL, NV, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (gather_partition, (a_ptr, a_index_ptr, ids_ptr, w_desc, wb, tb, tx, rs, rsx, ready, free, w_row0, N,
                                    t_row0, n_rows, k_steps, num_rows, stride_am, A_DIV, A_INDEX, SWIGLU, 4)),
                (consume_partition, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, nq,
                                     col0, k_steps, stride_cm, 1, FULL, NV, SWIGLU, MUL_WEIGHT, SCATTER_C)),
            ], [4, 4], [64, 224])   # 224 + 224 + 64 registers a thread: the consumers fit 224, not 208
        else:
            gl.warp_specialize([
                (consume_partition, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, nq,
                                     col0, k_steps, stride_cm, 0, FULL, NV, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (load_partition, (w_desc, t_desc, wb, tb, tx, ready, free, w_row0, N, t_row0, nq, k_steps, NV,
                                  SWIGLU)),
                (consume_partition, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, nq,
                                     col0, k_steps, stride_cm, 1, FULL, NV, SWIGLU, MUL_WEIGHT, SCATTER_C)),
            ], [1, 4], [48, 232])   # the loader: 16 TMA boxes a step with SwiGLU


def smem_bytes(stages: int) -> int:
    """Shared memory of the ring (the weight tile, the main and the extra token rings, 16-bit) and the gathered
    rows' int64 offsets."""
    return stages * (BW + BT + QX) * BK * 2 + (BT + QX) * 8


def unsupported(a: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, align_block: int, swiglu: bool,
                mul_weight: bool, stages: int) -> str:
    """Why the swap kernel cannot run this GEMM ('' when it can); kernels.fused_moe_kernel.moe_gemm then runs the
    Triton kernel on the same 16-row alignment."""
    if not supported_triton():
        return "the swap expert GEMM needs Triton >= 3.6 with Gluon's Hopper API"
    if not a.is_cuda or not _is_sm90(a.device.index or 0):
        return "the swap expert GEMM needs a compute-capability 9.0 GPU"
    if a.dtype not in (torch.bfloat16, torch.float16):
        return f"the swap expert GEMM needs bfloat16/float16, got {a.dtype}"
    bn = BW // 2 if swiglu else BW
    if (align_block, block_k, block_n) != (GRAIN, BK, bn):
        return f"the swap expert GEMM needs rows aligned to {GRAIN}, BLOCK_K={BK} and BLOCK_N={bn}, got " \
               f"{align_block}, {block_k}, {block_n}"
    if a.shape[1] % BK or w.shape[1] % BW:
        return f"the swap expert GEMM needs K and the weight rows in multiples of {BK} / {BW}, got " \
               f"{a.shape[1]}, {w.shape[1]}"
    if swiglu and mul_weight:
        return "the swap expert GEMM applies top-k weights only without SwiGLU (the down GEMM's)"
    if a.stride(0) * a.element_size() % 16 or a.data_ptr() % 16 or w.data_ptr() % 16:
        return "the swap expert GEMM needs 16-byte aligned rows of A and w (TMA and 16-byte copies)"
    if not 2 <= stages <= 4 or smem_bytes(stages) > SMEM_BYTES:
        return f"the swap expert GEMM needs num_stages in 2..4 within {SMEM_BYTES} bytes, got {stages}"
    return ""


@functools.cache
def _smem_layout(dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([BT, BK], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def moe_gemm_swap(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: Alignment, *, stages: int,
                  group: int, swiglu: bool, gather_a: bool, scatter_c: bool, a_div: int = 1,
                  row_weights: torch.Tensor | None = None, a_index: torch.Tensor | None = None,
                  blocks: SwapBlocks | None = None) -> torch.Tensor:
    """kernels.fused_moe_kernel.moe_gemm on the swap kernel (its checks there; `unsupported` must be ''): a [*, K]
    rows gathered through the alignment (gather_a: row id // a_div, then a_index) or [>= R, K] aligned, w [E, NW, K],
    out [*, N]; group: blocks a sweep of the column tiles; blocks: kernels.moe_swap_blocks.swap_blocks(align),
    made here when not given (one small launch). Returns out."""
    E, NW, K = w.shape
    N = NW // 2 if swiglu else NW
    nb = max_swap_blocks(align)
    if nb == 0 or N == 0 or K == 0:
        return out
    if blocks is None:
        blocks = swap_blocks(align)
    lay = _smem_layout(a.dtype)
    # the weight tile: one [BW, BK] box, or (SwiGLU) 8-row boxes interleaving gate and up rows
    w_desc = GluonDescriptor(w.view(E * NW, K), [E * NW, K], [K, 1], [8 if swiglu else BW, BK], lay)
    t_desc = GluonDescriptor(a, [a.shape[0], K], [a.stride(0), 1], [GRAIN, BK], lay)
    _moe_gemm_swap[(nb * triton.cdiv(N, BW // 2 if swiglu else BW),)](
        w_desc, t_desc, a, a_index, out, row_weights, align.sorted_ids, blocks.rows, blocks.sizes, blocks.experts,
        blocks.count, align.num_rows, N, NW, K, a.stride(0), out.stride(0), GATHER_A=gather_a, A_DIV=a_div,
        A_INDEX=a_index is not None, SWIGLU=swiglu, MUL_WEIGHT=row_weights is not None, SCATTER_C=scatter_c,
        GROUP=group, FULL=FULL_FROM, STAGES=stages, num_warps=4, maxnreg=168,
    )
    return out
