"""The partitions of kernels/fused_moe_wgmma.py's warp-specialised expert GEMM (Gluon, Triton >= 3.6).

Dimension legend: R aligned rows, E experts, K depth, N output columns, NW weight rows per expert, BH = 64 rows per
consumer warpgroup, BN weight rows per B tile, BK = 64 deep steps, S ring stages; a tile = one 128-row block of the
merged block list x one column tile; g counts ring steps across a program's tiles.

Every partition walks the same tiles (t = pid, pid + programs, ...; `_tile` maps each to its block and column
tile, and says whether the block is in use) and the same ring steps, so the mbarrier phases stay in step: the
loader (TMA) or gatherer (cp.async) fills stage g % S, each consumer warpgroup waits for it, runs its wgmma and
frees the stage before it.
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon
from nanomoe_kernels.moe_blocks import expert_group

if gluon is not None:
    from nanomoe_kernels.mla_decode_wgmma import _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

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
    def _tile(t, used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr, nblocks_ptr, NW,
              BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, EXPERT_GROUP: gl.constexpr):
        """Tile t of the grid's order -> (in use, its first aligned row, its block code, first weight row, first
        column): GROUP_M row blocks per column tile, or expert_group's groups of one expert (EXPERT_GROUP > 0)."""
        pid_m = t * 0
        pid_n = t * 0
        if EXPERT_GROUP > 0:
            valid = t // num_pid_n < used
            if valid:   # the tables past `used` hold no expert to look up
                pid_m, pid_n = expert_group(t, num_pid_n, codes_ptr, first_ptr, nblocks_ptr, EXPERT_GROUP)
        else:
            per_group = GROUP_M * num_pid_n
            first_m = (t // per_group) * GROUP_M
            group_m = gl.minimum(num_blocks - first_m, GROUP_M)
            pid_m = first_m + (t % per_group) % group_m
            pid_n = (t % per_group) // group_m
            valid = pid_m < used
        row0 = t * 0
        code = t * 0
        if valid:
            row0 = gl.load(rows_ptr + pid_m)
            code = gl.load(codes_ptr + pid_m)
        col0 = pid_n * BLOCK_N
        return valid, row0, code, (code & 0x3FFFFFFF) * NW + col0, col0

    # a barrier over the partition's threads: thread_barrier in Triton 3.6, barrier from 3.7
    _cta_sync = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def _next_tile(t, sched_ptr, DYNAMIC: gl.constexpr):
        """The producer's next tile: the next unclaimed one (a counter in global memory; each program's first tile
        is its pid, so the counter starts past them) or, static, t + programs."""
        if DYNAMIC:
            return gl.num_programs(0) + gl.atomic_add(sched_ptr, 1)
        return t + gl.num_programs(0)

    @gluon.jit
    def _publish(tile_s, tile_ready, tile_free, i, t):
        """Producer: hand tile t (>= the tile count: no more) to the consumers as this program's tile i + 1."""
        j = i % 2
        mbarrier.wait(tile_free.index(j), ((i // 2) & 1) ^ 1)     # fresh barriers pass phase 1
        tile_s.index(j).store(gl.full([1], t, gl.int32, gl.BlockedLayout([1], [32], [gl.num_warps()], [0])))
        _cta_sync()
        mbarrier.arrive(tile_ready.index(j), count=1)

    @gluon.jit
    def _receive(tile_s, tile_ready, tile_free, i):
        """Consumer: this program's tile i + 1, as the producer published it."""
        j = i % 2
        mbarrier.wait(tile_ready.index(j), (i // 2) & 1)
        t = gl.max(tile_s.index(j).load(gl.BlockedLayout([1], [32], [gl.num_warps()], [0])), axis=0)
        _cta_sync()
        mbarrier.arrive(tile_free.index(j), count=1)
        return t

    @gluon.jit
    def _load_partition(a_desc, b_desc, a0, a1, b, ready, free, tiling, sched_ptr, tile_s, tile_ready, tile_free, N,
                        K, SWIGLU: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                        EXPERT_GROUP: gl.constexpr, DYNAMIC: gl.constexpr):
        S: gl.constexpr = a0.type.shape[0]
        a_bytes: gl.constexpr = a_desc.block_type.nbytes
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        k_steps = gl.cdiv(K, a_desc.block_type.shape[1])
        used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr, nblocks_ptr, NW = tiling
        g = 0   # ring steps so far, across this program's tiles
        i = 0   # tiles so far
        t = gl.program_id(0)
        while t < num_blocks * num_pid_n:
            valid, row0, code, brow0, col0 = _tile(t, used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr,
                                                   nblocks_ptr, NW, BLOCK_N, GROUP_M, EXPERT_GROUP)
            if valid:
                live1 = code < 0x40000000
                for kk in range(k_steps):
                    s = g % S
                    mbarrier.wait(free.index(s), ((g // S) & 1) ^ 1)     # fresh barriers pass phase 1
                    bar = ready.index(s)
                    k = kk * a_desc.block_type.shape[1]
                    if live1:
                        mbarrier.expect(bar, 2 * a_bytes + b_bytes)
                        _tma_load(a_desc, [row0 + a_desc.block_type.shape[0], k], bar, a1.index(s))
                    else:
                        mbarrier.expect(bar, a_bytes + b_bytes)
                    _tma_load(a_desc, [row0, k], bar, a0.index(s))
                    _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)
                    g += 1
            # the next tile, claimed once this one's loads are out: the consumers take it after this one's epilogue
            t = _next_tile(t, sched_ptr, DYNAMIC)
            if DYNAMIC:
                _publish(tile_s, tile_ready, tile_free, i, t)
            i += 1

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
    def _land_copies(ready, done, g):
        """Wait for every cp.async in flight and arrive on the `ready` of steps done .. g - 1; returns g."""
        S: gl.constexpr = ready.type.shape[0]
        async_copy.wait_group(0)
        fence_async_shared()
        for j in range(done, g):
            mbarrier.arrive(ready.index(j % S), count=1)
        return g

    @gluon.jit
    def _gather_partition(a_ptr, a_index_ptr, ids_ptr, b_desc, a0, a1, b, ready, free, tiling, sched_ptr, tile_s,
                          tile_ready, tile_free, N, K, num_rows, stride_am, A_DIV: gl.constexpr,
                          A_INDEX: gl.constexpr, SWIGLU: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                          EXPERT_GROUP: gl.constexpr, DYNAMIC: gl.constexpr, num_warps: gl.constexpr):
        """A's rows gathered by cp.async (S - 1 steps in flight, across tiles too) and B by TMA, into the ring."""
        S: gl.constexpr = a0.type.shape[0]
        BLOCK_H: gl.constexpr = a0.type.shape[1]
        BLOCK_K: gl.constexpr = a0.type.shape[2]
        b_bytes: gl.constexpr = b.type.shape[1] * b.type.shape[2] * b_desc.dtype.primitive_bitwidth // 8
        LD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])   # 16-byte copies
        offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, LD))
        r = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, LD))
        k_steps = gl.cdiv(K, BLOCK_K)
        used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr, nblocks_ptr, NW = tiling
        g = 0   # ring steps so far, across this program's tiles
        done = 0   # steps whose `ready` this partition has arrived on (their copies landed)
        i = 0   # tiles so far
        t = gl.program_id(0)
        while t < num_blocks * num_pid_n:
            valid, row0, code, brow0, col0 = _tile(t, used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr,
                                                   nblocks_ptr, NW, BLOCK_N, GROUP_M, EXPERT_GROUP)
            if valid:
                live1 = code < 0x40000000
                rows0, ok0 = _a_rows(ids_ptr, a_index_ptr, row0 + r, num_rows, A_DIV, A_INDEX)
                rows1, ok1 = _a_rows(ids_ptr, a_index_ptr, row0 + BLOCK_H + r, num_rows, A_DIV, A_INDEX)
                # row starts are 16-byte aligned (`unsupported` checks the stride): each thread copies 16 bytes
                p0 = a_ptr + gl.expand_dims(gl.multiple_of(rows0 * stride_am, 8), 1) + gl.expand_dims(offs_k, 0)
                p1 = a_ptr + gl.expand_dims(gl.multiple_of(rows1 * stride_am, 8), 1) + gl.expand_dims(offs_k, 0)
                ok0 = gl.expand_dims(ok0, 1)
                ok1 = gl.expand_dims(ok1 & live1, 1)
                for kk in range(k_steps):
                    # step g - S + 1's copies have landed (S - 2 groups may stay in flight): its stage is ready.
                    # Done before waiting for step g's slot, which the consumers free only once they have that step.
                    if g - done >= S - 1:
                        async_copy.wait_group(S - 2)
                        fence_async_shared()
                        mbarrier.arrive(ready.index(done % S), count=1)
                        done += 1
                    s = g % S
                    mbarrier.wait(free.index(s), ((g // S) & 1) ^ 1)     # fresh barriers pass phase 1
                    bar = ready.index(s)
                    k = kk * BLOCK_K
                    mbarrier.expect(bar, b_bytes)
                    _load_b(b_desc, bar, b.index(s), brow0, N, k, SWIGLU)
                    _cp_async(a0.index(s), p0 + k, mask=ok0)   # K % BLOCK_K == 0
                    if live1:
                        _cp_async(a1.index(s), p1 + k, mask=ok1)
                    async_copy.commit_group()
                    g += 1
            t = _next_tile(t, sched_ptr, DYNAMIC)
            if DYNAMIC:
                # the consumers may need this tile's last copies before they can take the next one: land them all
                # (a following tile may be one with no rows, which issues none)
                done = _land_copies(ready, done, g)
                _publish(tile_s, tile_ready, tile_free, i, t)
            i += 1
        _land_copies(ready, done, g)


    @gluon.jit
    def _consume_tile(a_s, b, ready, free, g, k_steps, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm,
                      SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr):
        """One tile's k-steps from ring step g and its epilogue; returns the ring step after it."""
        S: gl.constexpr = a_s.type.shape[0]
        BLOCK_H: gl.constexpr = a_s.type.shape[1]
        ACC_N: gl.constexpr = b.type.shape[1]
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ACC_N, 16])
        acc = gl.zeros([BLOCK_H, ACC_N], gl.float32, ACC)
        for kk in range(k_steps):
            s = g % S
            mbarrier.wait(ready.index(s), (g // S) & 1)
            acc = warpgroup_mma(a_s.index(s), b.index(s).permute((1, 0)), acc, is_async=True)
            # the previous step's wgmma has retired: its stage goes back to the loader
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(free.index((g + S - 1) % S), count=1, pred=kk > 0)
            g += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(free.index((g + S - 1) % S), count=1)
        if SWIGLU:   # [gate | up] columns -> silu(gate) * up, a register split (no data movement)
            gate, up = acc.reshape([BLOCK_H, 2, ACC_N // 2]).permute((0, 2, 1)).split()
            y = gate / (1.0 + gl.exp(-gate)) * up
        else:
            y = acc
        OUT: gl.constexpr = y.type.layout
        offs_m = row0 + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, OUT))
        ids = gl.load(ids_ptr + offs_m)
        row_ok = gl.expand_dims(ids < num_rows, 1)
        if SCATTER_C:
            c_rows = gl.expand_dims(ids.to(gl.int64) * stride_cm, 1)
        else:
            c_rows = gl.expand_dims(offs_m.to(gl.int64) * stride_cm, 1)
        offs_n = gl.expand_dims(col0 + gl.arange(0, y.type.shape[1], layout=gl.SliceLayout(0, OUT)), 0)
        if MUL_WEIGHT:
            y = y * gl.expand_dims(gl.load(w_ptr + ids, mask=ids < num_rows, other=0.0), 1)
        gl.store(c_ptr + c_rows + offs_n, y.to(c_ptr.dtype.element_ty), mask=row_ok & (offs_n < N))
        return g

    @gluon.jit
    def _consume_partition(a_s, b, ready, free, half, tiling, tile_s, tile_ready, tile_free, c_ptr, w_ptr, ids_ptr,
                           num_rows, N, K, stride_cm, SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr,
                           SCATTER_C: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
                           EXPERT_GROUP: gl.constexpr, DYNAMIC: gl.constexpr):
        """Warpgroup `half` (0 / 1: rows BH * half ..) of each of this program's tiles."""
        S: gl.constexpr = a_s.type.shape[0]
        BLOCK_H: gl.constexpr = a_s.type.shape[1]
        k_steps = gl.cdiv(K, a_s.type.shape[2])
        used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr, nblocks_ptr, NW = tiling
        g = 0   # ring steps so far, across this program's tiles
        i = 0   # tiles so far
        t = gl.program_id(0)
        while t < num_blocks * num_pid_n:
            valid, row0, code, brow0, col0 = _tile(t, used, num_pid_n, num_blocks, rows_ptr, codes_ptr, first_ptr,
                                                   nblocks_ptr, NW, BLOCK_N, GROUP_M, EXPERT_GROUP)
            if valid:
                # a main block: both halves hold rows; a tail block: the first only
                if (half == 0) | (code < 0x40000000):
                    g = _consume_tile(a_s, b, ready, free, g, k_steps, c_ptr, w_ptr, ids_ptr, row0 + half * BLOCK_H,
                                      col0, num_rows, N, stride_cm, SWIGLU, MUL_WEIGHT, SCATTER_C)
                else:   # no rows here: only keep the ring's phases in step
                    for _ in range(k_steps):
                        mbarrier.wait(ready.index(g % S), (g // S) & 1)
                        mbarrier.arrive(free.index(g % S), count=1)
                        g += 1
            if DYNAMIC:
                t = _receive(tile_s, tile_ready, tile_free, i)
            else:
                t += gl.num_programs(0)
            i += 1
