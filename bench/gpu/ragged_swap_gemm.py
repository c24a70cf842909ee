"""A grouped expert GEMM with the tokens as wgmma's N (swap-AB), in blocks sized to each expert's rows (Gluon).

Dimension legend: R rows sorted by expert (contiguous, no padding), E experts, K depth, N output columns, BW = 128
weight rows per program (64 per consumer warpgroup: wgmma's M), BT = 256 tokens in the main ring (wgmma's N), Q = 16
tokens the block's granularity, BK = 64 deep steps, S ring stages, V = ceil(tokens / Q) in 1..16 (1..18 with EXTRA).

Why: the package's grouped kernel (kernels/fused_moe_wgmma.py) takes tokens as wgmma's M, so an expert's rows are
padded to 64 and covered by 128-row blocks plus a 64-row tail block. Each block streams the expert's weight tile,
and the kernel's time follows those streams, not its MMA rows (runs 252-254, bench/results/expert_ffn_notes.md):
at 272 rows an expert it takes 1.38x its time at 256. Here an expert of c rows is split into ceil(c / most) blocks
of near-equal size rounded up to 16 (most = 256, or 288 with EXTRA), and each block streams each weight tile once:
out^T [BW, n] = W [BW, K] . A[n, K]^T. Tensor shapes are powers of two, so a block's n tokens are pieces, one
accumulator and one wgmma each: one n256 when V >= FULL_FROM (rows past the block are computed and never stored),
else 128 / 64 / 32 / 16 (and 16 more at V = 16); with EXTRA, V = 17 / 18 add an n16 / n32 piece from a second ring.
The loader and the consumers unroll one copy per V (mbarrier.expect and wgmma.wait_group take constants).

Measured (runs 253-257, plain GEMMs, the loader at 24 registers): bitwise equal to the grouped kernel; at 32
experts x 1024 tokens, blocks of up to 288 rows are 6-7% faster in the down GEMM's shape and 0-3% in the up GEMM's,
15-20% at 272 rows every expert. Added after those runs and NOT yet run on a GPU (compiled for sm_90 on the CPU with
Triton 3.6, no spills): SWIGLU (the weight tile in 8-row boxes, gate and up alternating, so a thread's accumulator
rows r and r + 8 are one column's gate and up) and SCATTER (rows to their pair ids, times their top-k weights), used
by bench/gpu/ragged_swap_ffn_probe.py; the loader now has 48 registers (SwiGLU's 16 boxes a step spilled at 24).
An experiment (bench/gpu/ragged_swap_probe.py, bench/gpu/ragged_swap_ffn_probe.py), not a backend; bf16/fp16.
Written against Triton 3.6's Gluon API (the GPU machine's own Triton).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
W_ROWS, MAX_TOKENS, GRAIN, DEPTH = 128, 256, 16, 64   # BW, BT, Q, BK on the host
BW, BT, Q, BK = (gl.constexpr(v) for v in (W_ROWS, MAX_TOKENS, GRAIN, DEPTH))


@gluon.jit
def _load_v(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, k_steps, V: gl.constexpr,
            SWIGLU: gl.constexpr):
    S: gl.constexpr = wb.type.shape[0]
    nbytes: gl.constexpr = BW * BK * w_desc.dtype.primitive_bitwidth // 8 + V * t_desc.block_type.nbytes
    for kk in range(k_steps):
        s = kk % S
        mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)   # fresh barriers pass phase 1
        bar = ready.index(s)
        mbarrier.expect(bar, nbytes)
        k = kk * BK
        if SWIGLU:   # rows 16q.. : the gate rows of output columns 8q.., then their up rows (up_off further)
            for q in gl.static_range(BW // 16):
                _tma_load(w_desc, [w_row0 + 8 * q, k], bar, wb.index(s).slice(16 * q, 8))
                _tma_load(w_desc, [w_row0 + up_off + 8 * q, k], bar, wb.index(s).slice(16 * q + 8, 8))
        else:
            _tma_load(w_desc, [w_row0, k], bar, wb.index(s))
        for q in gl.static_range(V):   # rows past the block (the next expert's, or zeros past R) are never stored
            if q < BT // Q:
                _tma_load(t_desc, [t_row0 + Q * q, k], bar, tb.index(s).slice(Q * q, Q))
            else:   # tokens 256..287 (EXTRA) in a ring of their own: shared-memory shapes are powers of two
                _tma_load(t_desc, [t_row0 + Q * q, k], bar, tx.index(s).slice(Q * q - BT, Q))


@gluon.jit
def _load(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, nq, k_steps, NV: gl.constexpr,
          SWIGLU: gl.constexpr):
    for v in gl.static_range(1, NV + 1):
        if nq == v:
            _load_v(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, k_steps, v, SWIGLU)


@gluon.jit
def _store_piece(acc, c_ptr, ids_ptr, w_ptr, t_row0, OFF: gl.constexpr, n_real, col0, stride_cm,
                 SWIGLU: gl.constexpr, SCATTER: gl.constexpr):
    """acc [64 weight rows, NP tokens] -> out[row, col0 + j] as 16-byte row pieces, row = t_row0 + OFF + i (SCATTER:
    ids[that], times w[ids[that]] in float32 first); SWIGLU: acc's rows 16m + r / 16m + 8 + r are the gate / up of
    column 8m + r (the loader's interleave; a thread holds both), 32 columns out. Rows past n_real are not stored."""
    NP: gl.constexpr = acc.type.shape[1]
    if SCATTER:
        j = OFF + gl.arange(0, NP, layout=gl.SliceLayout(0, acc.type.layout))
        wt = gl.load(w_ptr + gl.load(ids_ptr + t_row0 + j, mask=j < n_real, other=0), mask=j < n_real, other=0.0)
        acc = acc * gl.expand_dims(wt, 0)
    if SWIGLU:
        gate, up = acc.reshape([4, 2, 8, NP]).permute((0, 2, 3, 1)).split()
        y = (gate / (1.0 + gl.exp(-gate)) * up).reshape([32, NP])
        OUT: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    else:
        y = acc
        OUT: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    CW: gl.constexpr = y.type.shape[0]
    yt = gl.convert_layout(gl.permute(y.to(c_ptr.dtype.element_ty), (1, 0)), OUT)
    rows = OFF + gl.arange(0, NP, layout=gl.SliceLayout(1, OUT))
    cols = col0 + gl.arange(0, CW, layout=gl.SliceLayout(0, OUT))
    if SCATTER:
        dst = gl.load(ids_ptr + t_row0 + rows, mask=rows < n_real, other=0)
    else:
        dst = t_row0 + rows
    ptrs = c_ptr + gl.expand_dims(dst.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
    gl.store(ptrs, yt, mask=gl.expand_dims(rows < n_real, 1))


@gluon.jit
def _consume_v(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_real, col0, k_steps, stride_cm,
               H: gl.constexpr, V: gl.constexpr, FULL_FROM: gl.constexpr, SWIGLU: gl.constexpr,
               SCATTER: gl.constexpr):
    S: gl.constexpr = wb.type.shape[0]
    PF: gl.constexpr = V >= FULL_FROM                 # one n256 piece (rows past the block: stale, never stored)
    R: gl.constexpr = 0 if PF else (V - 1 if V == 16 else V)   # else 128 + 64 + 32 + 16 (+ 16 at V = 16)
    PX: gl.constexpr = V > 16                                               # V = 17 / 18: 256 + 16 / 32 (EXTRA)
    XN: gl.constexpr = 16 if V <= 17 else 32
    P8: gl.constexpr = (R // 8) % 2 == 1
    P4: gl.constexpr = (R // 4) % 2 == 1
    P2: gl.constexpr = (R // 2) % 2 == 1
    P1: gl.constexpr = R % 2 == 1
    PE: gl.constexpr = V == 16 and not PF
    O4: gl.constexpr = 128 if P8 else 0
    O2: gl.constexpr = O4 + (64 if P4 else 0)
    O1: gl.constexpr = O2 + (32 if P2 else 0)
    OE: gl.constexpr = O1 + (16 if P1 else 0)
    NP: gl.constexpr = (1 if P8 else 0) + (1 if P4 else 0) + (1 if P2 else 0) + (1 if P1 else 0) + (1 if PE else 0) \
        + (1 if PF else 0) + (1 if PX else 0)
    LX: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, XN, 16])
    LF: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    L8: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16])
    L4: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    L2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 32, 16])
    L1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 16, 16])
    af = gl.zeros([64, 256], gl.float32, LF)   # the pieces this V does not use are dead code
    ax = gl.zeros([64, XN], gl.float32, LX)
    a8 = gl.zeros([64, 128], gl.float32, L8)
    a4 = gl.zeros([64, 64], gl.float32, L4)
    a2 = gl.zeros([64, 32], gl.float32, L2)
    a1 = gl.zeros([64, 16], gl.float32, L1)
    ae = gl.zeros([64, 16], gl.float32, L1)
    for kk in range(k_steps):
        s = kk % S
        mbarrier.wait(ready.index(s), (kk // S) & 1)
        w_s = wb.index(s).slice(64 * H, 64)
        t_s = tb.index(s)
        if PF:
            af = warpgroup_mma(w_s, t_s.permute((1, 0)), af, is_async=True)
        if PX:
            ax = warpgroup_mma(w_s, tx.index(s).slice(0, XN).permute((1, 0)), ax, is_async=True)
        if P8:
            a8 = warpgroup_mma(w_s, t_s.slice(0, 128).permute((1, 0)), a8, is_async=True)
        if P4:
            a4 = warpgroup_mma(w_s, t_s.slice(O4, 64).permute((1, 0)), a4, is_async=True)
        if P2:
            a2 = warpgroup_mma(w_s, t_s.slice(O2, 32).permute((1, 0)), a2, is_async=True)
        if P1:
            a1 = warpgroup_mma(w_s, t_s.slice(O1, 16).permute((1, 0)), a1, is_async=True)
        if PE:
            ae = warpgroup_mma(w_s, t_s.slice(OE, 16).permute((1, 0)), ae, is_async=True)
        # this step's NP wgmmas stay in flight, the previous step's have retired: its stage goes back
        if PF:
            af = warpgroup_mma_wait(num_outstanding=NP, deps=(af, ))
        if PX:
            ax = warpgroup_mma_wait(num_outstanding=NP, deps=(ax, ))
        if P8:
            a8 = warpgroup_mma_wait(num_outstanding=NP, deps=(a8, ))
        if P4:
            a4 = warpgroup_mma_wait(num_outstanding=NP, deps=(a4, ))
        if P2:
            a2 = warpgroup_mma_wait(num_outstanding=NP, deps=(a2, ))
        if P1:
            a1 = warpgroup_mma_wait(num_outstanding=NP, deps=(a1, ))
        if PE:
            ae = warpgroup_mma_wait(num_outstanding=NP, deps=(ae, ))
        mbarrier.arrive(free.index((kk + S - 1) % S), count=1, pred=kk > 0)
    af, ax, a8, a4, a2, a1, ae = warpgroup_mma_wait(num_outstanding=0, deps=(af, ax, a8, a4, a2, a1, ae))
    mbarrier.arrive(free.index((k_steps + S - 1) % S), count=1)
    c0 = col0 + (32 if SWIGLU else 64) * H
    if PF:
        _store_piece(af, c_ptr, ids_ptr, w_ptr, t_row0, 0, n_real, c0, stride_cm, SWIGLU, SCATTER)
    if PX:
        _store_piece(ax, c_ptr, ids_ptr, w_ptr, t_row0, 256, n_real, c0, stride_cm, SWIGLU, SCATTER)
    if P8:
        _store_piece(a8, c_ptr, ids_ptr, w_ptr, t_row0, 0, n_real, c0, stride_cm, SWIGLU,
                     SCATTER)
    if P4:
        _store_piece(a4, c_ptr, ids_ptr, w_ptr, t_row0, O4, n_real, c0, stride_cm, SWIGLU,
                     SCATTER)
    if P2:
        _store_piece(a2, c_ptr, ids_ptr, w_ptr, t_row0, O2, n_real, c0, stride_cm, SWIGLU,
                     SCATTER)
    if P1:
        _store_piece(a1, c_ptr, ids_ptr, w_ptr, t_row0, O1, n_real, c0, stride_cm, SWIGLU,
                     SCATTER)
    if PE:
        _store_piece(ae, c_ptr, ids_ptr, w_ptr, t_row0, OE, n_real, c0, stride_cm, SWIGLU,
                     SCATTER)


@gluon.jit
def _consume(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_real, nq, col0, k_steps, stride_cm,
             H: gl.constexpr, FULL_FROM: gl.constexpr, NV: gl.constexpr, SWIGLU: gl.constexpr,
             SCATTER: gl.constexpr):
    for v in gl.static_range(1, NV + 1):
        if nq == v:
            _consume_v(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_real, col0, k_steps, stride_cm, H,
                       v, FULL_FROM, SWIGLU, SCATTER)


@gluon.jit(do_not_specialize=["num_blocks"])
def _ragged_swap_gemm(w_desc, t_desc, c_ptr, ids_ptr, w_ptr, rows_ptr, ns_ptr, experts_ptr, num_blocks, N, NW, K,
                      stride_cm, GROUP: gl.constexpr, FULL_FROM: gl.constexpr, EXTRA: gl.constexpr,
                      SWIGLU: gl.constexpr, SCATTER: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    OUT_W: gl.constexpr = BW // 2 if SWIGLU else BW   # output columns per program
    pid = gl.program_id(0)
    num_wt = N // OUT_W
    per_group = GROUP * num_wt   # GROUP blocks (consecutive: one expert's, then the next's) per column sweep
    first = (pid // per_group) * GROUP
    size = gl.minimum(num_blocks - first, GROUP)
    blk = first + (pid % per_group) % size
    wt = (pid % per_group) // size
    t_row0 = gl.load(rows_ptr + blk)
    n_real = gl.load(ns_ptr + blk)
    e = gl.load(experts_ptr + blk)
    nq = (n_real + Q - 1) // Q
    col0 = wt * OUT_W
    k_steps = K // BK
    dtype: gl.constexpr = w_desc.dtype
    wb = gl.allocate_shared_memory(dtype, [STAGES, BW, BK], t_desc.layout)   # 128-byte swizzle, as A's tiles
    tb = gl.allocate_shared_memory(dtype, [STAGES, BT, BK], t_desc.layout)   # the [BT, BK] tile's layout
    NV: gl.constexpr = BT // Q + (2 if EXTRA else 0)   # EXTRA: blocks of up to 288 tokens, 256 + 32 of them here
    tx = gl.allocate_shared_memory(dtype, [STAGES if EXTRA else 1, 2 * Q, BK], t_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=2)      # both warpgroups release a stage
    gl.warp_specialize([
        (_consume, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_real, nq, col0, k_steps, stride_cm, 0,
                    FULL_FROM, NV, SWIGLU, SCATTER)),
        (_load, (w_desc, t_desc, wb, tb, tx, ready, free, e * NW + col0, N, t_row0, nq, k_steps, NV, SWIGLU)),
        (_consume, (wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_real, nq, col0, k_steps, stride_cm, 1,
                    FULL_FROM, NV, SWIGLU, SCATTER)),
    ], [1, 4], [48, 232])   # the loader: 16 TMA boxes a step with SwiGLU


def ragged_blocks(counts: list[int], device: torch.device, most: int = MAX_TOKENS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first row, rows, expert) int32 per block: expert e's counts[e] rows (offsets = exclusive cumsum) in
    ceil(c / most) blocks of ceil(c / blocks) rows rounded up to Q (the last takes the rest). Host-side: a probe."""
    rows0, ns, experts, start = [], [], [], 0
    for e, c in enumerate(counts):
        if c:
            nb = -(-c // most)
            chunk = (c + nb - 1) // nb
            chunk = (chunk + GRAIN - 1) // GRAIN * GRAIN
            for j in range(nb):
                n = min(chunk, c - j * chunk)
                assert 0 < n <= most, (c, nb, chunk, j)
                rows0.append(start + j * chunk)
                ns.append(n)
                experts.append(e)
        start += c
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (rows0, ns, experts))


def ragged_swap_gemm(a: torch.Tensor, w: torch.Tensor, counts: list[int], *, stages: int = 4, group: int = 8,
                     full: int = 16, extra: bool = False, swiglu: bool = False, ids: torch.Tensor | None = None,
                     row_weights: torch.Tensor | None = None, out: torch.Tensor | None = None
                     ) -> Callable[[], torch.Tensor]:
    """A launcher of out[r] = a[r] @ w[expert(r)]^T for a [R, K] sorted by expert (counts[e] rows each, R = sum),
    w [E, NW, K] (bf16/fp16, contiguous; K % 64 == 0); out [R, N] in a's dtype (made here unless given). swiglu:
    w's rows are [gate; up] (NW = 2N) and out = silu(gate) * up; ids (int32 [R]) and row_weights (float32, indexed by
    ids): out[ids[r]] = row_weights[ids[r]] * (a[r] @ w^T) instead (the down GEMM's scatter). The blocks and
    descriptors are made here once (a host sync), so each call of the launcher is one kernel. full: a block of more
    than 16 (full - 1) tokens runs one n256 wgmma a step (17: never; else pieces of 128 / 64 / 32 / 16); extra
    (with full <= 16): blocks of up to 288 tokens, n256 + n16 / n32."""
    R, K = a.shape
    E, NW, _ = w.shape
    N = NW // 2 if swiglu else NW
    if N % (W_ROWS // 2 if swiglu else W_ROWS) or K % DEPTH or sum(counts) != R or len(counts) != E:
        raise ValueError(f"N % {W_ROWS} (SwiGLU: % {W_ROWS // 2}), K % {DEPTH} must be 0 and counts must sum to R; "
                         f"got {N}, {K}, {sum(counts)} != {R}")
    if extra and full > 16:
        raise ValueError("extra needs full <= 16")
    scatter = ids is not None
    if scatter and (row_weights is None or out is None):
        raise ValueError("ids (the scatter) needs row_weights and out")
    if out is None:
        out = torch.empty(R, N, device=a.device, dtype=a.dtype)
    rows0, ns, experts = ragged_blocks(counts, a.device, MAX_TOKENS + (2 * GRAIN if extra else 0))
    layout = gl.NVMMASharedLayout.get_default_for([MAX_TOKENS, DEPTH], gl.bfloat16 if a.dtype == torch.bfloat16
                                                  else gl.float16)   # 128-byte swizzle: every tile and box here
    w_desc = TensorDescriptor(w.reshape(E * NW, K), [E * NW, K], [K, 1], [8 if swiglu else W_ROWS, DEPTH], layout)
    t_desc = TensorDescriptor(a, [R, K], [K, 1], [GRAIN, DEPTH], layout)
    grid = (rows0.numel() * (N // (W_ROWS // 2 if swiglu else W_ROWS)),)
    dummy = rows0

    def run() -> torch.Tensor:
        if grid[0]:
            _ragged_swap_gemm[grid](w_desc, t_desc, out, ids if scatter else dummy,
                                    row_weights if scatter else dummy, rows0, ns, experts, rows0.numel(), N, NW, K,
                                    out.stride(0), GROUP=group, FULL_FROM=full, EXTRA=extra, SWIGLU=swiglu,
                                    SCATTER=scatter, STAGES=stages, num_warps=4, maxnreg=168)
        return out
    return run
