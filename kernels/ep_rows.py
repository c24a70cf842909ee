"""Triton kernels of the `torch` comm on GPUs: one row per (token, destination rank), packed with its pairs.

Dimension legend: T tokens on this rank, k experts per token (K, padded to KP), H hidden, W ranks, P slots,
P_local = P // W, L = row length (elements of x's dtype: the token's H values, then from element HM its k
slot ids int32, k weights float32 and k pair numbers int32), R_in rows received, M batch rows (pairs this
rank's experts take), WB / PLB: W / P_local padded to powers of two.

Table tab [W, P_local + 2] int64 (zeroed by the caller), per destination rank d: this rank's pairs per local
expert of d, the rows sent to d, and the ids outside [0, P) found here (every row of that column gets it).
  pack_rows: per token, its pairs counted into tab (the count before each pair's increment is the pair's
    number among this rank's pairs of its slot) and its row copied, with its slots, weights and pair numbers,
    to the next free row of each destination's block of rows [W * T, L] (the order inside a block is the
    order the programs ran); pos [T, W] = its row inside d's block, -1 where it has no pair.
  unpack_rows: per received row (sources' blocks back to back), each pair on this rank gets its batch row
    base[s, e] + its pair number, base[s, e] = the rows of lower experts + the rows of expert e from lower
    sources (every program sums the received table tab [W, P_local + 2] itself: no layout kernel, no
    counters to zero); index [M] = the received row of each batch row, pair_rows / pair_weights [R_in, k] =
    each pair's batch row (-1: elsewhere) and weight (0 there); program 0 writes counts [P_local].
  partial_rows: per received row, sum_j w_j * y[pair_rows_j] (float32) -> [R_in, H].
  sum_home: per token, the sum of its partial rows come back from each rank (rows in destination blocks,
    back to back) -> [T, H].
The torch-op versions (any device or dtype) are in nanomoe_fn/comm/token_rows.py; tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.ep_nvlink import _report, check_arg
from nanomoe_kernels.launch import Launcher

BLOCK_H = 1024


def _pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): triton.next_power_of_2's value, without its call (a decode
    dispatch's host time is its time: a few us per call on slow hosts)."""
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _pack_kernel(x_ptr, phys_ptr, w_ptr, tab_ptr, pos_ptr, rows_ptr, T, W, H, P, P_local, L, HM, BS, R0, TS,
                 K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jm = j < K
    slot = tl.load(phys_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
    ok = jm & (slot >= 0) & (slot < P)
    nbad = tl.sum((jm & (ok == 0)).to(tl.int64), axis=0)
    dest = tl.where(ok, slot // P_local, -1)
    num = tl.atomic_add(tab_ptr + tl.where(ok, dest * TS + slot % P_local, 0), tl.full([KP], 1, tl.int64), mask=ok,
                        sem="relaxed")
    wv = tl.load(w_ptr + t * K + j, mask=jm, other=0.0)
    for d in range(W):
        if nbad > 0:
            tl.atomic_add(tab_ptr + d * TS + P_local + 1, nbad, sem="relaxed")
        if tl.sum((dest == d).to(tl.int32), axis=0) > 0:
            p = tl.atomic_add(tab_ptr + d * TS + P_local, 1, sem="relaxed")  # this row's place in d's block
            tl.store(pos_ptr + t * W + d, p)
            row = rows_ptr + (d * BS + R0 + p) * L
            for c in range(0, H, BLOCK):
                offs = c + tl.arange(0, BLOCK)
                m = offs < H
                tl.store(row + offs, tl.load(x_ptr + t * H + offs, mask=m), mask=m)
            meta = (row + HM).to(tl.pointer_type(tl.int32))
            tl.store(meta + j, slot.to(tl.int32), mask=jm)
            tl.store(meta.to(tl.pointer_type(tl.float32)) + K + j, wv, mask=jm)
            tl.store(meta + 2 * K + j, num.to(tl.int32), mask=jm)
        else:
            tl.store(pos_ptr + t * W + d, -1)


@triton.jit
def _unpack_kernel(recv_ptr, tab_ptr, counts_ptr, index_ptr, xe_ptr, prow_ptr, pw_ptr, err_addr, rank, W, P_local, L,
                   HM, H, TS, BS, R0, CAP, K: tl.constexpr, KP: tl.constexpr, WB: tl.constexpr, PLB: tl.constexpr,
                   FIXED: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    sw = tl.arange(0, WB)
    ew = tl.arange(0, PLB)
    got = tl.load(tab_ptr + sw[:, None] * TS + ew[None, :], mask=(sw[:, None] < W) & (ew[None, :] < P_local),
                  other=0)  # [WB, PLB] pairs per (source, local expert)
    per_expert = tl.sum(got, axis=0)
    if r == 0:
        tl.store(counts_ptr + ew, per_expert, mask=ew < P_local)
    rows_from = tl.load(tab_ptr + sw * TS + P_local, mask=sw < W, other=0)  # [WB] rows per source
    if FIXED:  # source s's block: rows s * BS + R0 + t, t < rows_from[s]; expert e's rows from e * CAP
        s = r // BS
        t = r % BS - R0
        n_s = tl.sum(tl.where(sw == s, rows_from, 0), axis=0)
        base = ew.to(tl.int64) * CAP + tl.sum(tl.where(sw[:, None] < s, got, 0), axis=0)
        if r == 0:
            nbad = tl.sum(tl.load(tab_ptr + sw * TS + P_local + 1, mask=sw < W, other=0), axis=0)
            if nbad > 0:
                _report(err_addr, 4, -1)  # ids outside [0, P) on some rank: ValueError at the next call
    else:  # sources' rows back to back; batch rows by expert, then source
        s = tl.sum((tl.cumsum(rows_from, axis=0) <= r).to(tl.int64), axis=0)  # the source whose rows hold row r
        t = s * 0  # every received row holds a token
        n_s = t + 1
        base = tl.cumsum(per_expert, axis=0) - per_expert + tl.sum(tl.where(sw[:, None] < s, got, 0), axis=0)
    j = tl.arange(0, KP)
    jm = j < K
    jv = jm & (j * 0 + t >= 0) & (j * 0 + t < n_s)  # a token row (not a header or padding row)
    meta = (recv_ptr + r * L + HM).to(tl.pointer_type(tl.int32))
    slot = tl.load(meta + j, mask=jv, other=-1).to(tl.int64)
    wv = tl.load(meta.to(tl.pointer_type(tl.float32)) + K + j, mask=jv, other=0.0)
    num = tl.load(meta + 2 * K + j, mask=jv, other=0).to(tl.int64)
    here = jv & (slot >= 0) & (slot // P_local == rank)
    e = tl.where(here, slot % P_local, -1)
    first = tl.sum(tl.where(e[:, None] == ew[None, :], base[None, :], 0), axis=1)  # [KP] base[s, e_j]
    brow = tl.where(here, first + num, -1)
    tl.store(prow_ptr + r * K + j, brow.to(tl.int32), mask=jm)
    tl.store(pw_ptr + r * K + j, tl.where(here, wv, 0.0), mask=jm)
    if FIXED:  # the row copied to each of its pairs' places in the masked batch
        for c in range(0, H, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            m = offs < H
            v = tl.load(recv_ptr + r * L + offs, mask=m & (offs * 0 + t >= 0) & (offs * 0 + t < n_s))
            for jj in tl.static_range(K):
                bj = tl.sum(tl.where(j == jj, brow, 0), axis=0)
                tl.store(xe_ptr + tl.maximum(bj, 0) * H + offs, v, mask=m & (offs * 0 + bj >= 0))
    else:
        tl.store(index_ptr + tl.maximum(brow, 0), tl.zeros([KP], dtype=tl.int32) + r.to(tl.int32), mask=brow >= 0)


@triton.jit
def _partial_kernel(y_ptr, prow_ptr, pw_ptr, out_ptr, H, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    j = tl.arange(0, KP)
    p = tl.load(prow_ptr + r * K + j, mask=j < K, other=-1).to(tl.int64)
    w = tl.load(pw_ptr + r * K + j, mask=j < K, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for jj in tl.static_range(K):  # the pairs' rows picked out of registers; rows -1 read as 0
        pj = tl.sum(tl.where(j == jj, p, 0), axis=0)
        wj = tl.sum(tl.where(j == jj, w, 0.0), axis=0)
        v = tl.load(y_ptr + tl.maximum(pj, 0) * H + offs, mask=m & (offs * 0 + pj >= 0), other=0.0)
        acc += wj * v.to(tl.float32)
    tl.store(out_ptr + r * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sum_home_kernel(home_ptr, tab_ptr, pos_ptr, out_ptr, W, H, P_local, BS, R0, FIXED: tl.constexpr,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = tl.full([], 0, tl.int64) + R0
    for d in range(W):
        p = tl.load(pos_ptr + t * W + d)
        v = tl.load(home_ptr + (start + p) * H + offs, mask=m & (offs * 0 + p >= 0), other=0.0)
        acc += v.to(tl.float32)
        if FIXED:  # blocks of BS rows
            start += BS
        else:  # rows to lower ranks, back to back
            start += tl.load(tab_ptr + d * (P_local + 2) + P_local)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


_PACK, _UNPACK, _PARTIAL, _SUM_HOME = (Launcher(k) for k in (_pack_kernel, _unpack_kernel, _partial_kernel,
                                                             _sum_home_kernel))


def pack_rows(x: torch.Tensor, phys: torch.Tensor, w: torch.Tensor, tab: torch.Tensor, pos: torch.Tensor,
              rows: torch.Tensor, hm: int) -> None:
    """x [T, H], phys [T, k] int32/int64 slots, w [T, k] float32 -> tab [W, P_local + 2] (zeroed before),
    pos [T, W] int64, rows [W * T, L] (module docstring)."""
    T, H = x.shape
    W, C = tab.shape
    k = phys.shape[1] if phys.dim() == 2 else 0
    check_arg("x", x, (T, H))
    check_arg("phys", phys, (T, k))
    check_arg("w", w, (T, k), torch.float32)
    check_arg("tab", tab, (W, C), torch.int64)
    check_arg("pos", pos, (T, W), torch.int64)
    check_arg("rows", rows, (W * T, rows.shape[1]), x.dtype)
    if T:
        _PACK((T,), x, phys, w, tab, pos, rows, T, W, H, W * (C - 2), C - 2, rows.shape[1], hm, T, 0, C, K=k,
              KP=_pow2(k), BLOCK=BLOCK_H, num_warps=4)


def pack_blocks(x: torch.Tensor, phys: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, blocks: torch.Tensor,
                local_experts: int, hm: int, checked: bool = False) -> None:
    """Fixed blocks: x [T, H], phys [T, k], w [T, k] float32 -> pos [T, W] int64 and blocks [W * BS, L]: block d
    is a header row (its first P_local + 2 int64 words: the count table row for d, zeroed before) then the rows
    to d (at most BS - 1); rows past the count are left as they are. checked: the caller made pos and blocks
    itself and checked x, phys and w (the torch comm's decode path: host time is its time)."""
    T, H = x.shape
    W, k = pos.shape[1], phys.shape[1]
    R, L = blocks.shape
    BS, L8 = R // max(W, 1), L * blocks.element_size() // 8
    if not checked:
        check_arg("x", x, (T, H))
        check_arg("phys", phys, (T, k))
        check_arg("w", w, (T, k), torch.float32)
        check_arg("pos", pos, (T, W), torch.int64)
        check_arg("blocks", blocks, (R, L), x.dtype)
        if R != W * BS or BS <= T or L8 * 8 != L * blocks.element_size() or L8 < local_experts + 2:
            raise ValueError(f"blocks must be [W * BS, L] with BS > T={T} rows per block and a header row holding "
                             f"{local_experts + 2} int64 words, got {tuple(blocks.shape)} {blocks.dtype} for W={W}")
    if T:
        _PACK((T,), x, phys, w, blocks.view(torch.int64), pos, blocks, T, W, H, W * local_experts, local_experts, L,
              hm, BS, 1, BS * L8, K=k, KP=_pow2(k), BLOCK=BLOCK_H, num_warps=4)


def unpack_rows(recv: torch.Tensor, tab: torch.Tensor, counts: torch.Tensor, index: torch.Tensor,
                pair_rows: torch.Tensor, pair_weights: torch.Tensor, rank: int, hm: int) -> None:
    """recv [R_in, L] rows by source, tab [W, P_local + 2] the received table -> counts [P_local] int64,
    index [M] int32, pair_rows [R_in, k] int32, pair_weights [R_in, k] float32 (module docstring). With no
    rows received, counts is zeroed (no program runs)."""
    R, L = recv.shape
    W, C = tab.shape
    k = pair_rows.shape[1] if pair_rows.dim() == 2 else 0
    check_arg("recv", recv, (R, L))
    check_arg("tab", tab, (W, C), torch.int64)
    check_arg("counts", counts, (C - 2,), torch.int64)
    check_arg("index", index, (index.shape[0],), torch.int32)
    check_arg("pair_rows", pair_rows, (R, k), torch.int32)
    check_arg("pair_weights", pair_weights, (R, k), torch.float32)
    if not R:
        counts.zero_()
        return
    _UNPACK((R,), recv, tab, counts, index, index, pair_rows, pair_weights, 0, rank, W, C - 2, L, hm, 0, C, 0, 0, 0,
            K=k, KP=_pow2(k), WB=max(2, _pow2(W)),
            PLB=max(2, _pow2(C - 2)), FIXED=False, BLOCK=BLOCK_H, num_warps=1)


def unpack_blocks(recv: torch.Tensor, counts: torch.Tensor, xe: torch.Tensor, pair_rows: torch.Tensor,
                  pair_weights: torch.Tensor, err_addr: int, rank: int, world_size: int, hm: int,
                  checked: bool = False) -> None:
    """Fixed blocks received: recv [W * BS, L] (source s's block: its header row, then its rows) -> counts
    [P_local] int64, xe [P_local, CAP, H] the masked batch (expert e's rows from lower sources first; padding
    rows untouched), pair_rows [W * BS, k] int32 (flat row of xe, -1: header, padding or elsewhere),
    pair_weights [W * BS, k] float32 (0 there). Ids outside [0, P) in any header set the int32 error word at
    err_addr (pinned host memory) to (1, 4, -1). checked: the caller made every output itself (as pack_blocks)."""
    R, L = recv.shape
    P_local, CAP, H = xe.shape
    W, k = world_size, pair_rows.shape[1]
    BS, L8 = R // max(W, 1), L * recv.element_size() // 8
    if not checked:
        check_arg("recv", recv, (R, L))
        check_arg("counts", counts, (P_local,), torch.int64)
        check_arg("xe", xe, (P_local, CAP, H), recv.dtype)
        check_arg("pair_rows", pair_rows, (R, k), torch.int32)
        check_arg("pair_weights", pair_weights, (R, k), torch.float32)
        if R != W * BS or BS < 1 or L8 * 8 != L * recv.element_size() or L8 < P_local + 2 or H > L:
            raise ValueError(f"recv must be [W={W} * BS, L] blocks with a header row of {P_local + 2} int64 words "
                             f"and rows of at least H={H}, got {tuple(recv.shape)} {recv.dtype}")
    if R:
        _UNPACK((R,), recv, recv.view(torch.int64), counts, counts, xe, pair_rows, pair_weights, err_addr, rank, W,
                P_local, L, hm, H, BS * L8, BS, 1, CAP, K=k, KP=_pow2(k),
                WB=max(2, _pow2(W)), PLB=max(2, _pow2(P_local)), FIXED=True,
                BLOCK=BLOCK_H, num_warps=4)


def partial_rows(y: torch.Tensor, pair_rows: torch.Tensor, pair_weights: torch.Tensor, out: torch.Tensor,
                 checked: bool = False) -> None:
    """out [R_in, H] = per received row, sum_j pair_weights[r, j] * y[pair_rows[r, j]] (float32; -1 skipped).
    checked: the caller made pair_rows, pair_weights and out itself and checked y (a comm's combine)."""
    R, k = pair_rows.shape
    H = y.shape[1]
    if not checked:
        check_arg("y", y, (y.shape[0], H))
        check_arg("pair_rows", pair_rows, (R, k), torch.int32)
        check_arg("pair_weights", pair_weights, (R, k), torch.float32)
        check_arg("out", out, (R, H), y.dtype)
    if R:
        _PARTIAL((R, triton.cdiv(H, BLOCK_H)), y, pair_rows, pair_weights, out, H, K=k,
                 KP=_pow2(k), BLOCK=BLOCK_H, num_warps=4)


def sum_home(home: torch.Tensor, tab: torch.Tensor | None, pos: torch.Tensor, out: torch.Tensor,
             block_rows: int = 0, checked: bool = False) -> None:
    """out [T, H] = per token, the sum over ranks d with pos[t, d] >= 0 of home's row start_d + pos[t, d]
    (start_d: rows sent to lower ranks, from the send table tab [W, P_local + 2]; with block_rows = BS > 0,
    fixed blocks: start_d = d * BS + 1 and tab is not read, None allowed); float32 sum. checked: the caller
    made every argument itself (a comm's combine)."""
    T, H = out.shape
    W = pos.shape[1] if pos.dim() == 2 else 0
    if not checked:
        check_arg("home", home, (home.shape[0], H), out.dtype)
        check_arg("pos", pos, (T, W), torch.int64)
    if block_rows:
        if not checked and home.shape[0] != W * block_rows:
            raise ValueError(f"home must hold W={W} blocks of block_rows={block_rows} rows, got {home.shape[0]}")
        tab, C = pos, 2  # not read
    else:
        C = tab.shape[1]
        if not checked:
            check_arg("tab", tab, (W, C), torch.int64)
    if T:
        _SUM_HOME((T, triton.cdiv(H, BLOCK_H)), home, tab, pos, out, W, H, C - 2, block_rows, int(block_rows > 0),
                  FIXED=block_rows > 0, BLOCK=BLOCK_H, num_warps=4)
