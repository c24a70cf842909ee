"""A persistent batched expert GEMM in Gluon: the 1x1 program of bench/gpu/cluster_gemm.py looping over tiles.

Dimension legend: E experts, M rows per expert, K depth, N output columns, BH = 64 rows per consumer warpgroup,
BN = 256 columns per tile, BK = 64 deep steps, S ring stages, P programs (<= one per SM).

Why: at K = 2048 (the down GEMM) a 128 x 256 tile is 32 k-steps, and a one-tile program spends its first steps
waiting for the ring's first TMA loads and its last on the epilogue's stores; cuBLAS (torch.bmm) is ~17% faster
there (bench/results/ffn_cluster_probe_run229_h200.json). Here each of P programs walks the tiles t = pid, pid + P,
..., and the load warp runs one ring (a step counter across tiles) straight into the next tile's first S stages
while the consumers store the last one. Written against Triton 3.6's Gluon API (the GPU machine's own Triton).

Measured (runs 230, 232): 2-8% faster than one tile a program on these dense GEMMs, the down GEMM still 12-14%
behind cuBLAS, all of it the epilogue's stores (run 235: 1-4% ahead of cuBLAS with them masked off); `staged`
takes back 60-75% of that (run 236: the down GEMM within 1% of cuBLAS). The persistence itself was even with the
one-tile grid in the grouped kernel (bench/results/expert_ffn_notes.md, thirty-sixth session).
An experiment (bench/gpu/ffn_cluster_probe.py), not a backend.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
BH, BN, BK = 64, 256, 64


@gluon.jit
def _tile(t, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t -> (first row, first column, expert); an expert's row blocks of one column tile are adjacent (L2)."""
    tiles_m = M // BLOCK_M
    per_e = tiles_m * (N // BLOCK_N)
    e = t // per_e
    u = t % per_e
    return e * M + (u % tiles_m) * BLOCK_M, (u // tiles_m) * BLOCK_N, e


@gluon.jit
def _load(a_desc, b_desc, a0, a1, b, ready, free, M, N, K, num_tiles):
    S: gl.constexpr = a0.type.shape[0]
    BLOCK_H: gl.constexpr = a0.type.shape[1]
    BLOCK_K: gl.constexpr = a0.type.shape[2]
    BLOCK_N: gl.constexpr = b.type.shape[1]
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    k_steps = K // BLOCK_K
    g = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        r0, c0, e = _tile(t, M, N, 2 * BLOCK_H, BLOCK_N)
        for kk in range(k_steps):
            s = g % S
            mbarrier.wait(free.index(s), ((g // S) & 1) ^ 1)   # fresh barriers pass phase 1
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            _tma_load(a_desc, [r0, kk * BLOCK_K], bar, a0.index(s))
            _tma_load(a_desc, [r0 + BLOCK_H, kk * BLOCK_K], bar, a1.index(s))
            _tma_load(b_desc, [e * N + c0, kk * BLOCK_K], bar, b.index(s))
            g += 1


@gluon.jit
def _store_staged(cs, part, c_ptr, r0, c0, stride_cm, store_rows):
    """One [BH, BN / 2] piece of the tile through shared memory: written in the accumulator's layout, read back as
    16-byte row pieces (a warp: 2 rows x 256 bytes) and stored."""
    OUT: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    cs.store(part)
    gl.thread_barrier()
    v = cs.load(OUT)
    rows = r0 + gl.arange(0, cs.type.shape[0], layout=gl.SliceLayout(1, OUT))
    cols = c0 + gl.arange(0, cs.type.shape[1], layout=gl.SliceLayout(0, OUT))
    ptrs = c_ptr + gl.expand_dims(rows.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, v, mask=gl.expand_dims(rows < store_rows, 1))
    gl.thread_barrier()   # the piece is out of shared memory before the next one goes in


@gluon.jit
def _consume(a_s, b, ready, free, cs, c_ptr, M, N, K, num_tiles, half, stride_cm, store_rows, ACC: gl.constexpr,
             STAGED: gl.constexpr):
    S: gl.constexpr = a_s.type.shape[0]
    BLOCK_H: gl.constexpr = a_s.type.shape[1]
    BLOCK_K: gl.constexpr = a_s.type.shape[2]
    BLOCK_N: gl.constexpr = b.type.shape[1]
    k_steps = K // BLOCK_K
    g = 0
    for t in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        r0, c0, e = _tile(t, M, N, 2 * BLOCK_H, BLOCK_N)
        acc = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, ACC)
        for kk in range(k_steps):
            s = g % S
            mbarrier.wait(ready.index(s), (g // S) & 1)
            acc = warpgroup_mma(a_s.index(s), b.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(free.index((g + S - 1) % S), count=1, pred=kk > 0)
            g += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index((g + S - 1) % S), count=1)
        if STAGED:   # two column halves through this warpgroup's [BH, BN / 2] buffer
            lo, hi = acc.to(c_ptr.dtype.element_ty).reshape([BLOCK_H, 2, BLOCK_N // 2]).permute((0, 2, 1)).split()
            _store_staged(cs.index(half), lo, c_ptr, r0 + half * BLOCK_H, c0, stride_cm, store_rows)
            _store_staged(cs.index(half), hi, c_ptr, r0 + half * BLOCK_H, c0 + BLOCK_N // 2, stride_cm, store_rows)
        else:   # straight from the accumulator's layout: 4-byte pieces, a warp covers 8 rows x 16 bytes
            offs_m = r0 + half * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ACC))
            offs_n = c0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC))
            ptrs = c_ptr + gl.expand_dims(offs_m.to(gl.int64) * stride_cm, 1) + gl.expand_dims(offs_n, 0)
            gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=gl.expand_dims(offs_m < store_rows, 1))


@gluon.jit
def _persistent_gemm(a_desc, b_desc, c_ptr, M, N, K, num_tiles, stride_cm, store_rows, ACC: gl.constexpr,
                     CS_LAYOUT: gl.constexpr, STAGED: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    dtype: gl.constexpr = a_desc.dtype
    a0 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
    a1 = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_H, BLOCK_K], a_desc.layout)
    b = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)      # both warpgroups release a stage
    # each warpgroup's epilogue buffer (32 KB in all: with the 4-stage ring, 224 KB; allocated either way)
    cs = gl.allocate_shared_memory(dtype, [2, BLOCK_H, BLOCK_N // 2], CS_LAYOUT)
    gl.warp_specialize([
        (_consume, (a0, b, ready, free, cs, c_ptr, M, N, K, num_tiles, 0, stride_cm, store_rows, ACC, STAGED)),
        (_load, (a_desc, b_desc, a0, a1, b, ready, free, M, N, K, num_tiles)),
        (_consume, (a1, b, ready, free, cs, c_ptr, M, N, K, num_tiles, 1, stride_cm, store_rows, ACC, STAGED)),
    ], [1, 4], [24, 232])


def persistent_gemm(a: torch.Tensor, w: torch.Tensor, *, stages: int = 4, programs: int | None = None,
                    store: bool = True, staged: bool = False) -> torch.Tensor:
    """c[e] = a[e] @ w[e]^T for a [E, M, K], w [E, N, K] (bf16/fp16, contiguous; M % 128, N % 256, K % 64 == 0)
    on `programs` persistent programs (default: one per SM); c [E, M, N] in a's dtype. store False: the
    epilogue's stores all masked off (c left unwritten; a timing of what the stores' memory traffic costs).
    staged: the tile goes out through shared memory as 16-byte row pieces (`_store_staged`)."""
    E, M, K = a.shape
    N = w.shape[1]
    if M % (2 * BH) or N % BN or K % BK:
        raise ValueError(f"M % {2 * BH}, N % {BN} and K % {BK} must be 0, got {M}, {N}, {K}")
    c = torch.empty(E, M, N, device=a.device, dtype=a.dtype)
    gdt = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    a_desc = TensorDescriptor(a.reshape(E * M, K), [E * M, K], [K, 1], [BH, BK],
                              gl.NVMMASharedLayout.get_default_for([BH, BK], gdt))
    b_desc = TensorDescriptor(w.reshape(E * N, K), [E * N, K], [K, 1], [BN, BK],
                              gl.NVMMASharedLayout.get_default_for([BN, BK], gdt))
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    num_tiles = E * (M // (2 * BH)) * (N // BN)
    if programs is None:
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    _persistent_gemm[(min(programs, num_tiles),)](a_desc, b_desc, c, M, N, K, num_tiles, c.stride(1),
                                                  E * M if store else 0, ACC=acc,
                                                  CS_LAYOUT=gl.NVMMASharedLayout.get_default_for([BH, BN // 2], gdt),
                                                  STAGED=staged, STAGES=stages, num_warps=4, maxnreg=168)
    return c
