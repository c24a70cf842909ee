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
                          rows are gathered: A by 16-byte cp.async, B by TMA (kernels/fused_moe_wgmma_load.py)
    consume   (2 x 4 warps, half h = rows BH*h ..): acc [BH, NB] += A_h . B^T, one wgmma N = NB (A read once
                          per step), one k-step in flight, the stage before it released
    epilogue  (each half)  SwiGLU: silu(gate) * up from acc's two column halves (a register split); rows scaled
                          by their top-k weight (MUL_WEIGHT), stored at the row id (SCATTER_C) or the aligned row;
                          STAGE_C: through a [BH, min(BN, 128)] shared buffer a warpgroup, as 16-byte row pieces
                          (kernels/fused_moe_wgmma_epilogue.py; 32 KB next to the ring: 224 KB at 4 stages)

Programs walk kernels.moe_blocks' merged list (each expert's 128-row main blocks, then its 64-row tail block), GROUP_M
row blocks per column tile so an expert's blocks share the weight tiles through L2 (with expert_group, groups of
blocks of one expert only, as kernels/moe_blocks.expert_group). On a tail block the second
warpgroup computes nothing: it only paces the ring. With TAIL_N an expert's last main block carries a tail of at
most TAIL_N real rows, swapped (out^T += W . T^T, kernels/fused_moe_wgmma_tail.py), and the tail block exits at
once. Gathered rows (the up GEMM's: pair id // top-k, or through an
index) keep S - 1 steps in flight. Rows past a tensor's end and padding rows read as zeros, and padding rows
(sentinel ids) are never stored. Same outputs as the Triton kernel up to float32 summation order.

Measured on an H200 (bench/results/expert_ffn_notes.md, runs 133-141): 7-16% faster than the tl.dot kernel at the
boost clock, but under the sustained power cap only the up GEMM at ~1024 rows per expert and more gained (2-7%).
The staged epilogue (runs 237-240) made the down GEMM 3-9% faster and the up GEMM 0-2%, so kernels/tuned enables it
(config keys WGMMA, STAGE_C) for the up GEMM at 128-1024 rows per expert and for the down GEMM at two sizes.
"""

from __future__ import annotations

import functools

import torch
import triton
from nanomoe_kernels.mla_decode_tuning import triton_at_least
from nanomoe_kernels.mla_decode_wgmma import _is_sm90, gluon
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_blocks import BlockTables, block_tables, expert_group

BH, BK = 64, 64
SMEM_BYTES = 232448   # the dynamic shared memory one block may use on sm_90

if gluon is not None:
    from nanomoe_kernels.fused_moe_wgmma_epilogue import store_tile
    from nanomoe_kernels.fused_moe_wgmma_load import gather_partition, load_partition
    from nanomoe_kernels.fused_moe_wgmma_tail import carry_loop, store_carried
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    @gluon.jit
    def _main_loop(a_s, b, ready, free, k_steps, acc):
        S: gl.constexpr = a_s.type.shape[0]
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(ready.index(s), (kk // S) & 1)
            acc = warpgroup_mma(a_s.index(s), b.index(s).permute((1, 0)), acc, is_async=True)
            # the previous step's wgmma has retired: its stage goes back to the loader
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(free.index((kk + S - 1) % S), count=1, pred=kk > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index((k_steps + S - 1) % S), count=1)
        return acc

    @gluon.jit
    def _finish(acc, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SWIGLU: gl.constexpr,
                MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr, STAGE_C: gl.constexpr):
        if SWIGLU:   # [gate | up] columns -> silu(gate) * up, a register split (no data movement)
            gate, up = acc.reshape([acc.type.shape[0], 2, acc.type.shape[1] // 2]).permute((0, 2, 1)).split()
            y = gate / (1.0 + gl.exp(-gate)) * up
        else:
            y = acc
        store_tile(y, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, MUL_WEIGHT, SCATTER_C, STAGE_C)

    @gluon.jit
    def _consume_partition(a_s, b, t, cs, ready, free, k_steps, live, carry, c_ptr, w_ptr, ids_ptr, row0, trow0, col0,
                           num_rows, N, stride_cm, SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr,
                           SCATTER_C: gl.constexpr, STAGE_C: gl.constexpr, H: gl.constexpr, TAIL_N: gl.constexpr):
        S: gl.constexpr = a_s.type.shape[0]
        BLOCK_H: gl.constexpr = a_s.type.shape[1]
        ACC_N: gl.constexpr = b.type.shape[1]
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ACC_N, 16])
        acc = gl.zeros([BLOCK_H, ACC_N], gl.float32, ACC)
        if live:
            # the carried tail's loop and epilogue in a branch of their own: the plain path keeps its registers
            if TAIL_N > 0:
                if carry:   # warpgroup H's pieces of the B tile (fused_moe_wgmma_tail.py)
                    TL: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                 instr_shape=[16, TAIL_N, 16])
                    R1: gl.constexpr = 128 + 64 * H if ACC_N == 256 else -1
                    t0 = gl.zeros([BLOCK_H, TAIL_N], gl.float32, TL)
                    t1 = gl.zeros([BLOCK_H, TAIL_N], gl.float32, TL)
                    acc, t0, t1 = carry_loop(a_s, b, t, ready, free, k_steps, acc, t0, t1, 64 * H, R1)
                    _finish(acc, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                            SCATTER_C, STAGE_C)
                    store_carried(t0, t1, c_ptr, w_ptr, ids_ptr, trow0, col0 + 64 * H, num_rows, N, stride_cm, SWIGLU,
                                  MUL_WEIGHT, SCATTER_C, R1)
                else:
                    acc = _main_loop(a_s, b, ready, free, k_steps, acc)
                    _finish(acc, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                            SCATTER_C, STAGE_C)
            else:
                acc = _main_loop(a_s, b, ready, free, k_steps, acc)
                _finish(acc, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                        SCATTER_C, STAGE_C)
        else:   # a tail block's second half: no rows here, only keep the ring's phases in step
            for kk in range(k_steps):
                s = kk % S
                mbarrier.wait(ready.index(s), (kk // S) & 1)
                mbarrier.arrive(free.index(s), count=1)

    # token counts change every step: do not compile a variant per divisibility of these two
    @gluon.jit(do_not_specialize=["num_rows", "num_blocks"])
    def _moe_gemm_ws(a_desc, b_desc, t_desc, a_ptr, a_index_ptr, c_ptr, w_ptr, ids_ptr, rows_ptr, codes_ptr, tails_ptr,
                     used_ptr, first_ptr, nblocks_ptr, num_rows, N, K, NW, num_blocks, stride_am, stride_cm,
                     GATHER_A: gl.constexpr, A_DIV: gl.constexpr, A_INDEX: gl.constexpr, SWIGLU: gl.constexpr,
                     MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr, GROUP_M: gl.constexpr,
                     EXPERT_GROUP: gl.constexpr, STAGE_C: gl.constexpr, CS_N: gl.constexpr, CS_LAYOUT: gl.constexpr,
                     TAIL_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        dtype: gl.constexpr = a_desc.dtype
        pid = gl.program_id(0)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_m = gl.minimum(num_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        used = gl.load(used_ptr) + gl.load(used_ptr + 1)
        if EXPERT_GROUP > 0:  # groups of blocks of one expert only (kernels/moe_blocks.expert_group)
            if pid // num_pid_n >= used:
                return
            pid_m, pid_n = expert_group(pid, num_pid_n, codes_ptr, first_ptr, nblocks_ptr, EXPERT_GROUP)
        elif pid_m >= used:
            return
        row0 = gl.load(rows_ptr + pid_m)
        code = gl.load(codes_ptr + pid_m)
        expert = code & 0x3FFFFFFF
        live1 = code < 0x40000000          # a main block: both halves hold rows (a tail block: the first only)
        if TAIL_N > 0:   # carried tails (kernels/fused_moe_wgmma_tail.py): a carried tail block has nothing to do
            flags = gl.load(tails_ptr + pid_m) >> (0 if TAIL_N == 32 else 2)   # kernels/moe_blocks' merged_tails
            if (flags & 2) != 0:
                return
            carry = (flags & 1) != 0
        else:
            carry = False
        col0 = pid_n * BLOCK_N
        brow0 = expert * NW + col0
        k_steps = gl.cdiv(K, BLOCK_K)

        a0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        a1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        b = gl.allocate_shared_memory(dtype, [STAGES, 2 * BLOCK_N if SWIGLU else BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=2 if GATHER_A else 1)   # gathered: B's expect + A's copies
            mbarrier.init(free.index(i), count=2)      # both warpgroups release a stage
        if STAGE_C:   # each warpgroup's [BH, CN] epilogue buffer (kernels/fused_moe_wgmma_epilogue.py)
            cs = gl.allocate_shared_memory(dtype, [2, BLOCK_H, CS_N], CS_LAYOUT)
        else:
            cs = a0   # unused
        if TAIL_N > 0:
            t = gl.allocate_shared_memory(dtype, [STAGES, TAIL_N, BLOCK_K], t_desc.layout)
        else:
            t = a0   # unused
        trow0 = row0 + 2 * BLOCK_H
        # (the partitions' argument tuples are written out: a tuple bound to a name loses its constexprs)
        if GATHER_A:
            gl.warp_specialize([
                (_consume_partition, (a0, b, t, cs.index(0), ready, free, k_steps, code >= 0, carry, c_ptr, w_ptr,
                                      ids_ptr, row0, trow0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                                      SCATTER_C, STAGE_C, 0, TAIL_N)),
                (gather_partition, (a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, b, t, ready, free, row0, brow0, N,
                                     live1, carry, k_steps, num_rows, stride_am, A_DIV, A_INDEX, SWIGLU, TAIL_N, 4)),
                (_consume_partition, (a1, b, t, cs.index(1), ready, free, k_steps, live1, carry, c_ptr, w_ptr, ids_ptr,
                                      row0 + BLOCK_H, trow0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                                      SCATTER_C, STAGE_C, 1, TAIL_N)),
            ], [4, 4], [64, 224])   # the gatherer's row pointers fit in 64 registers
        else:
            gl.warp_specialize([
                (_consume_partition, (a0, b, t, cs.index(0), ready, free, k_steps, code >= 0, carry, c_ptr, w_ptr,
                                      ids_ptr, row0, trow0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                                      SCATTER_C, STAGE_C, 0, TAIL_N)),
                (load_partition, (a_desc, b_desc, t_desc, a0, a1, b, t, ready, free, row0, brow0, N, live1, carry,
                                   k_steps, SWIGLU, TAIL_N)),
                (_consume_partition, (a1, b, t, cs.index(1), ready, free, k_steps, live1, carry, c_ptr, w_ptr, ids_ptr,
                                      row0 + BLOCK_H, trow0, col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT,
                                      SCATTER_C, STAGE_C, 1, TAIL_N)),
            ], [1, 4], [24, 232])


def supported_triton() -> bool:
    """Gluon's Hopper API with the list-form warp_specialize (Triton >= 3.6)."""
    return gluon is not None and triton_at_least(3, 6)


def smem_bytes(block_n: int, swiglu: bool, tail_n: int, stages: int, stage_c: bool) -> int:
    """Shared memory of the ring (A halves, the B tile, the carried tail's rows) and the staging buffers (16-bit)."""
    return stages * (2 * BH + (2 if swiglu else 1) * block_n + tail_n) * BK * 2 + (2 * BH * 128 * 2 if stage_c else 0)


def unsupported(a: torch.Tensor, w: torch.Tensor, block_m: int, block_n: int, block_k: int, align_block: int,
                swiglu: bool, tail_n: int = 0, stages: int = 4, stage_c: bool = False) -> str:
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
    if tail_n not in (0, 16, 32) or (tail_n and swiglu and block_n != 128):
        return f"carried tails need TAIL_N in (16, 32) and, with SwiGLU, BLOCK_N=128; got {tail_n}, {block_n}"
    smem = smem_bytes(block_n, swiglu, tail_n, stages, stage_c)
    if smem > SMEM_BYTES:
        return f"the wgmma expert GEMM's shared memory ({smem} bytes at {stages} stages, TAIL_N={tail_n}, " \
               f"STAGE_C={stage_c}) exceeds the {SMEM_BYTES} an H100/H200 block may use"
    return ""


@functools.cache
def _smem_layout(rows: int, dtype: torch.dtype, cols: int = BK):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def moe_gemm_wgmma(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: Alignment, *, block_n: int,
                   stages: int, group_m: int, swiglu: bool, gather_a: bool, scatter_c: bool, a_div: int = 1,
                   row_weights: torch.Tensor | None = None, tables: BlockTables | None = None,
                   a_index: torch.Tensor | None = None, expert_group: int = 0, stage_c: bool = False,
                   tail_n: int = 0) -> torch.Tensor:
    """kernels.fused_moe_kernel.moe_gemm on Hopper (its checks there; `unsupported` must be ''): a [*, K] rows
    gathered through the alignment (gather_a: row id // a_div, then a_index) or [>= R, K] aligned, w [E, NW, K],
    out [*, N]; block_n = output columns per program; expert_group > 0: program groups of at most that many
    blocks of one expert (kernels/moe_blocks.expert_group), else group_m blocks a group; stage_c: the output tile
    goes out through shared memory as 16-byte row pieces (kernels/fused_moe_wgmma_epilogue.py); tail_n (16 or 32):
    an expert's last main block carries its tail of at most that many rows (kernels/fused_moe_wgmma_tail.py).
    Returns out."""
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
    cs_n = min(block_n, 128)   # staging columns: [BH, 128] is 16 KB a warpgroup, so 4 ring stages still fit
    t_desc = GluonDescriptor(a, [a.shape[0], K], [a.stride(0), 1], [tail_n, BK], _smem_layout(tail_n, a.dtype)) \
        if tail_n else None
    _moe_gemm_ws[(num_blocks * triton.cdiv(N, block_n),)](
        a_desc, b_desc, t_desc, a, a_index, out, row_weights, align.sorted_ids, tables.merged_rows, tables.merged_codes,
        tables.merged_tails, tables.counts, tables.expert_first, tables.expert_blocks, align.num_rows, N, K, NW,
        num_blocks, a.stride(0), out.stride(0), GATHER_A=gather_a, A_DIV=a_div, A_INDEX=a_index is not None,
        SWIGLU=swiglu, MUL_WEIGHT=row_weights is not None, SCATTER_C=scatter_c, GROUP_M=group_m,
        EXPERT_GROUP=expert_group, STAGE_C=stage_c, CS_N=cs_n, CS_LAYOUT=_smem_layout(BH, a.dtype, cs_n),
        TAIL_N=tail_n, STAGES=stages, num_warps=4, maxnreg=168,   # 12 warps x 168 fill the register file
    )
    return out
