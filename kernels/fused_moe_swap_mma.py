"""The consumer partitions of the swap-AB expert GEMM (kernels/fused_moe_swap.py): out^T [64 weight rows, n tokens]
+= W_h . T^T per warpgroup, then the transposed epilogue.

Dimension legend: 64 weight rows a warpgroup (wgmma's M; half h of the program's BW = 128), BT = 256 tokens of the
main ring, Q = 16 tokens, V = the block's rows / 16 (1..18), FULL_FROM = the V from which a block runs one n256
wgmma, NP the pieces a block runs, S ring stages.

Tensor shapes are powers of two, so a block's tokens are pieces, one accumulator and one wgmma each: one n256 when
V >= FULL_FROM (tokens past the block are computed and never stored), else 128 / 64 / 32 / 16 (and 16 more at
V = 16); V = 17 / 18 add an n16 / n32 piece from the extra ring (rows 256..287). The consumers unroll one copy per V
(warpgroup_mma_wait takes a constant).
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    @gluon.jit
    def _store_piece(acc, c_ptr, ids_ptr, w_ptr, t_row0, OFF: gl.constexpr, n_rows, num_rows, col0, stride_cm,
                     SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr):
        """acc [64 weight rows, NP tokens] -> out[row, col0 + c] as 16-byte row pieces for the block's rows OFF..
        (row = t_row0 + OFF + i; SCATTER_C: the row's pair id, padding rows not stored; MUL_WEIGHT: times its top-k
        weight, in float32 first). SwiGLU: acc's rows 16m + r / 16m + 8 + r are the gate / up of column 8m + r (the
        loader's interleave; one thread holds both), 32 columns out. Rows past the block are not stored."""
        NP: gl.constexpr = acc.type.shape[1]
        j = OFF + gl.arange(0, NP, layout=gl.SliceLayout(0, acc.type.layout))
        if MUL_WEIGHT:   # never with SwiGLU (`unsupported`)
            pid_j = gl.load(ids_ptr + t_row0 + j, mask=j < n_rows, other=num_rows)
            wt = gl.load(w_ptr + pid_j, mask=pid_j < num_rows, other=0.0)
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
        live = rows < n_rows
        if SCATTER_C:
            dst = gl.load(ids_ptr + t_row0 + rows, mask=live, other=num_rows)
            live = dst < num_rows
        else:
            dst = t_row0 + rows
        ptrs = c_ptr + gl.expand_dims(dst.to(gl.int64) * stride_cm, 1) + gl.expand_dims(cols, 0)
        gl.store(ptrs, yt, mask=gl.expand_dims(live, 1))

    @gluon.jit
    def _consume_v(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, col0, k_steps,
                   stride_cm, H: gl.constexpr, V: gl.constexpr, FULL_FROM: gl.constexpr, SWIGLU: gl.constexpr,
                   MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr):
        S: gl.constexpr = wb.type.shape[0]
        PF: gl.constexpr = V >= FULL_FROM   # one n256 piece (FULL_FROM <= 16)
        R: gl.constexpr = 0 if PF else (V - 1 if V == 16 else V)   # else 128 + 64 + 32 + 16 (+ 16 at V = 16)
        PX: gl.constexpr = V > 16                                  # V = 17 / 18: 256 + 16 / 32
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
        NP: gl.constexpr = (1 if P8 else 0) + (1 if P4 else 0) + (1 if P2 else 0) + (1 if P1 else 0) \
            + (1 if PE else 0) + (1 if PF else 0) + (1 if PX else 0)
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
            _store_piece(af, c_ptr, ids_ptr, w_ptr, t_row0, 0, n_rows, num_rows, c0, stride_cm, SWIGLU, MUL_WEIGHT,
                         SCATTER_C)
        if PX:
            _store_piece(ax, c_ptr, ids_ptr, w_ptr, t_row0, 256, n_rows, num_rows, c0, stride_cm, SWIGLU,
                         MUL_WEIGHT, SCATTER_C)
        if P8:
            _store_piece(a8, c_ptr, ids_ptr, w_ptr, t_row0, 0, n_rows, num_rows, c0, stride_cm, SWIGLU, MUL_WEIGHT,
                         SCATTER_C)
        if P4:
            _store_piece(a4, c_ptr, ids_ptr, w_ptr, t_row0, O4, n_rows, num_rows, c0, stride_cm, SWIGLU,
                         MUL_WEIGHT, SCATTER_C)
        if P2:
            _store_piece(a2, c_ptr, ids_ptr, w_ptr, t_row0, O2, n_rows, num_rows, c0, stride_cm, SWIGLU,
                         MUL_WEIGHT, SCATTER_C)
        if P1:
            _store_piece(a1, c_ptr, ids_ptr, w_ptr, t_row0, O1, n_rows, num_rows, c0, stride_cm, SWIGLU,
                         MUL_WEIGHT, SCATTER_C)
        if PE:
            _store_piece(ae, c_ptr, ids_ptr, w_ptr, t_row0, OE, n_rows, num_rows, c0, stride_cm, SWIGLU,
                         MUL_WEIGHT, SCATTER_C)

    @gluon.jit
    def consume_partition(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, nq, col0,
                          k_steps, stride_cm, H: gl.constexpr, FULL_FROM: gl.constexpr, NV: gl.constexpr,
                          SWIGLU: gl.constexpr, MUL_WEIGHT: gl.constexpr, SCATTER_C: gl.constexpr):
        """Warpgroup H's 64 weight rows of the program against the block's nq * 16 tokens."""
        for v in gl.static_range(1, NV + 1):
            if nq == v:
                _consume_v(wb, tb, tx, ready, free, c_ptr, ids_ptr, w_ptr, t_row0, n_rows, num_rows, col0, k_steps,
                           stride_cm, H, v, FULL_FROM, SWIGLU, MUL_WEIGHT, SCATTER_C)
