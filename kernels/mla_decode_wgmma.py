"""MLA decode stage 1 for Hopper in Gluon: each tile scored once, both warpgroups accumulate value halves.

Dimension legend: R query rows, N heads, C latent (value) dims, CH = C / 2 columns per latent half, Dr rope
dims, Dc = C + Dr, BH = 64 heads per program (one wgmma M), BN = 64 cache rows per tile, K splits.

Why this kernel: in Triton's tl.dot kernels (kernels/mla_decode.py) a score whose result feeds the p . v dot
gets every warp along M, so 128-head programs either split the 512 value columns over two programs or let
two warpgroups compute the same 64 x BN scores: the tensor cores do 1.53x the counted FLOPs. Gluon places
the warps by hand. One program of 8 warps (two warpgroups) owns 64 heads and all C value columns:

    scores [64, BN] = q_lat0 . k_lat0^T + q_lat1 . k_lat1^T + q_pe . k_pe^T   warps [4, 2]: each warpgroup
                                                                              scores BN / 2 keys, no duplicate
    online softmax across both warpgroups (the row max / sum reduce over the two halves)
    p -> shared memory [64, BN] (each warpgroup needs every key of its rows)
    acc_j [64, CH] += p . k_latj  for j = 0, 1                                 warps [4, 2]: each warpgroup
                                                                              owns CH / 2 columns of each half

Q (73.7 KB) stays in shared memory; cache tiles (73.7 KB each) come by TMA through a two-stage ring of
mbarriers, so tile i + 1 lands while tile i computes; the row's ragged last tile is loaded with masked loads
(rows past the context read as 0, never stale cache contents) into the freed first stage. Output: the same
partials and base-2 lse as kernels/mla_decode.py's stage 1 (its split reduction merges them). Its
warp-specialised form, kernels/mla_decode_wgmma_ws.py, is faster (1.3x at B >= 32) and the default where Triton
has Gluon's list-form warp_specialize (>= 3.6).
Needs: sm_90 (wgmma), bfloat16/float16, N % 64 == 0, CH and Dr powers of two in 16-256, and a
cache whose pages (or capacity) are multiples of 64 rows; `unsupported` says why not.
"""

from __future__ import annotations

import functools

import torch
import triton
from nanomoe_kernels.mla_decode_tuning import triton_at_least

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    # TMA load into shared memory: async_load from Triton 3.7 (3.9 removed the old name), the old name in 3.6
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier   # renamed after Triton 3.6
except ImportError:  # Triton without Gluon's Hopper API: `unsupported` says so, nothing else here runs
    gluon = None

BH, BN, STAGES, WARPS = 64, 64, 2, 8
# Ran on Triton 3.6 (the GPU machines); compiled for sm_90 with 3.5.1 and 3.7-3.9; 3.4's Gluon lacks get_default_for
_TRITON_OK = triton_at_least(3, 5)


def unsupported(q: torch.Tensor, kv: torch.Tensor, c: int, interpreted: bool) -> str:
    """Why this kernel cannot run these inputs ('' when it can)."""
    if gluon is None or not _TRITON_OK:
        return "the wgmma stage 1 needs Triton's Gluon Hopper API (Triton >= 3.5)"
    if interpreted or q.device.type != "cuda" or not _is_sm90(q.device.index or 0):
        return "the wgmma stage 1 needs a compute-capability 9.0 GPU (wgmma), compiled"
    heads, dc = q.shape[1], q.shape[2]
    dr = dc - c
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"the wgmma stage 1 needs bfloat16/float16 inputs, got {q.dtype}"
    ch = c // 2   # C / 2 and Dr are TMA blocks' widths: powers of two
    if heads % BH or not 16 <= ch <= 256 or ch & (ch - 1) or not 16 <= dr <= 256 or dr & (dr - 1):
        return f"the wgmma stage 1 needs heads % {BH} == 0 and C / 2, Dr powers of two in 16-256, got " \
               f"heads={heads}, C={c}, Dr={dr}"
    if not kv.is_contiguous() or kv.data_ptr() % 16 or kv.shape[1] % BN:
        return f"the wgmma stage 1 needs a contiguous 16-byte aligned cache whose pages hold a multiple of {BN} rows"
    return ""


@functools.cache
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def descriptors(q: torch.Tensor, kv: torch.Tensor, c: int) -> tuple:
    """TMA descriptors: q rows [R * N, Dc] in [BH, CH] / [BH, Dr] blocks, cache rows [rows, Dc] in [BN, CH] /
    [BN, Dr] blocks (latent halves and the rope key)."""
    dr, ch = q.shape[-1] - c, c // 2
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    out = []
    for t, rows in ((q.reshape(-1, q.shape[-1]), BH), (kv.view(-1, kv.shape[-1]), BN)):
        lat = gl.NVMMASharedLayout.get_default_for([rows, ch], dtype)
        pe = gl.NVMMASharedLayout.get_default_for([rows, dr], dtype)
        out += [GluonDescriptor(t, [t.shape[0], c], [t.stride(0), 1], [rows, ch], lat),
                GluonDescriptor(t[:, c:], [t.shape[0], dr], [t.stride(0), 1], [rows, dr], pe)]
    return tuple(out)


if gluon is not None:

    @gluon.jit
    def _issue(kl_desc, kp_desc, bar, k0, k1, kp, bt_ptr, seq, n0, stride_bt, max_len, CH: gl.constexpr,
               PAGE: gl.constexpr, PAGED: gl.constexpr):
        """TMA of one full tile (cache rows n0 .. n0 + BN of sequence seq) into one ring stage."""
        if PAGED:   # BN divides the page: the tile lies in one page
            row0 = gl.load(bt_ptr + seq.to(gl.int64) * stride_bt + n0 // PAGE) * PAGE + n0 % PAGE
        else:
            row0 = seq * max_len + n0
        mbarrier.expect(bar, 2 * kl_desc.block_type.nbytes + kp_desc.block_type.nbytes)
        _tma_load(kl_desc, [row0, 0], bar, k0)
        _tma_load(kl_desc, [row0, CH], bar, k1)
        _tma_load(kp_desc, [row0, 0], bar, kp)

    @gluon.jit
    def _step(q0, q1, qp, k0, k1, kp, p_smem, acc0, acc1, m_i, l_acc, n0, end, scale_log2,
              S_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
              MASKED: gl.constexpr):
        """One tile: scores (each warpgroup BN / 2 keys), online softmax, p through shared memory, p . v. The
        softmax denominator stays elementwise (l_acc [BH, BN], summed over keys once, after the last tile): a row
        sum here would cost a reduction across the two warpgroups per tile."""
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
        s = warpgroup_mma(q0, k0.permute((1, 0)), s, use_acc=False, is_async=True)
        s = warpgroup_mma(q1, k1.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(qp, kp.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        s = s * scale_log2
        if MASKED:
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
            s = gl.where(gl.expand_dims(offs_n < end, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_acc = l_acc * gl.expand_dims(alpha, 1) + p
        a_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
        acc0 = acc0 * a_o
        acc1 = acc1 * a_o
        p_smem.store(p.to(p_smem.dtype))
        fence_async_shared()
        _cta_barrier()        # each warpgroup reads the other's keys of p
        acc0 = warpgroup_mma(p_smem, k0, acc0, is_async=True)
        acc1 = warpgroup_mma(p_smem, k1, acc1, is_async=True)
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        _cta_barrier()        # both warpgroups are done with this stage and with p
        return acc0, acc1, m_new, l_acc

    @gluon.jit
    def _tail_to_smem(kv_ptr, bt_ptr, seq, n0, end, stride_kv0, stride_kv1, stride_bt, k0, k1, kp,
                      C: gl.constexpr, CH: gl.constexpr, DR: gl.constexpr, PAGE: gl.constexpr, PAGED: gl.constexpr,
                      BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
        """The ragged last tile by masked loads (rows >= end read 0) into a free ring stage."""
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        ok = offs_n < end
        if PAGED:   # BN divides the page: one page id for the tile
            page = gl.load(bt_ptr + seq.to(gl.int64) * stride_bt + n0 // PAGE)
            base = page.to(gl.int64) * stride_kv0 + (offs_n % PAGE) * stride_kv1
        else:
            base = seq.to(gl.int64) * stride_kv0 + offs_n.to(gl.int64) * stride_kv1
        rows = gl.expand_dims(kv_ptr + base, 1)
        ok2 = gl.expand_dims(ok, 1)
        offs_c = gl.arange(0, CH, layout=gl.SliceLayout(0, ld))
        offs_r = gl.arange(0, DR, layout=gl.SliceLayout(0, ld))
        k0.store(gl.load(rows + gl.expand_dims(offs_c, 0), mask=ok2, other=0.0))
        k1.store(gl.load(rows + CH + gl.expand_dims(offs_c, 0), mask=ok2, other=0.0))
        kp.store(gl.load(rows + C + gl.expand_dims(offs_r, 0), mask=ok2, other=0.0))
        fence_async_shared()
        _cta_barrier()

    @gluon.jit
    def _mla_decode_partial_wgmma(
        ql_desc, qp_desc, kl_desc, kp_desc, kv_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,
        stride_kv0, stride_kv1, stride_bt, stride_or, stride_on, stride_ok, stride_lr, stride_ln,
        S, N, SPLITS, max_len, scale_log2,
        C: gl.constexpr, DR: gl.constexpr, PAGE: gl.constexpr, PAGED: gl.constexpr, FINAL: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        BLOCK_H: gl.constexpr = ql_desc.block_type.shape[0]
        CH: gl.constexpr = ql_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = kl_desc.block_type.shape[0]
        NSTAGE: gl.constexpr = 2
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BLOCK_N // 2, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, CH // 2, 16])
        dtype: gl.constexpr = ql_desc.dtype

        hblk = gl.program_id(0)
        row = gl.program_id(1)
        split = gl.program_id(2)
        seq = row // S
        ctx = gl.minimum(gl.load(len_ptr + row), max_len)      # never read past the cache
        chunk = ((ctx + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = split * chunk
        end = gl.minimum(start + chunk, ctx)
        n_full = gl.maximum(end - start, 0) // BLOCK_N

        q0 = gl.allocate_shared_memory(dtype, [BLOCK_H, CH], ql_desc.layout)
        q1 = gl.allocate_shared_memory(dtype, [BLOCK_H, CH], ql_desc.layout)
        qp = gl.allocate_shared_memory(dtype, [BLOCK_H, DR], qp_desc.layout)
        k0 = gl.allocate_shared_memory(dtype, [NSTAGE, BLOCK_N, CH], kl_desc.layout)
        k1 = gl.allocate_shared_memory(dtype, [NSTAGE, BLOCK_N, CH], kl_desc.layout)
        kp = gl.allocate_shared_memory(dtype, [NSTAGE, BLOCK_N, DR], kp_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype))
        bars = gl.allocate_shared_memory(gl.int64, [NSTAGE + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NSTAGE + 1):
            mbarrier.init(bars.index(i), count=1)

        qrow = row * N + hblk * BLOCK_H
        qbar = bars.index(NSTAGE)
        mbarrier.expect(qbar, 2 * ql_desc.block_type.nbytes + qp_desc.block_type.nbytes)
        _tma_load(ql_desc, [qrow, 0], qbar, q0)
        _tma_load(ql_desc, [qrow, CH], qbar, q1)
        _tma_load(qp_desc, [qrow, 0], qbar, qp)
        for i in gl.static_range(NSTAGE):
            if i < n_full:
                _issue(kl_desc, kp_desc, bars.index(i), k0.index(i), k1.index(i), kp.index(i), bt_ptr, seq,
                       start + i * BLOCK_N, stride_bt, max_len, CH, PAGE, PAGED)

        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
        l_acc = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
        acc0 = gl.zeros([BLOCK_H, CH], gl.float32, O_LAYOUT)
        acc1 = gl.zeros([BLOCK_H, CH], gl.float32, O_LAYOUT)
        mbarrier.wait(qbar, 0)
        for i in range(n_full):
            st = i % NSTAGE
            mbarrier.wait(bars.index(st), (i // NSTAGE) & 1)
            acc0, acc1, m_i, l_acc = _step(q0, q1, qp, k0.index(st), k1.index(st), kp.index(st), p_smem, acc0, acc1,
                                         m_i, l_acc, start + i * BLOCK_N, end, scale_log2, S_LAYOUT, O_LAYOUT,
                                         BLOCK_H, BLOCK_N, False)
            if i + NSTAGE < n_full:   # stage st is free again (_step ended on a barrier)
                _issue(kl_desc, kp_desc, bars.index(st), k0.index(st), k1.index(st), kp.index(st), bt_ptr, seq,
                       start + (i + NSTAGE) * BLOCK_N, stride_bt, max_len, CH, PAGE, PAGED)
        n_tail = start + n_full * BLOCK_N
        if n_tail < end:
            _tail_to_smem(kv_ptr, bt_ptr, seq, n_tail, end, stride_kv0, stride_kv1, stride_bt, k0.index(0),
                          k1.index(0), kp.index(0), C, CH, DR, PAGE, PAGED, BLOCK_N, num_warps)
            acc0, acc1, m_i, l_acc = _step(q0, q1, qp, k0.index(0), k1.index(0), kp.index(0), p_smem, acc0, acc1,
                                         m_i, l_acc, n_tail, end, scale_log2, S_LAYOUT, O_LAYOUT, BLOCK_H, BLOCK_N,
                                         True)
        for i in gl.static_range(NSTAGE + 1):
            mbarrier.invalidate(bars.index(i))

        l_i = gl.sum(l_acc, axis=1)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_LAYOUT))
        inv = gl.expand_dims(1.0 / gl.where(l_o > 0, l_o, 1.0), 1)
        offs_h = hblk * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_LAYOUT))
        offs_c = gl.arange(0, CH, layout=gl.SliceLayout(0, O_LAYOUT))
        o_ptrs = (o_ptr + row.to(gl.int64) * stride_or + gl.expand_dims(offs_h, 1) * stride_on + split * stride_ok
                  + gl.expand_dims(offs_c, 0))
        gl.store(o_ptrs, (acc0 * inv).to(o_ptr.dtype.element_ty))
        gl.store(o_ptrs + CH, (acc1 * inv).to(o_ptr.dtype.element_ty))
        if not FINAL:
            lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            offs_hs = hblk * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, S_LAYOUT))
            gl.store(lse_ptr + row.to(gl.int64) * stride_lr + offs_hs * stride_ln + split, lse)


def launch_partial(q: torch.Tensor, kv: torch.Tensor, bt: torch.Tensor, ctx_lens: torch.Tensor,
                   o_part: torch.Tensor, lse: torch.Tensor, c: int, rows_per_seq: int, splits: int, max_len: int,
                   scale_log2: float, paged: bool) -> None:
    """Stage 1 over grid (N / 64, R, K): o_part [R, N, K, C] (or the final [R, N, 1, C] when K == 1) and lse
    [R, N, K]. Inputs as kernels/mla_decode.mla_decode takes them, checked by `unsupported`."""
    q = q if q.is_contiguous() else q.contiguous()
    heads = q.shape[1]
    _mla_decode_partial_wgmma[(triton.cdiv(heads, BH), q.shape[0], splits)](
        *descriptors(q, kv, c), kv, bt, ctx_lens, o_part, lse,
        kv.stride(0), kv.stride(1), bt.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        rows_per_seq, heads, splits, max_len, scale_log2,
        C=c, DR=q.shape[-1] - c, PAGE=kv.shape[1] if paged else 1, PAGED=paged, FINAL=splits == 1,
        num_warps=WARPS,
    )
