"""Grouped expert GEMM for Hopper in Gluon: a producer partition feeds two consumer warpgroups of 64 rows each.

Dimension legend: R aligned rows (kernels.moe_align; each expert's rows padded to TM = 64), E experts, K depth (H
for the up GEMM, I for down), N output columns (I for up, H for down), NW weight rows per expert (2I for up, else
N), BH = 64 rows per consumer warpgroup (one wgmma M), BM = 2 * BH rows per program, BN weight rows per B tile,
BK = 64 deep steps, S ring stages.

Why this kernel: Triton's tl.dot kernel (kernels/fused_moe_kernel.py) issues the loads and the MMAs from the same
warps and keeps a SwiGLU tile at 128 x (2 x 128) with 8 warps; at 256-1024 rows per expert it runs at ~420-480
TFLOP/s, against ~600 for DeepGEMM's warp-specialised kernels on the same GEMMs
(bench/results/expert_ffn_notes.md). Here the roles are split by hand (Gluon, Triton >= 3.6):

    load      (1 warp)    per k-step, TMA of A [BH, BK] for each live half and B [NB, BK] (SwiGLU: the BN gate rows
                          and the BN up rows I further, NB = 2 BN; else NB = BN) into an S-stage ring (ready /
                          free mbarriers; free waits for both warpgroups); `gather` (4 warps) instead when A's
                          rows are gathered: A by 16-byte cp.async, B by TMA
    consume   (2 x 4 warps, half h = rows BH*h ..): acc [BH, NB] += A_h . B^T, one wgmma N = NB (A read once
                          per step), one k-step in flight, the stage before it released
    epilogue  (each half)  SwiGLU: silu(gate) * up from acc's two column halves (a register split); rows scaled
                          by their top-k weight (MUL_WEIGHT), stored at the row id (SCATTER_C) or the aligned row

The partitions are in kernels/fused_moe_wgmma_parts.py. A program walks tiles (one 128-row block x one column tile):
one tile each, or with `persistent` one program per SM over tiles pid, pid + SMs, ..., the ring's steps counted
across tiles so the load warp fills the next tile's first stages while the consumers finish the last one's
epilogue. Tiles follow kernels.moe_blocks' merged list (each expert's 128-row main blocks, then its 64-row tail
block), GROUP_M row blocks per column tile so an expert's blocks share the weight tiles through L2 (with
expert_group, groups of blocks of one expert only, as kernels/moe_blocks.expert_group). On a tail block the second
warpgroup computes nothing: it only paces the ring. Gathered rows (the up GEMM's: pair id // top-k, or through an
index) keep S - 1 steps in flight. Rows past a tensor's end and padding rows read as zeros, and padding rows
(sentinel ids) are never stored. Same outputs as the Triton kernel up to float32 summation order.

Measured on an H200 (bench/results/expert_ffn_notes.md, runs 133-141): 7-16% faster than the tl.dot kernel at the
boost clock, but under the sustained power cap only the up GEMM at ~1024 rows per expert and more gains (2-7%);
so kernels/tuned enables it (config key WGMMA) there and nowhere else.
"""

from __future__ import annotations

import functools

import torch
import triton
from nanomoe_kernels.mla_decode_tuning import triton_at_least
from nanomoe_kernels.mla_decode_wgmma import _is_sm90, gluon
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_blocks import BlockTables, block_tables

BH, BK = 64, 64

if gluon is not None:
    from nanomoe_kernels.fused_moe_wgmma_parts import _consume_partition, _gather_partition, _load_partition
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    # token counts change every step: do not compile a variant per divisibility of these two
    @gluon.jit(do_not_specialize=["num_rows", "num_blocks"])
    def _moe_gemm_ws(a_desc, b_desc, a_ptr, a_index_ptr, c_ptr, w_ptr, ids_ptr, rows_ptr, codes_ptr, used_ptr,
                     first_ptr, nblocks_ptr, sched_ptr, num_rows, N, K, NW, num_blocks, stride_am, stride_cm,
                     GATHER_A: gl.constexpr, A_DIV: gl.constexpr, A_INDEX: gl.constexpr, SWIGLU: gl.constexpr,
                     MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr, GROUP_M: gl.constexpr,
                     EXPERT_GROUP: gl.constexpr, DYNAMIC: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        dtype: gl.constexpr = a_desc.dtype
        # each program walks tiles pid, pid + programs, ... (one each unless the launch is persistent)
        tiling = (gl.load(used_ptr) + gl.load(used_ptr + 1), gl.cdiv(N, BLOCK_N), num_blocks, rows_ptr, codes_ptr,
                  first_ptr, nblocks_ptr, NW)
        a0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        a1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        b = gl.allocate_shared_memory(dtype, [STAGES, 2 * BLOCK_N if SWIGLU else BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=2 if GATHER_A else 1)   # gathered: B's expect + A's copies
            mbarrier.init(free.index(i), count=2)      # both warpgroups release a stage
        # DYNAMIC: the producer claims each next tile and hands it over through a 2-slot ring
        tile_s = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        tile_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        tile_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(tile_ready.index(i), count=1)
            mbarrier.init(tile_free.index(i), count=2)
        if GATHER_A:
            gl.warp_specialize([
                (_consume_partition, (a0, b, ready, free, 0, tiling, tile_s, tile_ready, tile_free, c_ptr, w_ptr,
                                      ids_ptr, num_rows, N, K, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C, BLOCK_N,
                                      GROUP_M, EXPERT_GROUP, DYNAMIC)),
                (_gather_partition, (a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, b, ready, free, tiling, sched_ptr,
                                     tile_s, tile_ready, tile_free, N, K, num_rows, stride_am, A_DIV, A_INDEX, SWIGLU,
                                     BLOCK_N, GROUP_M, EXPERT_GROUP, DYNAMIC, 4)),
                (_consume_partition, (a1, b, ready, free, 1, tiling, tile_s, tile_ready, tile_free, c_ptr, w_ptr,
                                      ids_ptr, num_rows, N, K, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C, BLOCK_N,
                                      GROUP_M, EXPERT_GROUP, DYNAMIC)),
            ], [4, 4], [64, 224])   # the gatherer's row pointers fit in 64 registers
        else:
            gl.warp_specialize([
                (_consume_partition, (a0, b, ready, free, 0, tiling, tile_s, tile_ready, tile_free, c_ptr, w_ptr,
                                      ids_ptr, num_rows, N, K, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C, BLOCK_N,
                                      GROUP_M, EXPERT_GROUP, DYNAMIC)),
                (_load_partition, (a_desc, b_desc, a0, a1, b, ready, free, tiling, sched_ptr, tile_s, tile_ready,
                                   tile_free, N, K, SWIGLU, BLOCK_N, GROUP_M, EXPERT_GROUP, DYNAMIC)),
                (_consume_partition, (a1, b, ready, free, 1, tiling, tile_s, tile_ready, tile_free, c_ptr, w_ptr,
                                      ids_ptr, num_rows, N, K, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C, BLOCK_N,
                                      GROUP_M, EXPERT_GROUP, DYNAMIC)),
            ], [1, 4], [24, 232])


def supported_triton() -> bool:
    """Gluon's Hopper API with the list-form warp_specialize (Triton >= 3.6)."""
    return gluon is not None and triton_at_least(3, 6)


def unsupported(a: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, block_k: int, align_block: int,
                swiglu: bool) -> str:
    """Why the wgmma kernel cannot run this GEMM ('' when it can); the caller then uses the Triton kernel."""
    if not supported_triton():
        return "the wgmma expert GEMM needs Triton >= 3.6 with Gluon's Hopper API"
    if not a.is_cuda or not _is_sm90(a.device.index or 0):
        return "the wgmma expert GEMM needs a compute-capability 9.0 GPU"
    if a.dtype not in (torch.bfloat16, torch.float16):
        return f"the wgmma expert GEMM needs bfloat16/float16, got {a.dtype}"
    if (block_m, align_block, block_k) != (2 * BH, BH, BK):
        return f"the wgmma expert GEMM needs BLOCK_M={2 * BH}, rows aligned to {BH} and BLOCK_K={BK}, got " \
               f"{block_m}, {align_block}, {block_k}"
    if block_n not in ((64, 128) if swiglu else (128, 256)):
        return f"the wgmma expert GEMM needs BLOCK_N in {(64, 128) if swiglu else (128, 256)}, got {block_n}"
    if a.shape[1] % BK:
        return f"the wgmma expert GEMM needs a depth (K) that is a multiple of {BK}, got {a.shape[1]}"
    if a.stride(0) * a.element_size() % 16 or a.data_ptr() % 16 or w.data_ptr() % 16:
        return "the wgmma expert GEMM needs 16-byte aligned rows of A and w (TMA and 16-byte copies)"
    return ""


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _smem_layout(rows: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, BK], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def moe_gemm_wgmma(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: Alignment, *, block_n: int,
                   stages: int, group_m: int, swiglu: bool, gather_a: bool, scatter_c: bool, a_div: int = 1,
                   row_weights: torch.Tensor | None = None, tables: BlockTables | None = None,
                   a_index: torch.Tensor | None = None, expert_group: int = 0, persistent: bool | int = False
                   ) -> torch.Tensor:
    """kernels.fused_moe_kernel.moe_gemm on Hopper (its checks there; `unsupported` must be ''): a [*, K] rows
    gathered through the alignment (gather_a: row id // a_div, then a_index) or [>= R, K] aligned, w [E, NW, K],
    out [*, N]; block_n = output columns per program; expert_group > 0: program groups of at most that many
    blocks of one expert (kernels/moe_blocks.expert_group), else group_m blocks a group; persistent True: one
    program per SM walks the tiles (the load warp fills the ring with a tile's first steps while the consumers
    finish the last one's), an int n: n programs, False: one program a tile. Returns out."""
    E, NW, K = w.shape
    N = NW // 2 if swiglu else NW
    if tables is None:
        tables = block_tables(align, 2 * BH)
    num_blocks = tables.merged_rows.numel()
    if num_blocks == 0 or N == 0 or K == 0:
        return out
    a_desc = GluonDescriptor(a, [a.shape[0], K], [a.stride(0), 1], [BH, BK], _smem_layout(BH, a.dtype))
    w2 = w.view(E * NW, K)
    b_desc = GluonDescriptor(w2, [E * NW, K], [K, 1], [block_n, BK], _smem_layout(block_n, a.dtype))
    tiles = num_blocks * triton.cdiv(N, block_n)   # a static bound: tiles past the blocks in use do nothing
    programs = min(tiles, _sm_count(a.device.index or 0) if persistent is True else persistent or tiles)
    # programs walking several tiles claim them through a counter (a tile's cost varies: tail blocks, unused ones)
    sched = torch.zeros(1, device=a.device, dtype=torch.int32) if programs < tiles else None
    _moe_gemm_ws[(programs,)](
        a_desc, b_desc, a, a_index, out, row_weights, align.sorted_ids, tables.merged_rows, tables.merged_codes,
        tables.counts, tables.expert_first, tables.expert_blocks, sched, align.num_rows, N, K, NW, num_blocks,
        a.stride(0), out.stride(0), GATHER_A=gather_a, A_DIV=a_div, A_INDEX=a_index is not None, SWIGLU=swiglu,
        MUL_WEIGHT=row_weights is not None, SCATTER_C=scatter_c, GROUP_M=group_m, EXPERT_GROUP=expert_group,
        DYNAMIC=programs < tiles, STAGES=stages,
        num_warps=4, maxnreg=168,
    )
    return out
