"""The producer partitions of the swap-AB expert GEMM (kernels/fused_moe_swap.py): each k-step's weight tile and
the block's token rows into the S-stage ring.

Dimension legend: BW = 128 weight rows a program, BT = 256 tokens in the main ring, QX = 32 tokens in the extra ring
(a block's rows 256..287), Q = 16 tokens a TMA box, BK = 64 deep steps, S ring stages, V = the block's rows / 16.

    load    (1 warp)   TMA of the weight tile [BW, BK] and the block's V boxes of [Q, BK] aligned rows (the down
                       GEMM's), one expect per stage; rows past the block are loaded and never stored
    gather  (4 warps)  the block's rows gathered by 16-byte cp.async (pair id // A_DIV, then a_index), S - 1 steps
                       in flight, the weight tile by TMA
SwiGLU: the weight tile is 16 boxes of 8 rows, a column block's gate rows then its up rows, alternating, so that
wgmma's accumulator holds a column's gate and up in one thread (rows r and r + 8).
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

if gluon is not None:
    from nanomoe_kernels.fused_moe_wgmma_load import _cp_async, cp_async_drain, cp_async_landed
    from nanomoe_kernels.mla_decode_wgmma import _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    @gluon.jit
    def load_weights(w_desc, bar, w_s, w_row0, up_off, k, SWIGLU: gl.constexpr):
        """TMA of one step's weight tile [BW, BK] into w_s; SwiGLU: 8-row boxes, gate rows 8q.. then their up rows
        (up_off further) at tile rows 16q.. / 16q + 8.."""
        BW: gl.constexpr = w_s.type.shape[0]
        if SWIGLU:
            for q in gl.static_range(BW // 16):
                _tma_load(w_desc, [w_row0 + 8 * q, k], bar, w_s.slice(16 * q, 8))
                _tma_load(w_desc, [w_row0 + up_off + 8 * q, k], bar, w_s.slice(16 * q + 8, 8))
        else:
            _tma_load(w_desc, [w_row0, k], bar, w_s)

    @gluon.jit
    def _load_v(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, k_steps, V: gl.constexpr,
                SWIGLU: gl.constexpr):
        S: gl.constexpr = wb.type.shape[0]
        BT: gl.constexpr = tb.type.shape[1]
        BK: gl.constexpr = tb.type.shape[2]
        Q: gl.constexpr = t_desc.block_type.shape[0]
        nbytes: gl.constexpr = wb.type.shape[1] * BK * w_desc.dtype.primitive_bitwidth // 8 \
            + V * t_desc.block_type.nbytes
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)   # fresh barriers pass phase 1
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            k = kk * BK
            load_weights(w_desc, bar, wb.index(s), w_row0, up_off, k, SWIGLU)
            for q in gl.static_range(V):
                if q < BT // Q:
                    _tma_load(t_desc, [t_row0 + Q * q, k], bar, tb.index(s).slice(Q * q, Q))
                else:   # rows 256..287 in the extra ring (shared-memory shapes are powers of two)
                    _tma_load(t_desc, [t_row0 + Q * q, k], bar, tx.index(s).slice(Q * q - BT, Q))

    @gluon.jit
    def load_partition(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, nq, k_steps,
                       NV: gl.constexpr, SWIGLU: gl.constexpr):
        """Aligned rows by TMA: one unrolled copy per V (mbarrier.expect takes a constant byte count)."""
        for v in gl.static_range(1, NV + 1):
            if nq == v:
                _load_v(w_desc, t_desc, wb, tb, tx, ready, free, w_row0, up_off, t_row0, k_steps, v, SWIGLU)

    @gluon.jit
    def _stash_offsets(a_index_ptr, ids_ptr, rs, t_row0, n_rows, num_rows, stride_am, OFF: gl.constexpr,
                       A_DIV: gl.constexpr, A_INDEX: gl.constexpr, num_warps: gl.constexpr):
        """rs[i] = the element offset in A of the block's row OFF + i (-1: past the block, or padding). Written and
        read back (`_gather_rows`) in the same layout, so each thread reads only what it wrote: no barrier."""
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])   # 16-byte copies
        j = OFF + gl.arange(0, rs.type.shape[0], layout=gl.SliceLayout(1, LD))
        ids = gl.load(ids_ptr + t_row0 + j, mask=j < n_rows, other=num_rows)
        ok = ids < num_rows
        rows = gl.where(ok, ids, 0) // A_DIV
        if A_INDEX:
            rows = gl.load(a_index_ptr + rows, mask=ok, other=0)
        rs.store(gl.where(ok, rows.to(gl.int64) * stride_am, -1))

    @gluon.jit
    def _gather_rows(a_ptr, rs, dst, k, num_warps: gl.constexpr):
        """cp.async of dst's rows from the offsets in rs, at depth k; rows at -1 are skipped."""
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        o = rs.load(gl.SliceLayout(1, LD))
        ok = gl.expand_dims(o >= 0, 1)
        offs_k = gl.arange(0, dst.type.shape[1], layout=gl.SliceLayout(0, LD))
        # row starts are 16-byte aligned (`unsupported` checks the stride): 16-byte copies
        p = a_ptr + gl.expand_dims(gl.multiple_of(gl.maximum(o, 0), 8), 1) + gl.expand_dims(offs_k, 0)
        _cp_async(dst, p + k, mask=ok)   # K % BK == 0

    @gluon.jit
    def gather_partition(a_ptr, a_index_ptr, ids_ptr, w_desc, wb, tb, tx, rs, rsx, ready, free, w_row0, up_off,
                         t_row0, n_rows, k_steps, num_rows, stride_am, A_DIV: gl.constexpr, A_INDEX: gl.constexpr,
                         SWIGLU: gl.constexpr, num_warps: gl.constexpr):
        """The block's rows gathered by cp.async (S - 1 steps in flight), the weight tile by TMA, into the ring.
        The rows' offsets wait in shared memory (rs: rows 0..255, rsx: 256..287), read 64 rows at a time each step:
        in registers, 18 rows a thread do not fit the gatherer's 64 (the consumers need 224)."""
        S: gl.constexpr = wb.type.shape[0]
        BT: gl.constexpr = tb.type.shape[1]
        BK: gl.constexpr = tb.type.shape[2]
        CH: gl.constexpr = 64
        w_bytes: gl.constexpr = wb.type.shape[1] * BK * w_desc.dtype.primitive_bitwidth // 8
        for c in gl.static_range(BT // CH):
            _stash_offsets(a_index_ptr, ids_ptr, rs.slice(CH * c, CH), t_row0, n_rows, num_rows, stride_am, CH * c,
                           A_DIV, A_INDEX, num_warps)
        _stash_offsets(a_index_ptr, ids_ptr, rsx, t_row0, n_rows, num_rows, stride_am, BT, A_DIV, A_INDEX, num_warps)
        for kk in range(k_steps):
            cp_async_landed(ready, kk, S)
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * BK
            mbarrier.expect(bar, w_bytes)
            load_weights(w_desc, bar, wb.index(s), w_row0, up_off, k, SWIGLU)
            for c in gl.static_range(BT // CH):
                if CH * c < n_rows:
                    _gather_rows(a_ptr, rs.slice(CH * c, CH), tb.index(s).slice(CH * c, CH), k, num_warps)
            if n_rows > BT:
                _gather_rows(a_ptr, rsx, tx.index(s), k, num_warps)
            async_copy.commit_group()
        cp_async_drain(ready, k_steps, S)
