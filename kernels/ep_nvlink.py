"""Triton data kernels of the `nvlink` EP comm: token rows written straight into peers' buffers.

Dimension legend: T tokens on this rank, T_max tokens a rank may send, W ranks, H hidden, k experts per
token (K, padded to KP = next power of 2), P physical slots, P_local = P // W slots per rank, U = W * T_max
received-token rows (source s owns rows s * T_max + t, one per token t of s), Q rows of the expert layout,
C1 = P_local + 1 entries of one source's count row.

Peer buffers are symmetric (torch symmetric memory): every rank holds the same buffers, and a `delta`
table [W] int64 gives, per rank, the element offset from the local buffer's address to that rank's
buffer as mapped here, so `local_ptr + delta[d]` addresses rank d's copy. These kernels are plain loads,
stores and relaxed GPU-scope atomics: they run under TRITON_INTERPRET=1 on the CPU, where the tests pass
local tensors as the "peers". The arrival flags and count rows are in ep_nvlink_sync.py (GPU only).
FP8 payload (put_tokens(fp8=True)): "tok" holds packed rows (kernels/fp8_pack.py: H fp8 bytes, then H / 128
float32 scales), quantised by the put kernel on the way; the other kernels copy such rows as int16 words.

A pair's code: local expert e (= slot % P_local) and `within`, its index among this rank's pairs of that
slot, as e * T_max + within (-1: the pair is not on that rank). `within` comes from an atomic counter
per slot, so the order of one source's rows inside an expert is whatever order the programs ran in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.fp8_pack import packed_row_bytes, quant_pack_chunk
from nanomoe_kernels.launch import Launcher

BLOCK_H = 1024


@triton.jit
def _report(err_addr, stage, peer):
    # keep the first failure: later waits of the same call time out because of it
    ep = err_addr.to(tl.pointer_type(tl.int32))
    if tl.load(ep, volatile=True) == 0:
        tl.store(ep + 1, stage)
        tl.store(ep + 2, peer)
        tl.store(ep, 1)


@triton.jit
def _put_kernel(x_ptr, phys_ptr, w_ptr, has_ptr, ctr_ptr, epoch_ptr, err_addr, tok_ptr, tok_delta, meta_ptr,
                meta_delta, wb_ptr, wb_delta, rank, T, W, T_max, H, RB, P, P_local, K: tl.constexpr,
                KP: tl.constexpr, OWN_ROWS: tl.constexpr, FP8: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (destination d, token t, chunk c of H); d varies fastest, so the programs that write
    # to peers (NVLink) and to this rank (HBM) run side by side. Chunk 0 writes the token's pair codes and
    # weights into d's tables (codes -1 when it has no pair there); every chunk copies its part of the row
    # when the token has a pair on d: to peers always, to this rank's own buffer only with OWN_ROWS (else
    # expand_tokens reads this rank's tokens from x). FP8: the chunk is quantised straight into the packed
    # row (fp8_pack's layout; tok rows of RB bytes), recomputed per destination instead of a kernel of its own
    d = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2)
    if (t == 0) & (d == 0) & (c == 0):
        tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)  # the call's epoch, read by the flags after this kernel
    if t < T:
        j = tl.arange(0, KP)
        jm = j < K
        slot = tl.load(phys_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
        ok = jm & (slot >= 0) & (slot < P)
        here = ok & (slot // P_local == d)
        go = tl.sum(here.to(tl.int32), axis=0) > 0
        if c == 0:
            row = rank * T_max + t
            tl.store(has_ptr + t * W + d, go.to(tl.int32))
            within = tl.atomic_add(ctr_ptr + tl.where(here, slot, 0), tl.full([KP], 1, tl.int32), mask=here,
                                   sem="relaxed", scope="gpu")
            code = tl.where(here, (slot % P_local) * T_max + within.to(tl.int64), -1)
            tl.store(meta_ptr + tl.load(meta_delta + d) + row * K + j, code.to(tl.int32), mask=jm)
            tl.store(wb_ptr + tl.load(wb_delta + d) + row * K + j, tl.load(w_ptr + t * K + j, mask=jm), mask=jm)
            if (d == 0) & (tl.sum((jm & (ok == 0)).to(tl.int32), axis=0) > 0):
                _report(err_addr, 4, -1)  # a slot outside [0, P): reported (ValueError next call), never written
        if go & ((d != rank) | OWN_ROWS):
            if FP8:  # packed rows: RB % 32 == 0 and peers' buffers 16-byte apart (checked), so stores vectorise
                dst = tok_ptr + tl.multiple_of(tl.load(tok_delta + d), 16) + (rank * T_max + t) * RB
                quant_pack_chunk(x_ptr + t * H, dst, c, H, BLOCK=BLOCK, GROUP=128)
            else:
                dst = tok_ptr + tl.load(tok_delta + d) + (rank * T_max + t) * RB
                offs = c * BLOCK + tl.arange(0, BLOCK)
                m = offs < H
                tl.store(dst + offs, tl.load(x_ptr + t * H + offs, mask=m), mask=m)


@triton.jit
def _expand_kernel(x_ptr, tok_ptr, meta_ptr, cnt_ptr, base_ptr, rows_ptr, counts_ptr, out_ptr, rank, W, T_max, H,
                   P_local, cap, K: tl.constexpr, KP: tl.constexpr, MASKED: tl.constexpr, PLB: tl.constexpr,
                   BLOCK: tl.constexpr):
    # one program per (received token row u, chunk of H), source s = u // T_max: each pair's row in the
    # expert layout + within, the expert's first row being e * cap + rows of e from lower sources (masked)
    # or base[s, e] (gathered); chunk 0 records the rows for combine. Masked: the chunk is copied to each
    # row, and program (0, 0) also sums each local expert's rows over sources (the batch's counts).
    # Gathered (one chunk): out[row] = u, the token row that batch row reads; nothing is copied.
    # rank: the source whose rows are read from x (-1: every row is in tok)
    u = tl.program_id(0).to(tl.int64)
    s = u // T_max
    t = u % T_max
    C1 = P_local + 1
    if MASKED:
        if (u == 0) & (tl.program_id(1) == 0):
            ee = tl.arange(0, PLB)
            acc = tl.zeros([PLB], dtype=tl.int64)
            for s2 in range(W):
                acc += tl.load(cnt_ptr + s2 * C1 + ee, mask=ee < P_local, other=0)
            tl.store(counts_ptr + ee, acc, mask=ee < P_local)
    if t < tl.load(cnt_ptr + s * C1 + P_local):
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        if MASKED:
            if s == rank:  # loaded first: its latency overlaps the index math below
                v = tl.load(x_ptr + t * H + offs, mask=m)
            else:
                v = tl.load(tok_ptr + u * H + offs, mask=m)
        j = tl.arange(0, KP)
        jm = j < K
        codes = tl.load(meta_ptr + u * K + j, mask=jm, other=-1).to(tl.int64)
        here = codes >= 0
        e = tl.where(here, codes // T_max, 0)
        if MASKED:
            base = e * cap
            for s2 in range(s):
                base += tl.load(cnt_ptr + s2 * C1 + e, mask=here, other=0)
        else:
            base = tl.load(base_ptr + s * P_local + e, mask=here, other=0)
        p = tl.where(here, base + codes % T_max, -1)  # [KP] the pairs' expert rows here
        if tl.program_id(1) == 0:
            tl.store(rows_ptr + u * K + j, p.to(tl.int32), mask=jm)
        if not MASKED:
            tl.store(out_ptr + tl.maximum(p, 0), tl.zeros([KP], dtype=tl.int32) + u.to(tl.int32), mask=p >= 0)
        elif tl.max(p, axis=0) >= 0:
            # the rows picked out of p in registers, stores unconditional but masked: no branch between them,
            # so they issue back to back (a [KP, BLOCK] tile store would hold KP x BLOCK values and addresses)
            for jj in tl.static_range(K):
                pj = tl.sum(tl.where(j == jj, p, 0), axis=0)
                tl.store(out_ptr + tl.maximum(pj, 0) * H + offs, v, mask=m & (offs * 0 + pj >= 0))


@triton.jit
def _combine_kernel(y_ptr, rows_ptr, wb_ptr, cnt_ptr, comb_ptr, comb_delta, rank, W, T_max, H, P_local,
                    K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (received token row u, chunk of H): its weighted expert rows summed here (float32), the
    # partial sum written once into the source's combine buffer at [rank, t]
    # sources interleaved (program i takes source i % W): partial sums for peers (NVLink) and for this
    # rank (HBM) are written side by side instead of one source after the other
    i = tl.program_id(0).to(tl.int64)
    s = i % W
    t = i // W
    u = s * T_max + t
    if t < tl.load(cnt_ptr + s * (P_local + 1) + P_local):
        j = tl.arange(0, KP)
        p = tl.load(rows_ptr + u * K + j, mask=j < K, other=-1).to(tl.int64)
        if tl.max(p, axis=0) >= 0:
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            m = offs < H
            w = tl.load(wb_ptr + u * K + j, mask=p >= 0, other=0.0)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for jj in tl.static_range(K):  # rows -1 read as 0; loads independent of each other (no branch)
                pj = tl.sum(tl.where(j == jj, p, 0), axis=0)
                wj = tl.sum(tl.where(j == jj, w, 0.0), axis=0)
                v = tl.load(y_ptr + tl.maximum(pj, 0) * H + offs, mask=m & (offs * 0 + pj >= 0), other=0.0)
                acc += wj * v.to(tl.float32)
            dst = comb_ptr + tl.load(comb_delta + s) + (rank * T_max + t) * H
            tl.store(dst + offs, acc.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _sum_partials_kernel(comb_ptr, has_ptr, out_ptr, W, T_max, H, BLOCK: tl.constexpr):
    # one program per (local token, chunk of H): out[t] = sum over ranks d holding its pairs of comb[d, t]
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for d in range(W):
        on = offs * 0 + tl.load(has_ptr + t * W + d) != 0  # as a vector: scalar & vector masks trip the interpreter
        v = tl.load(comb_ptr + (d * T_max + t) * H + offs, mask=m & on, other=0.0)
        acc += v.to(tl.float32)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


# launched through kernels/launch.py: the compiled kernel called directly after its first launch
_PUT, _EXPAND, _COMBINE, _SUM = (Launcher(k) for k in (_put_kernel, _expand_kernel, _combine_kernel,
                                                       _sum_partials_kernel))


def check_arg(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    """Shape, dtype and contiguity of a kernel argument, with the argument's name in the error."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_put_buffers(ctr: torch.Tensor, epoch: torch.Tensor, bufs: dict, W: int, t_max: int, H: int, k: int,
                      dtype: torch.dtype, num_slots: int, fp8: bool = False) -> None:
    """The buffers put_tokens writes (a comm checks them once, when it makes them); fp8: "tok" holds packed
    FP8 rows, uint8 [W * t_max, packed_row_bytes(H)]."""
    check_arg("ctr", ctr, (num_slots,), torch.int32)
    check_arg("epoch", epoch, (1,), torch.int64)
    tok_row = (packed_row_bytes(H), torch.uint8) if fp8 else (H, dtype)
    check_arg("tok buffer", bufs["tok"][0], (W * t_max, tok_row[0]), tok_row[1])
    check_arg("meta buffer", bufs["meta"][0], (W * t_max, k), torch.int32)
    check_arg("w buffer", bufs["w"][0], (W * t_max, k), torch.float32)
    if num_slots % max(W, 1):
        raise ValueError(f"num_slots ({num_slots}) must be divisible by W ({W})")


def put_tokens(x: torch.Tensor, phys: torch.Tensor, w: torch.Tensor, has: torch.Tensor, ctr: torch.Tensor,
               epoch: torch.Tensor, err_addr: int, bufs: dict, rank: int, t_max: int, num_slots: int,
               own_rows: bool = False, buffers_checked: bool = False, fp8: bool = False) -> None:
    """Send each token x [T, H] to every rank d owning one of its slots phys [T, k] (int32/int64): its row
    (peers only, unless own_rows) at rank * T_max + t of d's "tok", its pair codes (module docstring) and
    weights w [T, k] float32 into d's "meta" / "w" (rows of tokens with no pair on d get codes -1). Writes
    has [T, W] int32 (1: token t has a pair on d), counts this rank's pairs per slot into ctr [P] int32
    (zero before; the codes' `within`), adds 1 to epoch [1] int64, and reports a slot outside [0, P) as
    (stage 4, -1) in the int32 error word at err_addr. bufs: name -> (local buffer, delta [W] int64).
    buffers_checked: ctr, epoch and bufs passed check_put_buffers already (a comm's own, fixed buffers).
    fp8: "tok" holds packed FP8 rows (kernels/fp8_pack.py; H a multiple of 128): each row is quantised per
    128 channels on its way, bit for bit as fp8_quant.quant_fp8_groups; its deltas must be multiples of 16
    (bytes: the rows are stored as 16-byte vectors)."""
    T, H = x.shape
    W = has.shape[1] if has.dim() == 2 else 0
    k = phys.shape[1] if phys.dim() == 2 else 0
    check_arg("x", x, (T, H))
    check_arg("phys", phys, (T, k))
    if phys.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"phys must be int32 or int64, got {phys.dtype}")
    check_arg("w", w, (T, k), torch.float32)
    check_arg("has", has, (T, W), torch.int32)
    if not buffers_checked:
        check_put_buffers(ctr, epoch, bufs, W, t_max, H, k, x.dtype, num_slots, fp8)
    if T > t_max:
        raise ValueError(f"need T <= t_max, got T={T}, t_max={t_max}")
    tok, meta, wb = bufs["tok"], bufs["meta"], bufs["w"]
    grid = (W, max(T, 1), triton.cdiv(H, BLOCK_H))  # at least one program: it advances the epoch
    _PUT(grid, x, phys, w, has, ctr, epoch, err_addr, tok[0], tok[1], meta[0], meta[1], wb[0], wb[1], rank, T, W,
         t_max, H, tok[0].shape[1], num_slots, num_slots // W, K=k, KP=triton.next_power_of_2(k), OWN_ROWS=own_rows,
         FP8=fp8, BLOCK=BLOCK_H, num_warps=4)


def expand_tokens(x: torch.Tensor, tok: torch.Tensor, meta: torch.Tensor, cnt: torch.Tensor, out: torch.Tensor,
                  rows: torch.Tensor, rank: int, t_max: int, counts: torch.Tensor | None = None,
                  base: torch.Tensor | None = None, own_from_x: bool = True) -> None:
    """Place each received token (rows of source s: the first cnt[s, P_local] of its block of tok [U, H]) in
    the expert layout and record its pairs' rows there in rows [U, k] int32 (-1: none). cnt [W, P_local + 1]
    int64: per source, rows per local expert, then its token count. Two layouts:
      masked (counts [P_local] int64 given, written: rows per expert; out [Q, H]): expert e's rows start at
        e * cap, cap = Q // P_local; the token is copied there (this rank's own tokens from x [T, H]);
      gathered (base [W, P_local] int64 given: source s's first row of expert e; out [Q] int32): nothing is
        copied, out[row] = u, the token row that batch row reads (every token, this rank's own too, must be
        in tok: put_tokens(own_rows=True)).
    own_from_x=False (masked): this rank's tokens are in tok too (put_tokens(own_rows=True)), x is unread.
    Rows are copied as they are, whatever their dtype (packed FP8 rows: pass int16 views of tok and out)."""
    U, H = tok.shape
    W, C1 = cnt.shape
    P_local = C1 - 1
    k = meta.shape[1]
    masked = counts is not None
    if masked == (base is not None):
        raise ValueError("give exactly one of counts (masked layout) and base (gathered layout)")
    check_arg("x", x, (x.shape[0], H), tok.dtype)
    check_arg("meta", meta, (U, k), torch.int32)
    check_arg("cnt", cnt, (W, C1), torch.int64)
    check_arg("rows", rows, (U, k), torch.int32)
    if masked:
        check_arg("out", out, (out.shape[0], H), tok.dtype)
        check_arg("counts", counts, (P_local,), torch.int64)
    else:
        check_arg("out", out, (out.shape[0],), torch.int32)
        check_arg("base", base, (W, P_local), torch.int64)
    if U != W * t_max:
        raise ValueError(f"tok must have W * t_max = {W * t_max} rows, got {U}")
    grid = (U, triton.cdiv(H, BLOCK_H) if masked else 1)
    _EXPAND(grid, x, tok, meta, cnt, cnt if masked else base, rows, counts if masked else cnt, out,
            rank if own_from_x else -1, W, t_max, H, P_local, out.shape[0] // max(P_local, 1), K=k,
            KP=triton.next_power_of_2(k), MASKED=masked, PLB=triton.next_power_of_2(max(1, P_local)), BLOCK=BLOCK_H,
            num_warps=4)


def combine_tokens(y: torch.Tensor, rows: torch.Tensor, wb: torch.Tensor, cnt: torch.Tensor, comb: tuple,
                   rank: int, t_max: int) -> None:
    """For each received token row u: sum_j wb[u, j] * y[rows[u, j]] (float32; y [Q, H] expert outputs, rows
    -1 skipped), written in comb's dtype (y's may differ) into the source's combine buffer [W, T_max, H] at
    [rank, t]."""
    U, k = rows.shape
    H = y.shape[1]
    W, C1 = cnt.shape
    check_arg("rows", rows, (U, k), torch.int32)
    check_arg("wb", wb, (U, k), torch.float32)
    check_arg("cnt", cnt, (U // t_max, C1), torch.int64)
    check_arg("comb buffer", comb[0], (W, t_max, H))
    grid = (U, triton.cdiv(H, BLOCK_H))
    _COMBINE(grid, y, rows, wb, cnt, comb[0], comb[1], rank, W, t_max, H, C1 - 1, K=k, KP=triton.next_power_of_2(k),
             BLOCK=BLOCK_H, num_warps=4)


def sum_partials(comb: torch.Tensor, has: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] = sum over ranks d with has[t, d] of comb [W, T_max, H] at [d, t] (float32 sum)."""
    W, t_max, H = comb.shape
    T = out.shape[0]
    check_arg("has", has, (T, W), torch.int32)
    check_arg("out", out, (T, H), comb.dtype)
    if T == 0:
        return
    _SUM((T, triton.cdiv(H, BLOCK_H)), comb, has, out, W, t_max, H, BLOCK=BLOCK_H, num_warps=4)
