"""A batched expert GEMM in Gluon on 1- or 2-CTA clusters, to measure what TMA multicast buys (Triton >= 3.7).

Dimension legend: E experts, M rows per expert, K depth, N output columns, BH = 64 rows per consumer warpgroup,
BN = 256 columns per CTA, BK = 64 deep steps, S ring stages; a cluster of CM x CN CTAs (CM * CN <= 2).

Each CTA is the same program as kernels/fused_moe_wgmma.py's TMA path: one load warp feeds two consumer
warpgroups (m64n256 wgmma, one step in flight) through an S-stage ring; 128 rows x 256 columns per CTA. A cluster
of two shares one operand: CM = 2 (two row blocks of one expert, one column tile) multicasts the weight tile,
CN = 2 (one row block, two column tiles) the activation tile. Gluon's CGA view: the shared operand's buffers are
broadcast ([[0, 0]]), CTA 0 issues its TMA with multicast into both CTAs; the split operand's buffers and the
accumulator are tiled across the CTAs. Since CTA 0 writes into CTA 1's ring, CTA 0's loader also waits until CTA 1's
consumers have freed that stage. Triton 3.9: a two-CTA mbarrier per stage in CTA 0 that every consumer warpgroup
of the pair arrives on (a remote arrive). Triton 3.8 has no remote mbarrier arrive for sm_90 (its `cta_mask` arrive
lowers to a multicast form that ptxas rejects for sm_90a): CTA 1's loader publishes its step in a per-cluster
counter in global memory (release / acquire) and CTA 0's loader polls it.

CM = 2 gives CTA c the rows r0 + 64 c (first warpgroup) and r0 + 128 + 64 c (second) of a 256-row block: any
partition of the rows works, and this one is a plain 2-D TMA box per warpgroup.

Measured (run 232, Triton 3.9): 2x1 and 1x2 within -1.5% / +3% of 1x1 at V3 shapes; with 3.8's global-counter
handshake 26-57% slower (runs 229-230; bench/results/expert_ffn_notes.md). An experiment
(bench/gpu/ffn_cluster_probe.py), not a backend: the package's kernels stay on Triton 3.6's API.
"""

from __future__ import annotations

import inspect

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# TMA multicast (and Gluon's CGA layouts) arrived in Triton 3.7
HAS_MULTICAST = hasattr(tma, "async_load") and "multicast" in inspect.signature(tma.async_load).parameters
# Triton 3.9 routes a two-CTA barrier's arrivals to CTA 0 (a remote mbarrier arrive): the stage-free handshake then
# needs no global flag
PAIR_BARRIER = "from_cta" in inspect.signature(mbarrier.arrive).parameters
_PAIR_BARRIER = gl.constexpr(PAIR_BARRIER)   # jit functions read only constexpr globals

BH, BN, BK = 64, 256, 64


@gluon.jit
def _ld_acquire(ptr):
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _st_release(ptr, value):
    return gl.inline_asm_elementwise("st.release.gpu.global.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r", [ptr, value],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _load(a_desc, b_desc, a0, a1, b, ready, free, pair, r0, brow0, k_steps, flag_ptr, A_MC: gl.constexpr,
          B_MC: gl.constexpr, PAIR: gl.constexpr):
    S: gl.constexpr = a0.type.shape[0]
    A_ROWS: gl.constexpr = a_desc.block_type.shape[0]
    nbytes: gl.constexpr = 2 * a_desc.nbytes_per_cta + b_desc.nbytes_per_cta
    rank = gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r", [], dtype=gl.int32, is_pure=False,
                                     pack=1)
    for kk in range(k_steps):
        s = kk % S
        if PAIR:   # CTA 0 waits for both CTAs' consumers (the pair barrier, in CTA 0), CTA 1 for its own
            if rank == 0:
                mbarrier.wait(pair.index(s), ((kk // S) & 1) ^ 1)
            else:
                mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)
        else:
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)   # fresh barriers pass phase 1
        if (A_MC or B_MC) and not PAIR:   # CTA 0's multicast writes CTA 1's stage too: wait until CTA 1 freed it
            # inline asm, not gl.atomic_*: Gluon runs a scalar atomic once per cluster (CTA 0) and shares its result
            if rank == 0:
                while _ld_acquire(flag_ptr) <= kk:
                    pass
            else:
                _st_release(flag_ptr, kk + 1)
        bar = ready.index(s)
        k = kk * a_desc.block_type.shape[1]
        mbarrier.expect(bar, nbytes)
        tma.async_load(a_desc, [r0, k], bar, a0.index(s), multicast=A_MC)
        tma.async_load(a_desc, [r0 + A_ROWS, k], bar, a1.index(s), multicast=A_MC)
        tma.async_load(b_desc, [brow0, k], bar, b.index(s), multicast=B_MC)


@gluon.jit
def _consume(a_s, b, ready, free, pair, k_steps, c_ptr, r0, c0, N, stride_cm, ACC: gl.constexpr,
             PAIR: gl.constexpr):
    S: gl.constexpr = a_s.type.shape[0]
    ROWS: gl.constexpr = a_s.type.shape[1]
    COLS: gl.constexpr = b.type.shape[1]
    acc = gl.zeros([ROWS, COLS], gl.float32, ACC)
    for kk in range(k_steps):
        s = kk % S
        mbarrier.wait(ready.index(s), (kk // S) & 1)
        acc = warpgroup_mma(a_s.index(s), b.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(free.index((kk + S - 1) % S), count=1, pred=kk > 0)
        if PAIR:
            mbarrier.arrive(pair.index((kk + S - 1) % S), count=1, pred=kk > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(free.index((k_steps + S - 1) % S), count=1)
    if PAIR:
        mbarrier.arrive(pair.index((k_steps + S - 1) % S), count=1)
    offs_m = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, ACC))
    offs_n = c0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, ACC))
    ptrs = c_ptr + gl.expand_dims(offs_m.to(gl.int64) * stride_cm, 1) + gl.expand_dims(offs_n, 0)
    gl.store(ptrs, acc.to(c_ptr.dtype.element_ty))


@gluon.jit
def _cluster_gemm(a_desc, b_desc, c_ptr, flag_ptr, M, N, K, stride_cm, ACC: gl.constexpr, CM: gl.constexpr,
                  CN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    A_ROWS: gl.constexpr = a_desc.block_type.shape[0]       # CM * BH: one warpgroup's rows, cluster-wide
    B_ROWS: gl.constexpr = b_desc.block_type.shape[0]       # CN * BN
    dtype: gl.constexpr = a_desc.dtype
    CTAS: gl.constexpr = CM * CN
    pid = gl.program_id(0)
    tiles_n = N // B_ROWS
    tiles_m = M // (2 * A_ROWS)
    e = pid // (tiles_m * tiles_n)
    t = pid % (tiles_m * tiles_n)
    r0 = e * M + (t % tiles_m) * 2 * A_ROWS    # row tiles of one column tile run next to each other (L2)
    c0 = (t // tiles_m) * B_ROWS
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    k_steps = K // BLOCK_K

    a0 = gl.allocate_shared_memory(dtype, [STAGES, A_ROWS, BLOCK_K], a_desc.layout)
    a1 = gl.allocate_shared_memory(dtype, [STAGES, A_ROWS, BLOCK_K], a_desc.layout)
    b = gl.allocate_shared_memory(dtype, [STAGES, B_ROWS, BLOCK_K], b_desc.layout)
    ready = mbarrier.allocate_mbarrier(batch=STAGES)
    free = mbarrier.allocate_mbarrier(batch=STAGES)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)   # both warpgroups release a stage
    PAIR: gl.constexpr = _PAIR_BARRIER and CTAS > 1
    if PAIR:   # one barrier per stage in CTA 0 that all four warpgroups of the pair arrive on (count 2 per CTA)
        pair = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=True)
        for i in gl.static_range(STAGES):
            mbarrier.init(pair.index(i), count=2)
    else:
        pair = free
    gl.warp_specialize([
        (_consume, (a0, b, ready, free, pair, k_steps, c_ptr, r0, c0, N, stride_cm, ACC, PAIR)),
        (_load, (a_desc, b_desc, a0, a1, b, ready, free, pair, r0, e * N + c0, k_steps, flag_ptr + pid, CN > 1,
                CM > 1, PAIR)),
        (_consume, (a1, b, ready, free, pair, k_steps, c_ptr, r0 + A_ROWS, c0, N, stride_cm, ACC, PAIR)),
    ], [1, 4], [24, 232])
    if CTAS > 1:   # no CTA leaves while its peer may still write into its ring
        gl.barrier(cluster=True)


def layouts(cm: int, cn: int, dtype: torch.dtype) -> tuple:
    """(A's shared layout, B's shared layout, the accumulator layout) of a CM x CN cluster."""
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    split, bcast = [[1, 0]], [[0, 0]]
    a_cga = split if cm > 1 else bcast if cn > 1 else None
    b_cga = split if cn > 1 else bcast if cm > 1 else None
    acc_cga = [[1, 0]] if cm > 1 else [[0, 1]] if cn > 1 else []
    la = gl.NVMMASharedLayout.get_default_for([cm * BH, BK], gdt, cga_layout=a_cga)
    lb = gl.NVMMASharedLayout.get_default_for([cn * BN, BK], gdt, cga_layout=b_cga)
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16],
                                    cga_layout=acc_cga)
    return la, lb, acc


def unsupported(a: torch.Tensor, w: torch.Tensor, cm: int, cn: int) -> str:
    """Why this probe cannot run (a [E, M, K], w [E, N, K]); '' when it can."""
    if not HAS_MULTICAST and cm * cn > 1:
        return "2-CTA clusters need Triton >= 3.7 (Gluon's cluster arrive and TMA multicast)"
    if cm * cn > 2 or min(cm, cn) < 1:
        return f"cluster must be 1x1, 2x1 or 1x2, got {cm}x{cn}"
    E, M, K = a.shape
    if M % (2 * BH * cm) or w.shape[1] % (BN * cn) or K % BK:
        return f"M % {2 * BH * cm}, N % {BN * cn} and K % {BK} must be 0, got {M}, {w.shape[1]}, {K}"
    return ""


def cluster_gemm(a: torch.Tensor, w: torch.Tensor, *, cm: int = 1, cn: int = 1, stages: int = 4) -> torch.Tensor:
    """c[e] = a[e] @ w[e]^T for a [E, M, K], w [E, N, K] (bf16/fp16, contiguous); c [E, M, N] in a's dtype."""
    why = unsupported(a, w, cm, cn)
    if why:
        raise ValueError(why)
    E, M, K = a.shape
    N = w.shape[1]
    c = torch.empty(E, M, N, device=a.device, dtype=a.dtype)
    la, lb, acc = layouts(cm, cn, a.dtype)
    a2, w2 = a.reshape(E * M, K), w.reshape(E * N, K)
    a_desc = TensorDescriptor(a2, [E * M, K], [K, 1], [cm * BH, BK], la)
    b_desc = TensorDescriptor(w2, [E * N, K], [K, 1], [cn * BN, BK], lb)
    grid = (E * (M // (2 * BH * cm)) * (N // (BN * cn)),)
    flags = torch.zeros(grid[0] if cm * cn > 1 else 1, device=a.device, dtype=torch.int32)
    _cluster_gemm[grid](a_desc, b_desc, c, flags, M, N, K, c.stride(1), ACC=acc, CM=cm, CN=cn, STAGES=stages,
                        num_warps=4, num_ctas=cm * cn, maxnreg=168)
    return c
