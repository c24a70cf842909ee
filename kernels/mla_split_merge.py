"""The split reduction of MLA decode done inside stage 1's grid (DecodeTuning.merge_in_grid), without a second kernel.

Dimension legend: R query rows, N heads, K splits of the context, C latent (value) dims, KB = K rounded up to a power
of two, U = R * N units of work (one (row, head): its K partials [K, C] merged into out [C]).

Why: at one query row the split reduction is a second launch (~1.2 us more of a CUDA-graph replay) and its own
~3 us, while the partials it reads are still in the L2. Here each stage-1 program, once its partials are stored,
adds itself to a count and then merges its own units (pid, pid + programs, ...):

    count   the program that brings the count to every program opens a gate (bumps a generation word), then
            resets the count for the next launch
    wait    the others wait for the gate, but for at most `spin` reads of the generation
    give up a program whose wait ran out adds itself to the count's upper half instead (a compare-and-swap that
            lands only while the gate is shut) and leaves; the last program to come finds the upper half non-zero
            and merges every unit (the others still merge theirs: a unit merged twice is written twice, same bits)

No program waits without bound, so nothing depends on all programs being resident at once (no cooperative launch,
no hang when other work or an SM limit keeps programs out). The counters belong to one launch at a time: `counters`
gives one set per (device, stream), zeroed once; every launch leaves the count at zero.
"""

from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # no Gluon: kernels/mla_decode_wgmma.unsupported already says so, nothing here runs
    gluon = None


# reads of the done count a program makes before it leaves the merge to the others (~0.5 us each: past any
# straggler of one wave, short beside a program kept waiting for an SM)
MERGE_SPIN = 256


def counters(device: torch.device) -> torch.Tensor:
    """The int32 counters of the in-grid merge for launches on this device's current stream, zeroed once and left
    zeroed by every launch. One set per stream (two launches in flight at once on two streams must not share them),
    all in one buffer made at the device's first merge, so a stream first seen while a CUDA graph is captured adds
    nothing to the graph. Past SLOTS streams, sets are shared again (round robin)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    slab, slots = _slab(index)
    return slab[slots.setdefault(torch.cuda.current_stream(index).stream_id, len(slots) % SLOTS)]


SLOTS = 64
GEN = 32   # the gate's generation, 128 bytes past the count: polls and the count's atomics on different lines


@functools.cache
def _slab(index: int) -> tuple[torch.Tensor, dict]:
    return torch.zeros(SLOTS, 2 * GEN, dtype=torch.int32, device=torch.device("cuda", index)), {}


def merge_args(out: torch.Tensor, o_part: torch.Tensor, splits: int, c: int) -> dict:
    """The stage-1 kernel's merge arguments (kernels/mla_decode_wgmma_ws.py) for out [R, N, C] and the contiguous
    partials o_part [R, N, K, C]; ValueError where this merge cannot read them."""
    if not o_part.is_contiguous() or c & (c - 1) or c < 128:
        raise ValueError(f"merge_in_grid needs contiguous partials and C a power of two >= 128, got C {c}, o_part "
                         f"strides {o_part.stride()}")
    kb = max(8, 1 << (splits - 1).bit_length())
    return dict(out_ptr=out, ctr_ptr=counters(out.device), stride_mr=out.stride(0), stride_mn=out.stride(1),
                spin=MERGE_SPIN, MERGE_KB=kb, MERGE_KC=min(kb, 64))


if gluon is not None:
    _GEN = gl.constexpr(GEN)   # the JIT reads constexpr globals only

    @gluon.jit
    def stamp(tr, slot):
        """(%globaltimer ns, %clock64 cycles) into tr[2 * slot], tr[2 * slot + 1] when tr points to int64 (a trace,
        mla_trace_probe.py); nothing for the float32 stand-in. Decided while compiling, by the pointer's type: a
        constexpr flag passed on to the partitions is not seen as one by every Triton release."""
        if tr.dtype.element_ty == gl.int64:
            ns, clk = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;\n\tmov.u64 $1, %clock64;", "=l,=l", [],
                                                dtype=(gl.int64, gl.int64), is_pure=False, pack=1)
            gl.store(tr + 2 * slot, ns)
            gl.store(tr + 2 * slot + 1, clk)

    @gluon.jit
    def bulk_writes_done():
        """This thread's TMA stores written to global memory, not only read out of shared memory (store_wait waits
        for .read only), and ordered before its later generic accesses: the merge reads them in the same launch."""
        gl.inline_asm_elementwise("cp.async.bulk.wait_group 0;\n\tfence.proxy.async.global;\n\tmov.u32 $0, 0;",
                                  "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _merge_unit(o_ptr, lse_ptr, out_ptr, u, N, K, stride_or, stride_on, C: gl.constexpr, KB: gl.constexpr,
                    KC: gl.constexpr, num_warps: gl.constexpr):
        """out[r, h, :] = sum_k 2^(lse_k - m) o_k / sum_k 2^(lse_k - m) for unit u = r * N + h; o_ptr holds
        contiguous [R, N, K, C] partials, lse_ptr [R, N, K] base-2 lse (-inf for an empty split); KC splits a
        load ([KC, C]: KC * C / (32 * num_warps) values a thread)."""
        # splits along 8 lanes: the merge stays inside each warp (no shared memory: stage 1 holds all of it)
        lay: gl.constexpr = gl.BlockedLayout([KC // 8, 8], [8, 4], [1, num_warps], [1, 0])
        lse_lay: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([KB // 8, 1], [8, 4], [1, num_warps], [1, 0]))
        offs_k = gl.arange(0, KC, layout=gl.SliceLayout(1, lay))
        offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, lay))
        offs_kb = gl.arange(0, KB, layout=lse_lay)
        lse_row = lse_ptr + u.to(gl.int64) * K
        part = o_ptr + u.to(gl.int64) * K * C + gl.expand_dims(offs_k, 1) * C + gl.expand_dims(offs_c, 0)
        # the first chunk's partials before the lse max needs them: with K <= KC every read of the unit goes out
        # in one round trip. .cg: read at the L2, where the other programs wrote (never a stale L1 line)
        live = offs_k < K
        o = gl.load(part, mask=gl.expand_dims(live, 1), other=0.0, cache_modifier=".cg")
        lse = gl.load(lse_row + offs_k, mask=live, other=float("-inf"), cache_modifier=".cg")
        m = gl.max(gl.load(lse_row + offs_kb, mask=offs_kb < K, other=float("-inf"), cache_modifier=".cg"), axis=0)
        m = gl.where(m == float("-inf"), 0.0, m)          # all splits empty: every weight is 0
        w = gl.exp2(lse - m)
        denom = w
        acc = gl.sum(gl.expand_dims(w, 1) * o.to(gl.float32), axis=0)
        for k0 in range(KC, K, KC):
            live = (k0 + offs_k) < K
            o = gl.load(part + k0 * C, mask=gl.expand_dims(live, 1), other=0.0, cache_modifier=".cg")
            w = gl.exp2(gl.load(lse_row + k0 + offs_k, mask=live, other=float("-inf"), cache_modifier=".cg") - m)
            denom += w
            acc += gl.sum(gl.expand_dims(w, 1) * o.to(gl.float32), axis=0)
        row = u // N
        out = acc / gl.maximum(gl.sum(denom, axis=0), 1e-30)
        gl.store(out_ptr + row.to(gl.int64) * stride_or + (u - row * N).to(gl.int64) * stride_on + offs_c,
                 out.to(out_ptr.dtype.element_ty))

    @gluon.jit
    def merge_in_grid(o_ptr, lse_ptr, out_ptr, ctr_ptr, pid, n_prog, R, N, K, stride_or, stride_on, spin, tr,
                      C: gl.constexpr, KB: gl.constexpr, KC: gl.constexpr, num_warps: gl.constexpr):
        """Called by every stage-1 program (pid of n_prog) once its partials are stored and visible to it (see the
        module docstring); tr: the program's trace row (bench/gpu/mla_trace_probe.py: slots 6-9, free below five
        tiles a program)."""
        stamp(tr, 6)
        gen_ptr = ctr_ptr + _GEN
        gen = gl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu")   # a read: moves only once all have come
        # scalar atomics run on one thread (the caller's barrier put the program's stores before it), the result
        # broadcast to all: every thread of the program takes the same branches
        old = gl.atomic_add(ctr_ptr, 1, sem="acq_rel", scope="gpu")
        last = (old & 0xFFFF) == n_prog - 1
        go = last.to(gl.int32)
        if last:   # the count's last step: every partial is out. Open the gate, then reset the count
            gl.atomic_add(gen_ptr, 1, sem="release", scope="gpu")
            gl.atomic_xchg(ctr_ptr, 0, sem="relaxed", scope="gpu")
        reads = 0   # a count, not a clock: every thread of the program must leave the loop together
        while (go == 0) & (reads < spin):
            go = (gl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu") != gen).to(gl.int32)
            reads += 1
        gone = 0
        while (go == 0) & (gone == 0):   # give up: count as gone unless every program has come meanwhile
            c = gl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
            go = ((gl.atomic_add(gen_ptr, 0, sem="acquire", scope="gpu") != gen) | ((c & 0xFFFF) == n_prog)).to(
                gl.int32)
            if go == 0:   # the count read before the gate: not reset yet, so a swap that lands is seen by the last
                gone = (gl.atomic_cas(ctr_ptr, c, c + 0x10000, sem="acq_rel", scope="gpu") == c).to(gl.int32)
        stamp(tr, 7)
        if go != 0:
            # the last program merges every unit if any program had gone before it came (merging a unit twice
            # writes the same bits twice); otherwise each program its own units
            first, step = pid, n_prog
            if last & (old >= 0x10000):
                first, step = 0, 1
            for u in range(first, R * N, step):
                _merge_unit(o_ptr, lse_ptr, out_ptr, u, N, K, stride_or, stride_on, C, KB, KC, num_warps)
        stamp(tr, 8)
