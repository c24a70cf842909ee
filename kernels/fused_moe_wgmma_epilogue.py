"""The wgmma expert GEMM's epilogue (kernels/fused_moe_wgmma.py): one consumer warpgroup's [BH, ON] output tile.

Dimension legend: BH = 64 rows per consumer warpgroup, ON output columns of the tile (BN, or BN / 2 after SwiGLU),
CN staging columns (min(ON, 128)), N the GEMM's output columns.

Two ways out, the same values (rows scaled by their top-k weight in float32, then rounded once):
    direct   stores from the accumulator's wgmma layout: each thread writes 4-byte pieces and a warp covers 8 rows
             x 16 bytes per instruction, so a 512-byte output row takes 32 store instructions from 8 warps' worth
             of lanes
    staged   (STAGE_C) the tile goes through shared memory CN columns at a time: written in the accumulator's
             layout, read back as 16-byte row pieces (a warp covers 2-4 rows x 128-256 contiguous bytes) and stored
             with one 16-byte store per piece; rows may be scattered (pair ids) since each row stays contiguous
On a dense probe of the same tile program the direct stores cost 5-15% of the GEMM and staging took back 60-75% of
it (bench/results/expert_ffn_notes.md, runs 235-236).
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl

    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier   # renamed after Triton 3.6

    @gluon.jit
    def _c_rows(ids_ptr, row0, num_rows, stride_cm, ROWS: gl.constexpr, layout: gl.constexpr,
                SCATTER_C: gl.constexpr):
        """Each of ROWS aligned rows' output offset (the row id with SCATTER_C, else the aligned row), and whether
        it is a real row (padding rows carry sentinel ids and are never stored)."""
        offs_m = row0 + gl.arange(0, ROWS, layout=layout)
        ids = gl.load(ids_ptr + offs_m)
        if SCATTER_C:
            rows = ids.to(gl.int64) * stride_cm
        else:
            rows = offs_m.to(gl.int64) * stride_cm
        return rows, ids, ids < num_rows

    @gluon.jit
    def _store_piece(cs, part, c_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SCATTER_C: gl.constexpr):
        """One [BH, CN] piece through the warpgroup's shared buffer cs, out as 16-byte row pieces."""
        ROWS: gl.constexpr = cs.type.shape[0]
        CN: gl.constexpr = cs.type.shape[1]
        TN: gl.constexpr = CN // 8                 # lanes across a row: 8 elements (16 bytes) each
        OUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TN, TN], [4, 1], [1, 0])
        cs.store(part)
        _cta_barrier()
        v = cs.load(OUT)
        rows, ids, ok = _c_rows(ids_ptr, row0, num_rows, stride_cm, ROWS, gl.SliceLayout(1, OUT), SCATTER_C)
        cols = gl.expand_dims(col0 + gl.arange(0, CN, layout=gl.SliceLayout(0, OUT)), 0)
        gl.store(c_ptr + gl.expand_dims(rows, 1) + cols, v, mask=gl.expand_dims(ok, 1) & (cols < N))
        _cta_barrier()   # every lane has read the piece before the next one goes in

    @gluon.jit
    def store_tile(y, cs, c_ptr, w_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, MUL_WEIGHT: gl.constexpr,
                   SCATTER_C: gl.constexpr, STAGE_C: gl.constexpr):
        """Store y [BH, ON] float32 (any distributed layout) at rows row0.. and columns col0..; cs [BH, CN]: this
        warpgroup's staging buffer (used with STAGE_C only)."""
        ROWS: gl.constexpr = y.type.shape[0]
        ON: gl.constexpr = y.type.shape[1]
        Y: gl.constexpr = y.type.layout
        rows, ids, ok = _c_rows(ids_ptr, row0, num_rows, stride_cm, ROWS, gl.SliceLayout(1, Y), SCATTER_C)
        if MUL_WEIGHT:
            y = y * gl.expand_dims(gl.load(w_ptr + ids, mask=ok, other=0.0), 1)
        yc = y.to(c_ptr.dtype.element_ty)
        if STAGE_C:
            CN: gl.constexpr = cs.type.shape[1]
            if CN == ON:
                _store_piece(cs, yc, c_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SCATTER_C)
            else:   # ON = 2 CN: the two column halves (a register split) in turn
                lo, hi = yc.reshape([ROWS, 2, CN]).permute((0, 2, 1)).split()
                _store_piece(cs, lo, c_ptr, ids_ptr, row0, col0, num_rows, N, stride_cm, SCATTER_C)
                _store_piece(cs, hi, c_ptr, ids_ptr, row0, col0 + CN, num_rows, N, stride_cm, SCATTER_C)
        else:
            cols = gl.expand_dims(col0 + gl.arange(0, ON, layout=gl.SliceLayout(0, Y)), 0)
            gl.store(c_ptr + gl.expand_dims(rows, 1) + cols, yc, mask=gl.expand_dims(ok, 1) & (cols < N))
