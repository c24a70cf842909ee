"""Grouped expert GEMM for Hopper in Gluon with three consumer warpgroups: up to 192 rows of one expert per program.

Dimension legend (as kernels/fused_moe_wgmma.py): R aligned rows (each expert's rows padded to BH = 64), E experts,
K depth, N output columns, NW weight rows per expert (2N for SwiGLU), BK = 64 deep steps, S ring stages, NB B-tile
rows (SwiGLU: BN gate rows then BN up rows), G live 64-row groups of a program (1-3).

Why: kernels/fused_moe_wgmma.py runs 128-row main blocks and 64-row tail blocks, so an expert with 129-192 rows
streams its weights twice, and its tail program runs half the MMA work per weight tile (bench/results/
expert_ffn_notes.md, runs 192-199: at ~128 rows per expert our up GEMM runs ~480 TFLOP/s of padded rows against
cuBLAS's ~645 with one 128 x 168 tile per expert). Here each program owns one expert's 64-row groups, up to three:

    load      (1 warp; 4 to gather)  per k-step TMA of A [BH, BK] for each live group (or 16-byte cp.async of the
                                     gathered rows) and B [NB, BK] into an S-stage ring
    consume   (3 x 4 warps)          group h: acc [BH, NB] += A_h . B^T, one m64 x NB wgmma a k16 step, the same
                                     consumer and epilogue as kernels/fused_moe_wgmma.py; a dead group paces the ring

Per k-step the three consumers read as much shared memory per FLOP as the two of the 128-row kernel, and the ring
moves 8.9 KB per MFLOP instead of 11.4 (128-row blocks) or 19 (64-row tails). Tables (`balanced_tables`): an
expert with n groups runs ceil(n / 3) programs of near-equal group counts (4 groups: 2 + 2, not 3 + 1). A
program's group count rides in the low bits of its first row (rows are multiples of 64).
"""

from __future__ import annotations

import torch
import triton
from nanomoe_kernels.fused_moe_wgmma import BH, BK, GluonDescriptor, _smem_layout, supported_triton, unsupported
from nanomoe_kernels.mla_decode_wgmma import gluon
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_blocks import BlockTables, expert_group

GROUPS = 3          # consumer warpgroups a program
ROW_BITS = 63       # a table row's low bits: the program's live groups (its first row is a multiple of BH)

if gluon is not None:
    from nanomoe_kernels.fused_moe_wgmma import _consume_partition, _cp_async, _load_b
    from nanomoe_kernels.mla_decode_wgmma import _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    @gluon.jit
    def _load3_partition(a_desc, b_desc, a0, a1, a2, b, ready, free, row0, brow0, N, nlive, k_steps,
                         SWIGLU: gl.constexpr):
        S: gl.constexpr = a0.type.shape[0]
        a_bytes: gl.constexpr = a_desc.block_type.nbytes
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        BLOCK_H: gl.constexpr = a0.type.shape[1]
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * a0.type.shape[2]
            if nlive > 2:   # expect takes a constant byte count
                mbarrier.expect(bar, 3 * a_bytes + b_bytes)
                _tma_load(a_desc, [row0 + 2 * BLOCK_H, k], bar, a2.index(s))
                _tma_load(a_desc, [row0 + BLOCK_H, k], bar, a1.index(s))
            elif nlive > 1:
                mbarrier.expect(bar, 2 * a_bytes + b_bytes)
                _tma_load(a_desc, [row0 + BLOCK_H, k], bar, a1.index(s))
            else:
                mbarrier.expect(bar, a_bytes + b_bytes)
            _tma_load(a_desc, [row0, k], bar, a0.index(s))
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)

    @gluon.jit
    def _a_ptrs(a_ptr, a_index_ptr, ids_ptr, pos, offs_k, live, num_rows, stride_am, A_DIV: gl.constexpr,
                A_INDEX: gl.constexpr):
        """Pointers to the first BK columns of each aligned row's source (pair id // A_DIV, then a_index) and
        the live rows' mask; a dead group reads no ids (its rows may lie past R)."""
        ids = gl.load(ids_ptr + pos, mask=live, other=num_rows)
        ok = ids < num_rows
        rows = gl.where(ok, ids, 0) // A_DIV
        if A_INDEX:
            rows = gl.load(a_index_ptr + rows, mask=ok, other=0)
        rows = rows.to(gl.int64)
        # row starts are 16-byte aligned (`unsupported` checks the stride): 16-byte copies
        return a_ptr + gl.expand_dims(gl.multiple_of(rows * stride_am, 8), 1) + offs_k, gl.expand_dims(ok, 1)

    @gluon.jit
    def _gather3_partition(a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, a2, b, ready, free, row0, brow0, N, nlive,
                           k_steps, num_rows, stride_am, A_DIV: gl.constexpr, A_INDEX: gl.constexpr,
                           SWIGLU: gl.constexpr, num_warps: gl.constexpr):
        """A's rows gathered by cp.async (S - 1 steps in flight) and B by TMA, into the ring."""
        S: gl.constexpr = a0.type.shape[0]
        BLOCK_H: gl.constexpr = a0.type.shape[1]
        BLOCK_K: gl.constexpr = a0.type.shape[2]
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        offs_k = gl.expand_dims(gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LD)), 0)
        r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD))
        p0, ok0 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + r, offs_k, True, num_rows, stride_am, A_DIV, A_INDEX)
        p1, ok1 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + BLOCK_H + r, offs_k, nlive > 1, num_rows, stride_am, A_DIV,
                          A_INDEX)
        p2, ok2 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + 2 * BLOCK_H + r, offs_k, nlive > 2, num_rows, stride_am,
                          A_DIV, A_INDEX)
        for kk in range(k_steps):
            # step kk - S + 1's copies have landed (S - 2 groups may stay in flight): its stage is ready. Done before
            # waiting for stage kk's slot, which the consumers free only once they have that step.
            if kk >= S - 1:
                async_copy.wait_group(S - 2)
                fence_async_shared()
                mbarrier.arrive(ready.index((kk - S + 1) % S), count=1)
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)
            bar = ready.index(s)
            k = kk * BLOCK_K
            mbarrier.expect(bar, b_bytes)
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)
            _cp_async(a0.index(s), p0 + k, mask=ok0)   # K % BK == 0
            if nlive > 1:
                _cp_async(a1.index(s), p1 + k, mask=ok1)
            if nlive > 2:
                _cp_async(a2.index(s), p2 + k, mask=ok2)
            async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        for j in range(gl.maximum(k_steps - S + 1, 0), k_steps):
            mbarrier.arrive(ready.index(j % S), count=1)

    # token counts change every step: do not compile a variant per divisibility of these two
    @gluon.jit(do_not_specialize=["num_rows", "num_blocks"])
    def _moe_gemm_wg3(a_desc, b_desc, a_ptr, a_index_ptr, c_ptr, w_ptr, ids_ptr, rows_ptr, codes_ptr, used_ptr,
                      first_ptr, nblocks_ptr, num_rows, N, K, NW, num_blocks, stride_am, stride_cm,
                      GATHER_A: gl.constexpr, A_DIV: gl.constexpr, A_INDEX: gl.constexpr, SWIGLU: gl.constexpr,
                      MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr, GROUP_M: gl.constexpr,
                      EXPERT_GROUP: gl.constexpr, STAGES: gl.constexpr, LOADER_REGS: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
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
        used = gl.load(used_ptr)
        if EXPERT_GROUP > 0:  # groups of blocks of one expert only (kernels/moe_blocks.expert_group)
            if pid // num_pid_n >= used:
                return
            pid_m, pid_n = expert_group(pid, num_pid_n, codes_ptr, first_ptr, nblocks_ptr, EXPERT_GROUP)
        elif pid_m >= used:
            return
        packed = gl.load(rows_ptr + pid_m)
        nlive = packed & 63      # ROW_BITS
        row0 = packed - nlive
        col0 = pid_n * BLOCK_N
        brow0 = gl.load(codes_ptr + pid_m) * NW + col0
        k_steps = gl.cdiv(K, BLOCK_K)

        a0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        a1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        a2 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
        b = gl.allocate_shared_memory(dtype, [STAGES, 2 * BLOCK_N if SWIGLU else BLOCK_N, BLOCK_K], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=2 if GATHER_A else 1)   # gathered: B's expect + A's copies
            mbarrier.init(free.index(i), count=3)      # every warpgroup releases a stage
        # the producer is the default partition: the three consumers' 128-register accumulators need the
        # registers that setmaxnreg gives the worker partitions (ptxas holds the default one to maxnreg)
        if GATHER_A:
            gl.warp_specialize([
                (_gather3_partition, (a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, a2, b, ready, free, row0, brow0,
                                      N, nlive, k_steps, num_rows, stride_am, A_DIV, A_INDEX, SWIGLU, num_warps)),
                (_consume_partition, (a0, b, ready, free, k_steps, nlive > 0, c_ptr, w_ptr, ids_ptr, row0, col0,
                                      num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (_consume_partition, (a1, b, ready, free, k_steps, nlive > 1, c_ptr, w_ptr, ids_ptr, row0 + BLOCK_H,
                                      col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (_consume_partition, (a2, b, ready, free, k_steps, nlive > 2, c_ptr, w_ptr, ids_ptr, row0 + 2 * BLOCK_H,
                                      col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
            ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])
        else:
            gl.warp_specialize([
                (_load3_partition, (a_desc, b_desc, a0, a1, a2, b, ready, free, row0, brow0, N, nlive, k_steps,
                                    SWIGLU)),
                (_consume_partition, (a0, b, ready, free, k_steps, nlive > 0, c_ptr, w_ptr, ids_ptr, row0, col0,
                                      num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (_consume_partition, (a1, b, ready, free, k_steps, nlive > 1, c_ptr, w_ptr, ids_ptr, row0 + BLOCK_H,
                                      col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
                (_consume_partition, (a2, b, ready, free, k_steps, nlive > 2, c_ptr, w_ptr, ids_ptr, row0 + 2 * BLOCK_H,
                                      col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)),
            ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


def registers(gather_a: bool) -> tuple[int, int, int]:
    """(maxnreg at launch, loader's, other consumers' registers a thread): 16 warps (each partition takes a
    warpgroup) x 128 fill the 64 K register file; the default consumer gets what the others leave."""
    return (128, 56, 152) if gather_a else (128, 32, 160)


def balanced_tables(align: Alignment) -> BlockTables:
    """Programs of up to GROUPS 64-row groups of one expert: expert e with n_e = padded_e / 64 groups runs
    P_e = ceil(n_e / GROUPS) programs of near-equal group counts. On the device, no host sync: merged_rows holds
    first row | live groups, merged_codes the expert, counts[0] the programs in use, expert_first / expert_blocks
    each expert's first program and count (kernels/moe_blocks.expert_group). Entries past counts[0] are unused."""
    if align.block_m != BH:
        raise ValueError(f"balanced_tables needs rows aligned to {BH}, got {align.block_m}")
    dev = align.padded_counts.device
    E, R = align.padded_counts.numel(), align.sorted_ids.numel()
    n = align.padded_counts.to(torch.int64) // BH
    progs = (n + GROUPS - 1) // GROUPS
    ends = torch.cumsum(progs, 0)
    first = ends - progs
    seg = torch.cumsum(align.padded_counts.to(torch.int64), 0) - align.padded_counts.to(torch.int64)
    bound = max(1, min(R // BH, R // (GROUPS * BH) + E))   # programs in use never exceed this
    i = torch.arange(bound, device=dev)
    e = torch.searchsorted(ends, i, right=True).clamp_(max=E - 1)
    j = i - first[e]
    p = progs[e].clamp(min=1)
    base, extra = n[e] // p, n[e] % p
    groups = base + (j < extra).to(torch.int64)
    start = j * base + torch.minimum(j, extra)
    rows = (seg[e] + start * BH) | groups
    counts = torch.stack([ends[-1], torch.zeros_like(ends[-1])]).to(torch.int32) if E else \
        torch.zeros(2, dtype=torch.int32, device=dev)
    none = torch.empty(0, dtype=torch.int32, device=dev)
    return BlockTables(none, none, none, none, counts, rows.to(torch.int32), e.to(torch.int32),
                       first.to(torch.int32), progs.to(torch.int32), GROUPS * BH, BH)


def moe_gemm_wg3(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: Alignment, *, block_n: int,
                 stages: int, group_m: int, swiglu: bool, gather_a: bool, scatter_c: bool, a_div: int = 1,
                 row_weights: torch.Tensor | None = None, tables: BlockTables | None = None,
                 a_index: torch.Tensor | None = None, expert_group: int = 0) -> torch.Tensor:
    """kernels.fused_moe_wgmma.moe_gemm_wgmma with programs of up to three 64-row groups of one expert (tables
    from `balanced_tables`, made here when not given); same arguments and outputs. Returns out."""
    why = unsupported(a, w, 2 * BH, block_n, BK, align.block_m, swiglu) if supported_triton() else "no Gluon"
    if why:
        raise ValueError(why)
    E, NW, K = w.shape
    N = NW // 2 if swiglu else NW
    if tables is None:
        tables = balanced_tables(align)
    num_blocks = tables.merged_rows.numel()
    if num_blocks == 0 or N == 0 or K == 0:
        return out
    a_desc = GluonDescriptor(a, [a.shape[0], K], [a.stride(0), 1], [BH, BK], _smem_layout(BH, a.dtype))
    b_desc = GluonDescriptor(w.view(E * NW, K), [E * NW, K], [K, 1], [block_n, BK], _smem_layout(block_n, a.dtype))
    regs = registers(gather_a)
    _moe_gemm_wg3[(num_blocks * triton.cdiv(N, block_n),)](
        a_desc, b_desc, a, a_index, out, row_weights, align.sorted_ids, tables.merged_rows, tables.merged_codes,
        tables.counts, tables.expert_first, tables.expert_blocks, align.num_rows, N, K, NW, num_blocks, a.stride(0),
        out.stride(0), GATHER_A=gather_a, A_DIV=a_div, A_INDEX=a_index is not None, SWIGLU=swiglu,
        MUL_WEIGHT=row_weights is not None, SCATTER_C=scatter_c, GROUP_M=group_m, EXPERT_GROUP=expert_group,
        STAGES=stages, LOADER_REGS=regs[1], CONSUMER_REGS=regs[2], num_warps=4, maxnreg=regs[0],
    )
    return out
