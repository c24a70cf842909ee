"""MLA decode stage 1 for Hopper in Gluon, warp-specialised: one warpgroup scores, both accumulate.

Dimension legend: BH = 64 heads per program, BN = 64 cache rows per tile, C = 512 latent (value) dims, CH = C / 2,
Dr rope dims. Same inputs, outputs and limits as kernels/mla_decode_wgmma.py (whose `unsupported` and
`descriptors` this uses); the difference is who does what:

    load     (1 warp)    TMA of each cache tile into a two-stage ring (k_ready / k_free mbarriers)
    score    (default,   scores [64, 64] = q . k^T over all 576 dims (the tile's keys in one wgmma N), the online
              4 warps)   softmax inside the warpgroup (no cross-warpgroup reduction), p -> shared memory for the
                         other warpgroup, then acc_lo [64, CH] += p . v_lo with p from registers
    value    (4 warps)   acc_hi [64, CH] += p . v_hi with p from shared memory, rescaled by the tile's alpha

While the value warpgroup runs tile i's p . v_hi, the score warpgroup already scores tile i + 1: the softmax no
longer leaves the tensor cores idle. One p buffer: the score warpgroup writes tile i + 1's p after the value
warpgroup has released tile i's (p_free). The ragged last tile also comes by TMA (its rows lie inside the
sequence's page or capacity); the score warpgroup zeroes its value rows past the context before any p . v reads
them, and masks their scores.
"""

from __future__ import annotations

import torch
import triton
from nanomoe_kernels.mla_decode_tuning import triton_at_least
from nanomoe_kernels.mla_decode_wgmma import BH, descriptors, gluon

if gluon is not None:
    from nanomoe_kernels.mla_decode_wgmma import GluonDescriptor, _cta_barrier, _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # TMA store from shared memory: async_store from Triton 3.7, the old name in 3.6
    _tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global

    @gluon.jit
    def _store_half(acc, inv, ring, po_desc, prow, pcol, o_ptr, o_off, stride_on, c0: gl.constexpr):
        """One warpgroup's [BH, CH] partial half (acc * inv): through the drained tile ring (ring [2, BN, CH],
        the same bytes as [BH, CH] float32) and one TMA store of po_desc's block at (prow, pcol + c0), or by plain
        stores at o_ptr + o_off (+ column c0) when po_desc is no TMA descriptor (then a pointer, unused)."""
        out = acc * inv
        if hasattr(po_desc, "block_type"):   # decided while compiling: the kernel specialises on po_desc's type
            if hasattr(ring, "reinterpret"):   # Triton >= 3.7; 3.6 names it _reinterpret
                buf = ring.reinterpret(po_desc.dtype, po_desc.block_type.shape, po_desc.layout)
            else:
                buf = ring._reinterpret(po_desc.dtype, po_desc.block_type.shape, po_desc.layout)
            buf.store(out.to(po_desc.dtype))
            fence_async_shared()
            _cta_barrier()          # the warpgroup's rows are all in shared memory before one thread sends them
            _tma_store(po_desc, [prow, pcol + c0], buf)
            tma.store_wait(0)
        else:
            layout: gl.constexpr = out.type.layout
            offs_h = gl.arange(0, out.shape[0], layout=gl.SliceLayout(1, layout))
            offs_c = c0 + gl.arange(0, out.shape[1], layout=gl.SliceLayout(0, layout))
            gl.store(o_ptr + o_off + gl.expand_dims(offs_h, 1) * stride_on + gl.expand_dims(offs_c, 0),
                     out.to(o_ptr.dtype.element_ty))
    from triton.language.extra.cuda import gdc_launch_dependents

    @gluon.jit
    def _stamp(tr, slot):
        """(%globaltimer ns, %clock64 cycles) into tr[2 * slot], tr[2 * slot + 1] when tr points to int64 (a trace,
        mla_trace_probe.py); nothing for the float32 stand-in. Decided while compiling, by the pointer's type: a
        constexpr flag passed on to the partitions is not seen as one by every Triton release."""
        if tr.dtype.element_ty == gl.int64:
            ns, clk = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;\n\tmov.u64 $1, %clock64;", "=l,=l", [],
                                                dtype=(gl.int64, gl.int64), is_pure=False, pack=1)
            gl.store(tr + 2 * slot, ns)
            gl.store(tr + 2 * slot + 1, clk)

    @gluon.jit
    def _load_partition(kl_desc, kp_desc, k0, k1, kp, k_ready, k_free, bt_ptr, seq, start, n_tiles, stride_bt,
                        max_len, PAGE: gl.constexpr, PAGED: gl.constexpr, tr, q_ready, order):
        CH: gl.constexpr = kl_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = kl_desc.block_type.shape[0]
        if (order & 2) != 0:    # tile 0 after Q: Q's bytes do not share the SM's first load burst
            mbarrier.wait(q_ready, 0)
        for i in range(n_tiles):
            st = i % 2
            mbarrier.wait(k_free.index(st), ((i // 2) & 1) ^ 1)      # fresh barriers pass phase 1
            if i == 1 and (order & 1) != 0:   # tile 1 after tile 0 has landed: every program's first tile comes
                mbarrier.wait(k_ready.index(0), 0)  # from HBM ahead of the second ones
            n0 = start + i * BLOCK_N
            if PAGED:   # BN divides the page: the tile lies in one page
                row0 = gl.load(bt_ptr + seq.to(gl.int64) * stride_bt + n0 // PAGE) * PAGE + n0 % PAGE
            else:
                row0 = seq * max_len + n0
            bar = k_ready.index(st)
            mbarrier.expect(bar, 2 * kl_desc.block_type.nbytes + kp_desc.block_type.nbytes)
            _tma_load(kl_desc, [row0, 0], bar, k0.index(st))
            _tma_load(kl_desc, [row0, CH], bar, k1.index(st))
            _tma_load(kp_desc, [row0, 0], bar, kp.index(st))
        _stamp(tr, 29)

    @gluon.jit
    def _value_partition(kl_desc, kp_desc, k0, k1, kp, k_ready, k_free, bt_ptr, seq, start, n_tiles, stride_bt,
                         max_len, PAGE: gl.constexpr, PAGED: gl.constexpr, tr, p_smem,
                         alpha_smem, l_smem, p_ready, p_free, done, o_ptr, o_off, stride_on, po_desc, prow, pcol):
        CH: gl.constexpr = kl_desc.block_type.shape[1]
        BLOCK_H: gl.constexpr = p_smem.type.shape[0]
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, CH, 16])
        ROWS: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        acc = gl.zeros([BLOCK_H, CH], gl.float32, O_LAYOUT)
        for i in range(n_tiles):
            mbarrier.wait(p_ready, i & 1)
            acc = acc * gl.expand_dims(alpha_smem.load(ROWS), 1)
            acc = warpgroup_mma(p_smem, k1.index(i % 2), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(p_free, count=1)
            mbarrier.arrive(k_free.index(i % 2), count=1)
        _stamp(tr, 27)
        mbarrier.wait(done, 0)
        l_i = l_smem.load(ROWS)
        inv = gl.expand_dims(1.0 / gl.where(l_i > 0, l_i, 1.0), 1)
        # k1 is drained: the score warpgroup's last q . k^T read it before p_ready, this warpgroup's last p . v is done
        _store_half(acc, inv, k1, po_desc, prow, pcol, o_ptr, o_off, stride_on, CH)
        _stamp(tr, 28)

    @gluon.jit
    def _zero_rows(buf, n0, end, num_warps: gl.constexpr):
        """Rows n0 + r >= end of a [BN, W] shared tile set to 0 (their cache rows are past the context)."""
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        x = buf.load(ld)
        offs_n = n0 + gl.arange(0, buf.type.shape[0], layout=gl.SliceLayout(1, ld))
        buf.store(gl.where(gl.expand_dims(offs_n < end, 1), x, 0.0))

    @gluon.jit
    def _score_partition(q0, q1, qp, q_ready, k0, k1, kp, k_ready, k_free, p_smem, alpha_smem, l_smem, p_ready,
                         p_free, done, start, end, n_tiles, scale_log2, o_ptr, o_off, stride_on, lse_ptr, l_off,
                         stride_ln, tr, po_desc, prow, pcol, FINAL: gl.constexpr,
                         num_warps: gl.constexpr):
        BLOCK_H: gl.constexpr = p_smem.type.shape[0]
        BLOCK_N: gl.constexpr = p_smem.type.shape[1]
        CH: gl.constexpr = k0.type.shape[2]
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, CH, 16])
        P_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
        m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, gl.SliceLayout(1, S_LAYOUT))
        l_i = gl.full([BLOCK_H], 0.0, gl.float32, gl.SliceLayout(1, S_LAYOUT))
        acc = gl.zeros([BLOCK_H, CH], gl.float32, O_LAYOUT)
        mbarrier.wait(q_ready, 0)
        _stamp(tr, 1)
        for i in range(n_tiles):
            st = i % 2
            n0 = start + i * BLOCK_N
            mbarrier.wait(k_ready.index(st), (i // 2) & 1)
            if i < 8:
                _stamp(tr, 2 + i)
            ragged = n0 + BLOCK_N > end
            if ragged:     # the last tile: rows past the context hold whatever the cache holds (even NaN)
                _zero_rows(k0.index(st), n0, end, num_warps)
                _zero_rows(k1.index(st), n0, end, num_warps)
                fence_async_shared()
            s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
            s = warpgroup_mma(q0, k0.index(st).permute((1, 0)), s, use_acc=False, is_async=True)
            s = warpgroup_mma(q1, k1.index(st).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma(qp, kp.index(st).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, )) * scale_log2
            if i < 8:
                _stamp(tr, 10 + i)
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
            s = gl.where(gl.expand_dims(offs_n < end, 0), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p16 = p.to(p_smem.dtype)
            mbarrier.wait(p_free, (i & 1) ^ 1)        # the value warpgroup is done with the previous p
            p_smem.store(p16)
            alpha_smem.store(alpha)
            fence_async_shared()
            mbarrier.arrive(p_ready, count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, O_LAYOUT)), 1)
            acc = warpgroup_mma(gl.convert_layout(p16, P_OPERAND), k0.index(st), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(k_free.index(st), count=1)
            if i < 8:
                _stamp(tr, 18 + i)
        l_smem.store(l_i)
        mbarrier.arrive(done, count=1)
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_LAYOUT))
        inv = gl.expand_dims(1.0 / gl.where(l_o > 0, l_o, 1.0), 1)
        # k0 is drained: this warpgroup's own last p . v read it and is done; the value warpgroup never reads it
        _store_half(acc, inv, k0, po_desc, prow, pcol, o_ptr, o_off, stride_on, 0)
        if not FINAL:
            lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            offs_hs = gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, S_LAYOUT))
            gl.store(lse_ptr + l_off + offs_hs * stride_ln, lse)
        _stamp(tr, 26)

    @gluon.jit(do_not_specialize=["order"])
    def _mla_decode_partial_ws(
        ql_desc, qp_desc, kl_desc, kp_desc, bt_ptr, len_ptr, o_ptr, lse_ptr,
        stride_bt, stride_or, stride_on, stride_ok, stride_lr, stride_ln,
        S, N, SPLITS, max_len, scale_log2, trace_ptr, po_desc, order,
        PAGE: gl.constexpr, PAGED: gl.constexpr, FINAL: gl.constexpr, num_warps: gl.constexpr,
        TRIGGER: gl.constexpr = False,
    ):
        BLOCK_H: gl.constexpr = ql_desc.block_type.shape[0]
        CH: gl.constexpr = ql_desc.block_type.shape[1]
        DR: gl.constexpr = qp_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = kl_desc.block_type.shape[0]
        dtype: gl.constexpr = ql_desc.dtype
        if TRIGGER:   # the reduction (launched with PDL) may be placed now; it waits for this grid's end itself
            gdc_launch_dependents()
        hblk = gl.program_id(0)
        row = gl.program_id(1)
        split = gl.program_id(2)
        # a trace (trace_ptr int64): 32 (time, clock) pairs a program, programs in launch order (split-major)
        tr = trace_ptr + ((split * gl.num_programs(1) + row) * gl.num_programs(0) + hblk).to(gl.int64) * 64
        _stamp(tr, 0)
        if trace_ptr.dtype.element_ty == gl.int64:
            gl.store(tr + 60, gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32,
                                                        is_pure=False, pack=1).to(gl.int64))
        seq = row // S
        ctx = gl.minimum(gl.load(len_ptr + row), max_len)
        chunk = ((ctx + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = split * chunk
        end = gl.minimum(start + chunk, ctx)
        n_tiles = (gl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N

        q0 = gl.allocate_shared_memory(dtype, [BLOCK_H, CH], ql_desc.layout)
        q1 = gl.allocate_shared_memory(dtype, [BLOCK_H, CH], ql_desc.layout)
        qp = gl.allocate_shared_memory(dtype, [BLOCK_H, DR], qp_desc.layout)
        k0 = gl.allocate_shared_memory(dtype, [2, BLOCK_N, CH], kl_desc.layout)
        k1 = gl.allocate_shared_memory(dtype, [2, BLOCK_N, CH], kl_desc.layout)
        kp = gl.allocate_shared_memory(dtype, [2, BLOCK_N, DR], kp_desc.layout)
        p_smem = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dtype))
        vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        alpha_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        l_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_H], vec)
        k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_free.index(i), count=2)      # the score and the value warpgroups
        for i in gl.static_range(4):
            mbarrier.init(bars.index(i), count=1)
        q_ready, p_ready, p_free, done = bars.index(0), bars.index(1), bars.index(2), bars.index(3)

        qrow = row * N + hblk * BLOCK_H
        mbarrier.expect(q_ready, 2 * ql_desc.block_type.nbytes + qp_desc.block_type.nbytes)
        _tma_load(ql_desc, [qrow, 0], q_ready, q0)
        _tma_load(ql_desc, [qrow, CH], q_ready, q1)
        _tma_load(qp_desc, [qrow, 0], q_ready, qp)

        o_off = row.to(gl.int64) * stride_or + (hblk * BLOCK_H).to(gl.int64) * stride_on + split * stride_ok
        l_off = row.to(gl.int64) * stride_lr + (hblk * BLOCK_H).to(gl.int64) * stride_ln + split
        prow = row * N + hblk * BLOCK_H       # the block's first row and column in po_desc's [R * N, K * C]
        pcol = split * 2 * CH
        worker = (kl_desc, kp_desc, k0, k1, kp, k_ready, k_free, bt_ptr, seq, start, n_tiles, stride_bt, max_len,
                  PAGE, PAGED, tr)
        gl.warp_specialize([
            (_score_partition, (q0, q1, qp, q_ready, k0, k1, kp, k_ready, k_free, p_smem, alpha_smem, l_smem,
                                p_ready, p_free, done, start, end, n_tiles, scale_log2, o_ptr, o_off, stride_on,
                                lse_ptr, l_off, stride_ln, tr, po_desc, prow, pcol, FINAL, num_warps)),
            (_load_partition, worker + (q_ready, order)),
            (_value_partition, worker + (p_smem, alpha_smem, l_smem, p_ready, p_free, done, o_ptr, o_off,
                                         stride_on, po_desc, prow, pcol)),
        ], [1, 4], [24, 232])


def supported_triton() -> bool:
    """Gluon's list-form warp_specialize (Triton >= 3.6; 3.5 took the partitions as separate arguments)."""
    return gluon is not None and triton_at_least(3, 6)


def launch_partial(q: torch.Tensor, kv: torch.Tensor, bt: torch.Tensor, ctx_lens: torch.Tensor,
                   o_part: torch.Tensor, lse: torch.Tensor, c: int, rows_per_seq: int, splits: int, max_len: int,
                   scale_log2: float, paged: bool, trigger: bool = False, trace: torch.Tensor | None = None,
                   store_tma: bool = False, order: int = 0) -> None:
    """Stage 1 over grid (N / 64, R, K), as kernels/mla_decode_wgmma.launch_partial (same outputs); trigger: let
    a reduction launched with PDL in as the programs start. trace: int64 [programs, 64], filled with each
    program's event times (a profiling aid, bench/gpu/mla_trace_probe.py says which slot is which). store_tma:
    the partials (contiguous o_part [R, N, K, C], splits > 1) leave through shared memory and TMA stores. order:
    how the load warp orders a program's first loads, bits (DecodeTuning.first_tile_alone / q_first): 1, tile 1
    only once tile 0 has landed; 2, tile 0 only once Q has (0: Q and both ring slots at once)."""
    q = q if q.is_contiguous() else q.contiguous()
    heads = q.shape[1]
    store_tma = store_tma and splits > 1
    po_desc = lse   # a pointer: the plain stores (the kernel compiles the TMA path for a descriptor only)
    if store_tma:
        if not o_part.is_contiguous() or o_part.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"store_tma needs o_part contiguous float32/bfloat16/float16, got {o_part.dtype} with "
                             f"strides {o_part.stride()}")
        flat = o_part.view(o_part.shape[0] * o_part.shape[1], -1)   # [R * N, K * C]
        el = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[o_part.dtype]
        po_desc = GluonDescriptor(flat, list(flat.shape), [flat.stride(0), 1], [BH, c // 2],
                                  gl.NVMMASharedLayout.get_default_for([BH, c // 2], el))
    _mla_decode_partial_ws[(triton.cdiv(heads, BH), q.shape[0], splits)](
        *descriptors(q, kv, c), bt, ctx_lens, o_part, lse,
        bt.stride(0), o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        rows_per_seq, heads, splits, max_len, scale_log2, lse if trace is None else trace, po_desc, order,
        PAGE=kv.shape[1] if paged else 1, PAGED=paged, FINAL=splits == 1, num_warps=4, maxnreg=168,
        **({"TRIGGER": True} if trigger else {}),
    )
