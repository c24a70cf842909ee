"""Triton kernels of the `nvlink` EP comm: token rows written straight into peers' buffers.

Dimension legend: T tokens on this rank, T_max tokens a rank may send, W ranks, H hidden, k experts per
token (K, padded to KP = next power of 2), U = W * T_max received-token rows, Q rows of the expert
layout, L = P + W entries of a count row.

Peer buffers are symmetric (torch symmetric memory): every rank holds the same buffers, and a
`delta` table [W] int64 gives, per rank, the element offset from the local buffer's address to that
rank's buffer as mapped here, so `local_ptr + delta[d]` addresses rank d's copy. Data kernels
(put / expand / combine / sum) are plain loads and stores and run under TRITON_INTERPRET=1 on the CPU,
where the tests pass local tensors as the "peers". The two synchronising kernels (count exchange,
signal+wait) use system-scope release/acquire atomics and %globaltimer and run on GPUs only: each
wait gives up after `timeout_ns` and writes (stage, peer) into a host-mapped error word, so a peer
that never arrives ends the wait instead of hanging the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 1024


@triton.jit
def _put_tokens_kernel(x_ptr, has_ptr, tok_idx_ptr, dest_ptr, pos_ptr, w_ptr, phys_ptr, within_ptr, nall_ptr,
                       tok_ptr, tok_delta, meta_ptr, meta_delta, wb_ptr, wb_delta, src_ptr, src_delta,
                       rank, W, T_max, H, L, P_local, cap, K: tl.constexpr, KP: tl.constexpr,
                       POS_HERE: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (token t, destination d, chunk c of H): the token row once per destination; chunk 0
    # also writes the token's k-pair table
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1)
    c = tl.program_id(2)
    if tl.load(has_ptr + t * W + d) != 0:
        row = rank * T_max + tl.load(tok_idx_ptr + t * W + d).to(tl.int64)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        tl.store(tok_ptr + tl.load(tok_delta + d) + row * H + offs, tl.load(x_ptr + t * H + offs, mask=m), mask=m)
    if (c == 0) & (tl.load(has_ptr + t * W + d) != 0):
        row = rank * T_max + tl.load(tok_idx_ptr + t * W + d).to(tl.int64)
        j = tl.arange(0, KP)
        jm = j < K
        dj = tl.load(dest_ptr + t * K + j, mask=jm, other=-1)
        here = jm & (dj == d)
        if POS_HERE:
            # masked layout: row = e * cap + (rows of the slot from lower ranks) + index among mine
            slot = tl.load(phys_ptr + t * K + j, mask=here, other=0).to(tl.int64)
            pj = (slot % P_local) * cap + tl.load(within_ptr + t * K + j, mask=here, other=0)
            for s in range(rank):
                pj += tl.load(nall_ptr + s * L + slot, mask=here, other=0)
        else:
            pj = tl.load(pos_ptr + t * K + j, mask=here, other=-1)
        wj = tl.load(w_ptr + t * K + j, mask=jm, other=0.0)
        tl.store(meta_ptr + tl.load(meta_delta + d) + row * K + j, tl.where(here, pj, -1).to(tl.int32), mask=jm)
        tl.store(wb_ptr + tl.load(wb_delta + d) + row * K + j, wj, mask=jm)
        tl.store(src_ptr + tl.load(src_delta + d) + row, t.to(tl.int32))


@triton.jit
def _expand_kernel(tok_ptr, meta_ptr, nall_ptr, counts_ptr, xe_ptr, rank, W, T_max, H, L, P, P_local,
                   K: tl.constexpr, COUNTS: tl.constexpr, PLB: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (received token row u, chunk of H) (source s = u // T_max): copy the chunk to each of
    # the token's expert rows; program (0, 0) also sums the rows each local expert receives (the batch's counts)
    u = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    if COUNTS:
        if (u == 0) & (tl.program_id(1) == 0):
            e = tl.arange(0, PLB)
            c = tl.zeros([PLB], dtype=tl.int64)
            for s in range(W):
                c += tl.load(nall_ptr + s * L + rank * P_local + e, mask=e < P_local, other=0)
            tl.store(counts_ptr + e, c, mask=e < P_local)
    if (u % T_max) < tl.load(nall_ptr + (u // T_max) * L + P + rank):
        v = tl.load(tok_ptr + u * H + offs, mask=m)
        for j in tl.static_range(K):
            p = tl.load(meta_ptr + u * K + j).to(tl.int64)
            if p >= 0:
                tl.store(xe_ptr + p * H + offs, v, mask=m)


@triton.jit
def _combine_kernel(y_ptr, meta_ptr, wb_ptr, src_ptr, nall_ptr, comb_ptr, comb_delta, rank, T_max, H, L, P,
                    K: tl.constexpr, BLOCK: tl.constexpr):
    # one program per (received token row u, chunk of H): its weighted expert rows summed here (float32), the
    # partial sum written once into the source's combine buffer at [rank, t]
    u = tl.program_id(0).to(tl.int64)
    s = u // T_max
    if (u % T_max) < tl.load(nall_ptr + s * L + P + rank):
        t = tl.load(src_ptr + u).to(tl.int64)
        dst = comb_ptr + tl.load(comb_delta + s) + (rank * T_max + t) * H
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            p = tl.load(meta_ptr + u * K + j).to(tl.int64)
            w = tl.load(wb_ptr + u * K + j)
            v = tl.load(y_ptr + tl.maximum(p, 0) * H + offs, mask=m & (offs * 0 + p >= 0), other=0.0)
            acc += w * v.to(tl.float32)
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


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _report(err_addr, stage, peer):
    # keep the first failure: later waits of the same call time out because of it
    ep = err_addr.to(tl.pointer_type(tl.int32))
    if tl.load(ep, volatile=True) == 0:
        tl.store(ep + 1, stage)
        tl.store(ep + 2, peer)
        tl.store(ep, 1)


@triton.jit
def _exchange_counts_kernel(row_ptr, cnt_ptr, cnt_delta, out_ptr, epoch_ptr, err_addr, rank, L, timeout_ns,
                            STAGE: tl.constexpr, BLOCK: tl.constexpr):
    # program d: publish this rank's count row into rank d's slot [rank] (each entry tagged with the
    # epoch in its high 32 bits, so the value is its own arrival flag), then wait for rank d's row here
    d = tl.program_id(0)
    e = tl.load(epoch_ptr)
    offs = tl.arange(0, BLOCK)
    m = offs < L
    tagged = (e << 32) | tl.load(row_ptr + offs, mask=m, other=0)
    tl.atomic_xchg(cnt_ptr + tl.load(cnt_delta + d) + rank * L + offs, tagged, mask=m, sem="release", scope="sys")
    mine = cnt_ptr + d * L + offs
    got = tl.atomic_add(mine, 0, mask=m, sem="acquire", scope="sys")
    pending = tl.min(tl.where(m, got >> 32, e)) < e
    t0 = _now()
    waited = _now() - t0
    while pending & (waited < timeout_ns):
        got = tl.atomic_add(mine, 0, mask=m, sem="acquire", scope="sys")
        pending = tl.min(tl.where(m, got >> 32, e)) < e
        waited = _now() - t0
    if pending:
        _report(err_addr, STAGE, d)
    tl.store(out_ptr + d * L + offs, got - ((got >> 32) << 32), mask=m)  # the count, tag dropped


@triton.jit
def _signal_wait_kernel(flag_ptr, flag_delta, epoch_ptr, err_addr, rank, timeout_ns, STAGE: tl.constexpr):
    # program d: raise this rank's flag at rank d (release: everything this rank wrote before is
    # visible there first), then wait until rank d has raised its flag here (acquire)
    d = tl.program_id(0)
    e = tl.load(epoch_ptr)
    tl.atomic_xchg(flag_ptr + tl.load(flag_delta + d) + rank, e, sem="release", scope="sys")
    got = tl.atomic_add(flag_ptr + d, 0, sem="acquire", scope="sys")
    t0 = _now()
    waited = _now() - t0
    while (got < e) & (waited < timeout_ns):
        got = tl.atomic_add(flag_ptr + d, 0, sem="acquire", scope="sys")
        waited = _now() - t0
    if got < e:
        _report(err_addr, STAGE, d)


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def put_tokens(x: torch.Tensor, has: torch.Tensor, tok_idx: torch.Tensor, dest: torch.Tensor, w: torch.Tensor,
               bufs: dict, rank: int, t_max: int, pos: torch.Tensor | None = None,
               masked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = None) -> None:
    """Send each token x [T, H] once to every rank d with has[t, d]: its row, its k-pair rows table
    (the pair's row in d's expert layout where dest == d, else -1), weights and token index, into rank
    d's buffers at row rank * T_max + tok_idx[t, d]. bufs: name -> (local buffer, delta [W] int64) for
    "tok", "meta", "w", "src". The pair rows come from pos [T, k] int32, or are computed here for the
    masked layout from masked = (phys [T, k] int64, within [T, k] int32, n_all [W, L] int64, P_local, cap)."""
    T, H = x.shape
    W = has.shape[1] if has.dim() == 2 else 0
    k = dest.shape[1] if dest.dim() == 2 else 0
    _check("x", x, (T, H))
    _check("has", has, (T, W), torch.int32)
    _check("tok_idx", tok_idx, (T, W), torch.int32)
    _check("dest", dest, (T, k), torch.int32)
    _check("w", w, (T, k), torch.float32)
    if (pos is None) == (masked is None):
        raise ValueError("give exactly one of pos and masked")
    if pos is not None:
        _check("pos", pos, (T, k), torch.int32)
        phys, within, n_all, P_local, cap = dest, dest, dest, 1, 0  # unused by the kernel
    else:
        phys, within, n_all, P_local, cap = masked
        _check("phys", phys, (T, k))
        if phys.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"phys must be int32 or int64, got {phys.dtype}")
        _check("within", within, (T, k), torch.int32)
        _check("n_all", n_all, (W, n_all.shape[1]), torch.int64)
    tok, meta, wb, src = (bufs[n] for n in ("tok", "meta", "w", "src"))
    _check("tok buffer", tok[0], (W * t_max, H), x.dtype)
    _check("meta buffer", meta[0], (W * t_max, k), torch.int32)
    if T == 0:
        return
    grid = (T, W, triton.cdiv(H, BLOCK_H))
    _put_tokens_kernel[grid](x, has, tok_idx, dest, pos if pos is not None else dest, w, phys, within, n_all,
                               tok[0], tok[1], meta[0], meta[1], wb[0], wb[1], src[0], src[1], rank, W, t_max, H,
                               n_all.shape[1], P_local, cap, K=k, KP=triton.next_power_of_2(k),
                               POS_HERE=pos is None, BLOCK=BLOCK_H, num_warps=4)


def expand_tokens(tok: torch.Tensor, meta: torch.Tensor, n_all: torch.Tensor, xe: torch.Tensor, rank: int,
                  t_max: int, counts: torch.Tensor | None = None) -> None:
    """Copy each received token row tok [U, H] (the first n_all[s, P + rank] rows of each source's block)
    into its expert rows xe [Q, H] named by meta [U, k] (-1: none here); with counts [P_local] int64,
    also write the rows each local expert receives (sum over sources of n_all[s, local slots])."""
    U, H = tok.shape
    W, L = n_all.shape
    P = L - W
    _check("meta", meta, (U, meta.shape[1]), torch.int32)
    _check("n_all", n_all, (U // t_max, L), torch.int64)
    _check("xe", xe, (xe.shape[0], H), tok.dtype)
    if counts is not None:
        _check("counts", counts, (P // W,), torch.int64)
    if U == 0:
        return
    grid = (U, triton.cdiv(H, BLOCK_H))
    _expand_kernel[grid](tok, meta, n_all, counts if counts is not None else n_all, xe, rank, W, t_max, H, L, P,
                         P // W, K=meta.shape[1], COUNTS=counts is not None,
                         PLB=triton.next_power_of_2(max(1, P // W)), BLOCK=BLOCK_H, num_warps=4)


def combine_tokens(y: torch.Tensor, meta: torch.Tensor, wb: torch.Tensor, src: torch.Tensor, n_all: torch.Tensor,
                   comb: tuple, rank: int, t_max: int) -> None:
    """For each received token row: sum_j wb[u, j] * y[meta[u, j]] (float32; y [Q, H] expert outputs),
    written in comb's dtype into the source rank's combine buffer [W, T_max, H] at [rank, src[u]]."""
    U, k = meta.shape
    H = y.shape[1]
    W, L = n_all.shape
    _check("wb", wb, (U, k), torch.float32)
    _check("src", src, (U,), torch.int32)
    _check("n_all", n_all, (U // t_max, L), torch.int64)
    _check("comb buffer", comb[0], (U // t_max, t_max, H), y.dtype)
    if U == 0:
        return
    grid = (U, triton.cdiv(H, BLOCK_H))
    _combine_kernel[grid](y, meta, wb, src, n_all, comb[0], comb[1], rank, t_max, H, L, L - W, K=k,
                          BLOCK=BLOCK_H, num_warps=4)


def sum_partials(comb: torch.Tensor, has: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] = sum over ranks d with has[t, d] of comb [W, T_max, H] at [d, t] (float32 sum)."""
    W, t_max, H = comb.shape
    T = out.shape[0]
    _check("has", has, (T, W), torch.int32)
    _check("out", out, (T, H), comb.dtype)
    if T == 0:
        return
    _sum_partials_kernel[(T, triton.cdiv(H, BLOCK_H))](comb, has, out, W, t_max, H, BLOCK=BLOCK_H, num_warps=4)


def exchange_counts(row: torch.Tensor, cnt: tuple, out: torch.Tensor, epoch: torch.Tensor, err_addr: int,
                    rank: int, timeout_ns: int, stage: int) -> None:
    """All-gather of one int64 count row [L] (< 2**32 each) over the symmetric buffer cnt [W, L]:
    out [W, L] = every rank's row. GPU only."""
    W, L = cnt[0].shape
    _check("row", row, (L,), torch.int64)
    _check("out", out, (W, L), torch.int64)
    _exchange_counts_kernel[(W,)](row, cnt[0], cnt[1], out, epoch, err_addr, rank, L, timeout_ns, STAGE=stage,
                                  BLOCK=triton.next_power_of_2(L), num_warps=4)


def signal_wait(flag: tuple, epoch: torch.Tensor, err_addr: int, rank: int, timeout_ns: int, stage: int) -> None:
    """Barrier over the symmetric flag row flag [W] int64: after it, every rank's earlier writes into this
    rank's buffers are visible here. GPU only."""
    W = flag[0].shape[0]
    _signal_wait_kernel[(W,)](flag[0], flag[1], epoch, err_addr, rank, timeout_ns, STAGE=stage, num_warps=1)
