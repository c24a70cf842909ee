"""The `nvlink` comm's decode-time routing plan in one Triton launch (what nvlink_plan.local_plan and the
`within` part of pair_rows compute with ~25 small torch ops).

Dimension legend: T tokens (T <= TB, a power of 2 <= 256), k experts per token, P physical slots,
P_local slots per rank, W ranks (<= WB), L = P + W entries of the count row.

Grid: one program per block of PB slots, plus one. A slot-block program builds the one-hot
[T, PB] "token t has a pair on slot p" (a token has at most one pair per slot: its k experts are
distinct and a slot holds one expert), whose column sums are the slot counts and whose exclusive
cumsum down the tokens is each pair's index among this rank's pairs of that slot (`within`), in
token order: the same numbers as the stable argsort of the torch path, so both paths lay rows out
identically. The last program computes each pair's destination rank, which ranks each token visits
(`has`), the token's row among those sent to each rank (`tok_idx`), the token counts per
destination, and advances the comm's epoch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ep_nvlink import _report

MAX_TOKENS = 256  # decode batches up to this take the one-launch plan; larger ones the torch path
SLOT_BLOCK = 32


@triton.jit
def _plan_kernel(phys_ptr, row_ptr, has_ptr, tok_idx_ptr, within_ptr, dest_ptr, epoch_ptr, err_addr, T, P, P_local,
                 W, K: tl.constexpr, KP: tl.constexpr, TB: tl.constexpr, PB: tl.constexpr, WB: tl.constexpr):
    b = tl.program_id(0)
    t = tl.arange(0, TB)
    tm = t < T
    jj = tl.arange(0, KP)
    # the whole [T, k] slot table in one load; column j is picked out in registers below
    tile = tl.load(phys_ptr + t[:, None] * K + jj[None, :], mask=tm[:, None] & (jj[None, :] < K), other=-1).to(tl.int64)
    if b < tl.num_programs(0) - 1:
        cols = b * PB + tl.arange(0, PB)
        oh = tl.zeros([TB, PB], dtype=tl.int32)
        for j in tl.static_range(K):
            s_j = tl.sum(tl.where(jj[None, :] == j, tile, 0), axis=1)
            oh += (s_j[:, None] == cols[None, :]).to(tl.int32)
        excl = tl.cumsum(oh, axis=0) - oh
        tl.store(row_ptr + cols, tl.sum(oh, axis=0).to(tl.int64), mask=cols < P)
        for j in tl.static_range(K):
            s_j = tl.sum(tl.where(jj[None, :] == j, tile, 0), axis=1)
            w_j = tl.sum(tl.where(s_j[:, None] == cols[None, :], excl, 0), axis=1)
            mine = tm & (s_j >= b * PB) & (s_j < b * PB + PB)
            tl.store(within_ptr + t * K + j, w_j.to(tl.int32), mask=mine)
    else:
        d = tl.arange(0, WB)
        hs = tl.zeros([TB, WB], dtype=tl.int32)
        for j in tl.static_range(K):
            s_j = tl.sum(tl.where(jj[None, :] == j, tile, 0), axis=1)
            d_j = tl.where(tm, s_j // P_local, -1)
            tl.store(dest_ptr + t * K + j, d_j.to(tl.int32), mask=tm)
            hs = tl.maximum(hs, (d_j[:, None] == d[None, :]).to(tl.int32))
        m2 = tm[:, None] & (d[None, :] < W)
        tl.store(has_ptr + t[:, None] * W + d[None, :], hs, mask=m2)
        tl.store(tok_idx_ptr + t[:, None] * W + d[None, :], tl.cumsum(hs, axis=0) - 1, mask=m2)
        tl.store(row_ptr + P + d, tl.sum(hs, axis=0).to(tl.int64), mask=d < W)
        tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)
        bad = tl.sum((tm[:, None] & (jj[None, :] < K) & ((tile < 0) | (tile >= P))).to(tl.int32))
        if bad > 0:  # an expert id outside [0, E) routed to a slot that does not exist: reported, never written
            _report(err_addr, 4, -1)


def plan_decode(phys: torch.Tensor, num_slots: int, world_size: int, epoch: torch.Tensor,
                err_addr: int) -> tuple[torch.Tensor, ...]:
    """phys [T, k] int32/int64 physical slots (T <= MAX_TOKENS) -> (row [P + W] int64, has [T, W] int32,
    tok_idx [T, W] int32, within [T, k] int32, dest [T, k] int32), and epoch += 1. A slot outside [0, P)
    sets the error word at err_addr (host-mapped int32 [4]: set, stage 4, -1)."""
    T, k = phys.shape
    P, W = num_slots, world_size
    if T > MAX_TOKENS:
        raise ValueError(f"plan_decode takes at most {MAX_TOKENS} tokens, got {T}")
    if phys.dtype not in (torch.int32, torch.int64) or not phys.is_contiguous():
        raise TypeError(f"phys must be contiguous int32/int64, got {phys.dtype}")
    if tuple(epoch.shape) != (1,) or epoch.dtype != torch.int64:
        raise TypeError("epoch must be a [1] int64 tensor")
    dev = phys.device
    row = torch.empty(P + W, dtype=torch.int64, device=dev)
    has = torch.empty((T, W), dtype=torch.int32, device=dev)
    tok_idx = torch.empty((T, W), dtype=torch.int32, device=dev)
    within = torch.empty((T, k), dtype=torch.int32, device=dev)
    dest = torch.empty((T, k), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(P, SLOT_BLOCK) + 1,)
    _plan_kernel[grid](phys, row, has, tok_idx, within, dest, epoch, err_addr, T, P, P // W, W, K=k,
                       KP=triton.next_power_of_2(k), TB=max(16, triton.next_power_of_2(T)), PB=SLOT_BLOCK,
                       WB=max(2, triton.next_power_of_2(W)), num_warps=8)
    return row, has, tok_idx, within, dest
