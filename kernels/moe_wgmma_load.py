"""The producer partitions of kernels/fused_moe_wgmma.py's grouped expert GEMM (Gluon, Hopper): per k-step, A's
tiles of each live BH-row group and B's weight tile into the S-stage ring.

Dimension legend (as kernels/fused_moe_wgmma.py): BH rows per consumer warpgroup, BK deep steps, S ring stages,
NUM_WG consumer warpgroups (2 or 4), nlive of them holding rows in this program, N output columns (SwiGLU: the up
rows lie N further than the gate rows).

    _load_partition    (1 warp)   TMA of A [BH, BK] per live group and B, one expect per stage
    _gather_partition  (4 warps)  A's rows gathered by 16-byte cp.async (S - 1 steps in flight), B by TMA

A dead group's tiles are never loaded: its consumer only paces the ring.
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
    def _load_partition(a_desc, b_desc, a0, a1, a2, a3, b, ready, free, row0, brow0, N, nlive, k_steps,
                        SWIGLU: gl.constexpr, NUM_WG: gl.constexpr):
        S: gl.constexpr = a0.type.shape[0]
        BLOCK_H: gl.constexpr = a_desc.block_type.shape[0]
        a_bytes: gl.constexpr = a_desc.block_type.nbytes
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * a_desc.block_type.shape[1]
            if nlive > 3:   # expect takes a constant byte count
                mbarrier.expect(bar, 4 * a_bytes + b_bytes)
            elif nlive > 2:
                mbarrier.expect(bar, 3 * a_bytes + b_bytes)
            elif nlive > 1:
                mbarrier.expect(bar, 2 * a_bytes + b_bytes)
            else:
                mbarrier.expect(bar, a_bytes + b_bytes)
            _tma_load(a_desc, [row0, k], bar, a0.index(s))
            if nlive > 1:
                _tma_load(a_desc, [row0 + BLOCK_H, k], bar, a1.index(s))
            if NUM_WG == 4:
                if nlive > 2:
                    _tma_load(a_desc, [row0 + 2 * BLOCK_H, k], bar, a2.index(s))
                if nlive > 3:
                    _tma_load(a_desc, [row0 + 3 * BLOCK_H, k], bar, a3.index(s))
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)

    @gluon.jit
    def _a_ptrs(a_ptr, a_index_ptr, ids_ptr, pos, offs_k, num_rows, stride_am, live, A_DIV: gl.constexpr,
                A_INDEX: gl.constexpr):
        """Pointers to A's first BK columns of each aligned row's source (pair id // A_DIV, then a_index), and a
        mask of the live rows (padding rows and a dead warpgroup's rows read as zeros)."""
        ids = gl.load(ids_ptr + pos, mask=live & (pos >= 0), other=num_rows)   # a dead group's rows may pass R
        ok = ids < num_rows
        rows = gl.where(ok, ids, 0) // A_DIV
        if A_INDEX:
            rows = gl.load(a_index_ptr + rows, mask=ok, other=0)
        rows = rows.to(gl.int64)
        return a_ptr + gl.expand_dims(gl.multiple_of(rows * stride_am, 8), 1) + offs_k, gl.expand_dims(ok, 1)

    @gluon.jit
    def _gather_partition(a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, a2, a3, b, ready, free, row0, brow0, N, nlive,
                          k_steps, num_rows, stride_am, A_DIV: gl.constexpr, A_INDEX: gl.constexpr,
                          SWIGLU: gl.constexpr, NUM_WG: gl.constexpr, num_warps: gl.constexpr):
        """A's rows gathered by cp.async (S - 1 steps in flight) and B by TMA, into the ring."""
        S: gl.constexpr = a0.type.shape[0]
        BLOCK_H: gl.constexpr = a0.type.shape[1]
        BLOCK_K: gl.constexpr = a0.type.shape[2]
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])   # 16-byte copies
        offs_k = gl.expand_dims(gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LD)), 0)
        r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD))
        # row starts are 16-byte aligned (`unsupported` checks the stride), so each thread copies 16 bytes at once
        p0, ok0 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + r, offs_k, num_rows, stride_am, True, A_DIV, A_INDEX)
        p1, ok1 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + BLOCK_H + r, offs_k, num_rows, stride_am, nlive > 1,
                          A_DIV, A_INDEX)
        if NUM_WG == 4:
            p2, ok2 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + 2 * BLOCK_H + r, offs_k, num_rows, stride_am,
                              nlive > 2, A_DIV, A_INDEX)
            p3, ok3 = _a_ptrs(a_ptr, a_index_ptr, ids_ptr, row0 + 3 * BLOCK_H + r, offs_k, num_rows, stride_am,
                              nlive > 3, A_DIV, A_INDEX)
        for kk in range(k_steps):
            # step kk - S + 1's copies have landed (S - 2 groups may stay in flight): its stage is ready. Done before
            # waiting for stage kk's slot, which the consumers free only once they have that step.
            if kk >= S - 1:
                async_copy.wait_group(S - 2)
                fence_async_shared()
                mbarrier.arrive(ready.index((kk - S + 1) % S), count=1)
            s = kk % S
            mbarrier.wait(free.index(s), ((kk // S) & 1) ^ 1)     # fresh barriers pass phase 1
            bar = ready.index(s)
            k = kk * BLOCK_K
            mbarrier.expect(bar, b_bytes)
            _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)
            _cp_async(a0.index(s), p0 + k, mask=ok0)   # K % BLOCK_K == 0
            if nlive > 1:
                _cp_async(a1.index(s), p1 + k, mask=ok1)
            if NUM_WG == 4:
                if nlive > 2:
                    _cp_async(a2.index(s), p2 + k, mask=ok2)
                if nlive > 3:
                    _cp_async(a3.index(s), p3 + k, mask=ok3)
            async_copy.commit_group()
        async_copy.wait_group(0)
        fence_async_shared()
        for j in range(gl.maximum(k_steps - S + 1, 0), k_steps):
            mbarrier.arrive(ready.index(j % S), count=1)

