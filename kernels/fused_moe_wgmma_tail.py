"""Carried tails for the grouped wgmma expert GEMM (kernels/fused_moe_wgmma.py, config key TAIL_N).

Dimension legend: BH = 64 rows per consumer warpgroup, TN tail rows carried (TAIL_N: 16 or 32), BK = 64 deep steps,
NB weight rows of a B tile (2 BN with SwiGLU, else BN), S ring stages, N the GEMM's output columns.

Why: at 128-256 rows per expert about half the experts end in a 64-row tail block with a handful of real rows (the
count past a multiple of 128 is |normal| with sd ~16 under uniform routing), and that block streams the expert's
whole weight tile again for them: it costs ~0.6 of a main block (bench/results/expert_ffn_notes.md, run 189). With
TAIL_N the expert's last main block carries its tail when the tail has at most TN real rows: each k-step adds

    out^T [NB, TN] += W [NB, BK] . T^T        (W: the B tile already in shared memory, as wgmma's A, M = 64 a piece;
                                               T: the tail's first TN aligned rows, as wgmma's N)

so the tail costs MMAs on TN rows and no second pass over the weights, and its own block exits at once (which blocks
carry: kernels/moe_blocks' merged_tails flags, set where the tables are made). Warpgroup h
takes the B tile's rows 64h.. (piece 0) and, for NB = 256, 128 + 64h.. (piece 1): with SwiGLU the gate and up rows
of the same 64 output columns, else two column slices. Tails need their real rows first in the segment (the
alignments put padding last) and at most TN of them: the TN-th aligned row of the tail must be padding.
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    @gluon.jit
    def carry_loop(a_s, b, t, ready, free, k_steps, acc, t0, t1, R0: gl.constexpr, R1: gl.constexpr):
        """The consumer's mainloop with the carried tail: acc [BH, NB] += A . B^T and t0 / t1 [BH, TN] += B[R0 / R1
        .. + 64] . T^T (R1 < 0: one piece); one k-step's MMAs in flight, the stage before released."""
        S: gl.constexpr = a_s.type.shape[0]
        for kk in range(k_steps):
            s = kk % S
            mbarrier.wait(ready.index(s), (kk // S) & 1)
            bs = b.index(s)
            tt = t.index(s).permute((1, 0))
            acc = warpgroup_mma(a_s.index(s), bs.permute((1, 0)), acc, is_async=True)
            t0 = warpgroup_mma(bs.slice(R0, 64), tt, t0, is_async=True)
            if R1 >= 0:
                t1 = warpgroup_mma(bs.slice(R1, 64), tt, t1, is_async=True)
                acc, t0, t1 = warpgroup_mma_wait(num_outstanding=3, deps=(acc, t0, t1))
            else:
                acc, t0 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, t0))
            mbarrier.arrive(free.index((kk + S - 1) % S), count=1, pred=kk > 0)
        acc, t0, t1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, t0, t1))
        mbarrier.arrive(free.index((k_steps + S - 1) % S), count=1)
        return acc, t0, t1

    @gluon.jit
    def _store_t(y, c_ptr, rows, ok, col0, N):
        """y [BH, TN] float32: output columns col0.. down, tail rows across (row offsets `rows`, live `ok`)."""
        cols = col0 + gl.arange(0, y.type.shape[0], layout=gl.SliceLayout(1, y.type.layout))
        ptrs = c_ptr + gl.expand_dims(rows, 0) + gl.expand_dims(cols, 1)
        gl.store(ptrs, y.to(c_ptr.dtype.element_ty), mask=gl.expand_dims(ok, 0) & gl.expand_dims(cols < N, 1))

    @gluon.jit
    def store_carried(t0, t1, c_ptr, w_ptr, ids_ptr, trow0, col0, num_rows, N, stride_cm, SWIGLU: gl.constexpr,
                      MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr, R1: gl.constexpr):
        """The carried tail's epilogue, as store_tile's (SwiGLU, top-k weight in float32, one rounding) on the
        transposed tile: piece 0 at columns col0.., piece 1 (R1 >= 0, no SwiGLU) at col0 + 128..; padding rows are
        never stored. The stores are 2-byte pieces: TN rows, a small part of the program's output."""
        L: gl.constexpr = t0.type.layout
        j = gl.arange(0, t0.type.shape[1], layout=gl.SliceLayout(0, L))
        ids = gl.load(ids_ptr + trow0 + j)
        ok = ids < num_rows
        if SCATTER_C:
            rows = ids.to(gl.int64) * stride_cm
        else:
            rows = (trow0 + j).to(gl.int64) * stride_cm
        if MUL_WEIGHT:
            wt = gl.expand_dims(gl.load(w_ptr + ids, mask=ok, other=0.0), 0)
        if SWIGLU:
            y = t0 / (1.0 + gl.exp(-t0)) * t1
            if MUL_WEIGHT:
                y = y * wt
            _store_t(y, c_ptr, rows, ok, col0, N)
        else:
            y = t0
            if MUL_WEIGHT:
                y = y * wt
            _store_t(y, c_ptr, rows, ok, col0, N)
            if R1 >= 0:
                y1 = t1
                if MUL_WEIGHT:
                    y1 = y1 * wt
                _store_t(y1, c_ptr, rows, ok, col0 + 128, N)
