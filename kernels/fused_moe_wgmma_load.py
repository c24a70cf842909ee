"""The producer partitions of the grouped wgmma expert GEMM (kernels/fused_moe_wgmma.py): each k-step's A rows, B
tile and, with carried tails (kernels/fused_moe_wgmma_tail.py), the tail's rows into the S-stage ring.

Dimension legend: BH = 64 rows per consumer warpgroup, BK = 64 deep steps, NB weight rows of a B tile (2 BN with
SwiGLU, else BN), TN carried tail rows (TAIL_N), S ring stages.

    load    (1 warp)   TMA of A [BH, BK] for each live half, B [NB, BK] and the carried tail [TN, BK], one expect
                       per stage (ready / free mbarriers; free waits for both warpgroups)
    gather  (4 warps)  A's rows (and the tail's) gathered by 16-byte cp.async, S - 1 steps in flight; B by TMA
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

if gluon is not None:
    from nanomoe_kernels.mla_decode_wgmma import _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

    # cp.async into shared memory: async_load from Triton 3.7 (3.9 removed the old name), the old name in 3.6
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

    @gluon.jit
    def _load_b(b_desc, bar, b_s, brow0, N, k, SWIGLU: gl.constexpr):
        """TMA of one step's B tile into b_s; SwiGLU: the gate rows, then the up rows of the same columns (I
        further), in one [2 * B_ROWS, BK] tile."""
        B_ROWS: gl.constexpr = b_desc.block_type.shape[0]
        if SWIGLU:
            _tma_load(b_desc, [brow0, k], bar, b_s.slice(0, B_ROWS))
            _tma_load(b_desc, [brow0 + N, k], bar, b_s.slice(B_ROWS, B_ROWS))
        else:
            _tma_load(b_desc, [brow0, k], bar, b_s)

    @gluon.jit
    def load_partition(a_desc, b_desc, t_desc, a0, a1, b, t, ready, free, row0, brow0, N, live1, carry, k_steps,
                       SWIGLU: gl.constexpr, TAIL_N: gl.constexpr):
        """Aligned A rows (the down GEMM's) by TMA: A's live halves, B and, when carrying, the tail's TN rows after
        the block's, one expect per stage."""
        S: gl.constexpr = a0.type.shape[0]
        a_bytes: gl.constexpr = a_desc.block_type.nbytes
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * a_desc.block_type.shape[1]
            if live1:
                if TAIL_N > 0:
                    if carry:   # the carried tail's rows follow the block's (fused_moe_wgmma_tail.py)
                        mbarrier.expect(bar, 2 * a_bytes + b_bytes + t_desc.block_type.nbytes)
                        _tma_load(t_desc, [row0 + 2 * a_desc.block_type.shape[0], k], bar, t.index(s))
                    else:
                        mbarrier.expect(bar, 2 * a_bytes + b_bytes)
                else:
                    mbarrier.expect(bar, 2 * a_bytes + b_bytes)
                _tma_load(a_desc, [row0 + a_desc.block_type.shape[0], k], bar, a1.index(s))
            else:
                mbarrier.expect(bar, a_bytes + b_bytes)
            _tma_load(a_desc, [row0, k], bar, a0.index(s))
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)

    @gluon.jit
    def _a_rows(ids_ptr, a_index_ptr, pos, num_rows, A_DIV: gl.constexpr, A_INDEX: gl.constexpr):
        """A's source row of each aligned row (pair id // A_DIV, then a_index), and whether the row is live."""
        ids = gl.load(ids_ptr + pos)
        ok = ids < num_rows
        rows = gl.where(ok, ids, 0) // A_DIV
        if A_INDEX:
            rows = gl.load(a_index_ptr + rows, mask=ok, other=0)
        return rows.to(gl.int64), ok

    @gluon.jit
    def gather_partition(a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, b, t, ready, free, row0, brow0, N, live1, carry,
                         k_steps, num_rows, stride_am, A_DIV: gl.constexpr, A_INDEX: gl.constexpr,
                         SWIGLU: gl.constexpr, TAIL_N: gl.constexpr, num_warps: gl.constexpr):
        """A's rows gathered by cp.async (S - 1 steps in flight) and B by TMA, into the ring."""
        BLOCK_H: gl.constexpr = a0.type.shape[1]
        BLOCK_K: gl.constexpr = a0.type.shape[2]
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])   # 16-byte copies
        offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LD))
        r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD))
        rows0, ok0 = _a_rows(ids_ptr, a_index_ptr, row0 + r, num_rows, A_DIV, A_INDEX)
        rows1, ok1 = _a_rows(ids_ptr, a_index_ptr, row0 + BLOCK_H + r, num_rows, A_DIV, A_INDEX)
        # row starts are 16-byte aligned (`unsupported` checks the stride), so each thread copies 16 bytes at once
        p0 = a_ptr + gl.expand_dims(gl.multiple_of(rows0 * stride_am, 8), 1) + gl.expand_dims(offs_k, 0)
        p1 = a_ptr + gl.expand_dims(gl.multiple_of(rows1 * stride_am, 8), 1) + gl.expand_dims(offs_k, 0)
        ok0 = gl.expand_dims(ok0, 1)
        ok1 = gl.expand_dims(ok1 & live1, 1)
        if TAIL_N > 0:
            if carry:   # the carried tail's rows follow the block's (a main block: both halves live)
                rt = gl.arange(0, TAIL_N, layout=gl.SliceLayout(1, LD))
                rows_t, ok_t = _a_rows(ids_ptr, a_index_ptr, row0 + 2 * BLOCK_H + rt, num_rows, A_DIV, A_INDEX)
                p_t = a_ptr + gl.expand_dims(gl.multiple_of(rows_t * stride_am, 8), 1) + gl.expand_dims(offs_k, 0)
                _gather_loop(b_desc, a0, a1, b, t, ready, free, brow0, N, k_steps, p0, ok0, p1, ok1, True, p_t,
                             gl.expand_dims(ok_t, 1), SWIGLU, True)
            else:
                _gather_loop(b_desc, a0, a1, b, t, ready, free, brow0, N, k_steps, p0, ok0, p1, ok1, live1, p0, ok0,
                             SWIGLU, False)
        else:
            _gather_loop(b_desc, a0, a1, b, t, ready, free, brow0, N, k_steps, p0, ok0, p1, ok1, live1, p0, ok0,
                         SWIGLU, False)

    @gluon.jit
    def _gather_loop(b_desc, a0, a1, b, t, ready, free, brow0, N, k_steps, p0, ok0, p1, ok1, live1, p_t, ok_t,
                     SWIGLU: gl.constexpr, CARRY: gl.constexpr):
        S: gl.constexpr = a0.type.shape[0]
        BLOCK_K: gl.constexpr = a0.type.shape[2]
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        for kk in range(k_steps):
            cp_async_landed(ready, kk, S)
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * BLOCK_K
            mbarrier.expect(bar, b_bytes)
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)
            _cp_async(a0.index(s), p0 + k, mask=ok0)   # K % BLOCK_K == 0
            if live1:
                _cp_async(a1.index(s), p1 + k, mask=ok1)
            if CARRY:
                _cp_async(t.index(s), p_t + k, mask=ok_t)
            async_copy.commit_group()
        cp_async_drain(ready, k_steps, S)

    @gluon.jit
    def cp_async_landed(ready, kk, S: gl.constexpr):
        """A cp.async ring's step kk: step kk - S + 1's copies have landed (S - 2 groups may stay in flight), so its
        stage is ready. Called before waiting for stage kk's slot, which the consumers free only once they have
        that step."""
        if kk >= S - 1:
            async_copy.wait_group(S - 2)
            fence_async_shared()
            mbarrier.arrive(ready.index((kk - S + 1) % S), count=1)

    @gluon.jit
    def cp_async_drain(ready, k_steps, S: gl.constexpr):
        """After a cp.async ring's last step: every copy has landed; the last S - 1 steps' stages are ready."""
        async_copy.wait_group(0)
        fence_async_shared()
        for j in range(gl.maximum(k_steps - S + 1, 0), k_steps):
            mbarrier.arrive(ready.index(j % S), count=1)
