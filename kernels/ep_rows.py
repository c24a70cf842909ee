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
from nanomoe_kernels.ep_nvlink import check_arg
from nanomoe_kernels.launch import Launcher

BLOCK_H = 1024


@triton.jit
def _pack_kernel(x_ptr, phys_ptr, w_ptr, tab_ptr, pos_ptr, rows_ptr, T, W, H, P, P_local, L, HM, K: tl.constexpr,
                 KP: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, KP)
    jm = j < K
    slot = tl.load(phys_ptr + t * K + j, mask=jm, other=0).to(tl.int64)
    ok = jm & (slot >= 0) & (slot < P)
    nbad = tl.sum((jm & (ok == 0)).to(tl.int64), axis=0)
    dest = tl.where(ok, slot // P_local, -1)
    C = P_local + 2
    num = tl.atomic_add(tab_ptr + tl.where(ok, dest * C + slot % P_local, 0), tl.full([KP], 1, tl.int64), mask=ok,
                        sem="relaxed")
    wv = tl.load(w_ptr + t * K + j, mask=jm, other=0.0)
    for d in range(W):
        if nbad > 0:
            tl.atomic_add(tab_ptr + d * C + P_local + 1, nbad, sem="relaxed")
        if tl.sum((dest == d).to(tl.int32), axis=0) > 0:
            p = tl.atomic_add(tab_ptr + d * C + P_local, 1, sem="relaxed")  # this row's place in d's block
            tl.store(pos_ptr + t * W + d, p)
            row = rows_ptr + (d * T + p) * L
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
def _unpack_kernel(recv_ptr, tab_ptr, counts_ptr, index_ptr, prow_ptr, pw_ptr, rank, W, P_local, L, HM,
                   K: tl.constexpr, KP: tl.constexpr, WB: tl.constexpr, PLB: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    C = P_local + 2
    sw = tl.arange(0, WB)
    ew = tl.arange(0, PLB)
    got = tl.load(tab_ptr + sw[:, None] * C + ew[None, :], mask=(sw[:, None] < W) & (ew[None, :] < P_local),
                  other=0)  # [WB, PLB] pairs per (source, local expert)
    per_expert = tl.sum(got, axis=0)
    if r == 0:
        tl.store(counts_ptr + ew, per_expert, mask=ew < P_local)
    rows_from = tl.load(tab_ptr + sw * C + P_local, mask=sw < W, other=0)  # [WB] rows per source
    s = tl.sum((tl.cumsum(rows_from, axis=0) <= r).to(tl.int64), axis=0)  # the source whose block holds row r
    # base[s, e]: batch rows of lower experts, then of expert e from lower sources
    base = tl.cumsum(per_expert, axis=0) - per_expert + tl.sum(tl.where(sw[:, None] < s, got, 0), axis=0)
    j = tl.arange(0, KP)
    jm = j < K
    meta = (recv_ptr + r * L + HM).to(tl.pointer_type(tl.int32))
    slot = tl.load(meta + j, mask=jm, other=-1).to(tl.int64)
    wv = tl.load(meta.to(tl.pointer_type(tl.float32)) + K + j, mask=jm, other=0.0)
    num = tl.load(meta + 2 * K + j, mask=jm, other=0).to(tl.int64)
    here = jm & (slot >= 0) & (slot // P_local == rank)
    e = tl.where(here, slot % P_local, -1)
    first = tl.sum(tl.where(e[:, None] == ew[None, :], base[None, :], 0), axis=1)  # [KP] base[s, e_j]
    brow = tl.where(here, first + num, -1)
    tl.store(prow_ptr + r * K + j, brow.to(tl.int32), mask=jm)
    tl.store(pw_ptr + r * K + j, tl.where(here, wv, 0.0), mask=jm)
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
def _sum_home_kernel(home_ptr, tab_ptr, pos_ptr, out_ptr, W, H, P_local, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = tl.full([], 0, tl.int64)
    for d in range(W):
        p = tl.load(pos_ptr + t * W + d)
        v = tl.load(home_ptr + (start + p) * H + offs, mask=m & (offs * 0 + p >= 0), other=0.0)
        acc += v.to(tl.float32)
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
        _PACK((T,), x, phys, w, tab, pos, rows, T, W, H, W * (C - 2), C - 2, rows.shape[1], hm, K=k,
              KP=triton.next_power_of_2(k), BLOCK=BLOCK_H, num_warps=4)


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
    _UNPACK((R,), recv, tab, counts, index, pair_rows, pair_weights, rank, W, C - 2, L, hm, K=k,
                KP=triton.next_power_of_2(k), WB=max(2, triton.next_power_of_2(W)),
                PLB=max(2, triton.next_power_of_2(C - 2)), num_warps=1)


def partial_rows(y: torch.Tensor, pair_rows: torch.Tensor, pair_weights: torch.Tensor, out: torch.Tensor) -> None:
    """out [R_in, H] = per received row, sum_j pair_weights[r, j] * y[pair_rows[r, j]] (float32; -1 skipped)."""
    R, k = pair_rows.shape
    H = y.shape[1]
    check_arg("y", y, (y.shape[0], H))
    check_arg("pair_rows", pair_rows, (R, k), torch.int32)
    check_arg("pair_weights", pair_weights, (R, k), torch.float32)
    check_arg("out", out, (R, H), y.dtype)
    if R:
        _PARTIAL((R, triton.cdiv(H, BLOCK_H)), y, pair_rows, pair_weights, out, H, K=k,
                 KP=triton.next_power_of_2(k), BLOCK=BLOCK_H, num_warps=4)


def sum_home(home: torch.Tensor, tab: torch.Tensor, pos: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] = per token, the sum over ranks d with pos[t, d] >= 0 of home's row start_d + pos[t, d]
    (start_d: rows sent to lower ranks, from the send table tab [W, P_local + 2]); float32 sum."""
    T, H = out.shape
    W, C = tab.shape
    check_arg("home", home, (home.shape[0], H), out.dtype)
    check_arg("tab", tab, (W, C), torch.int64)
    check_arg("pos", pos, (T, W), torch.int64)
    if T:
        _SUM_HOME((T, triton.cdiv(H, BLOCK_H)), home, tab, pos, out, W, H, C - 2, BLOCK=BLOCK_H, num_warps=4)
