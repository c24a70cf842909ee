"""Token rows for the `torch` comm: one row per (token, destination rank), with the token's pairs packed in.

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P slots, P_local = P // W,
L row length, HM where the pair data starts in a row (both in elements of x's dtype), R_out rows sent,
R_in rows received, M batch rows (pairs this rank's experts take).

A row holds the token's H values, then (from element HM, 16-byte aligned) its k slot ids as int32, its k
weights as float32 and its k pair numbers as int32 (a pair's number among the sender's pairs of its slot: its
place among that sender's rows of that expert at the receiver), so one exchange moves the rows and
everything the receiver needs to place them: a token
crosses to a rank once however many of its k experts live there (DeepEP's normal-mode accounting), not once
per pair. The count table tab [W, P_local + 2] int64 holds, per destination rank d: this rank's pairs per
local expert of d, its rows to d, and the ids outside [0, P) found on this rank (in every row).

These are the torch-op versions (any device, any dtype, rows sent in token order; pack and unpack read
sizes on the host, a sync on GPUs: they are the CPU path); on GPUs with bf16, fp16 or fp32 rows the comm
runs the Triton kernels of kernels/ep_rows.py instead (rows in the order the programs ran, sent from
per-destination blocks). tests/test_token_rows.py checks one against the other.
"""

from __future__ import annotations

from typing import Any

import torch

from nanomoe_fn.comm.plan import KERNEL_DTYPES, weighted_rows

META_BYTES_PER_PAIR = 12  # int32 slot id + float32 weight + int32 pair number


def kernels_for(x: torch.Tensor) -> Any:
    """The Triton kernels (kernels/ep_rows.py) for rows of x on a GPU, else None (torch ops)."""
    if x.is_cuda and x.dtype in KERNEL_DTYPES:
        from nanomoe_kernels import ep_rows  # Triton: imported only on GPUs

        return ep_rows
    return None


def row_layout(hidden: int, dtype: torch.dtype, top_k: int) -> tuple[int, int]:
    """(HM, L): where the pair data starts and the row length, in elements of dtype (16-byte aligned)."""
    size = dtype.itemsize
    hm = -(-hidden * size // 16) * 16 // size
    meta = -(-top_k * META_BYTES_PER_PAIR // 16) * 16 // size
    return hm, hm + meta


def block_layout(hidden: int, dtype: torch.dtype, top_k: int, local_experts: int) -> tuple[int, int]:
    """(HM, L) of fixed-block rows: row_layout's, with L long enough for a header row's P_local + 2 int64 words."""
    hm, L = row_layout(hidden, dtype, top_k)
    return hm, max(L, -(-(local_experts + 2) * 8 // 16) * 16 // dtype.itemsize)


def pair_meta(rows: torch.Tensor, hm: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair data of rows [R, L]: (slot ids [R, k] int32, weights [R, k] float32, pair numbers [R, k]
    int32), views into rows."""
    words = rows[:, hm:].view(torch.int32)
    return words[:, :top_k], words[:, top_k:2 * top_k].view(torch.float32), words[:, 2 * top_k:3 * top_k]


def pack_rows(x: torch.Tensor, phys: torch.Tensor, w: torch.Tensor, P_local: int, W: int,
              hm: int, L: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], phys [T, k] slots, w [T, k] -> (tab [W, P_local + 2] int64, pos [T, W] int64: the token's row
    among the rows to d, -1 where it has none; rows [R_out, L]: the rows to rank 0, then to rank 1, ..., each
    block in token order)."""
    T, H = x.shape
    P, dev = W * P_local, x.device
    p = phys.long()
    ok = (p >= 0) & (p < P)
    dest = torch.where(ok, p // P_local, W)  # W: a trash column for ids outside [0, P)
    has = torch.zeros((T, W + 1), dtype=torch.bool, device=dev).scatter_(1, dest, True)[:, :W]
    tab = torch.zeros((W, P_local + 2), dtype=torch.int64, device=dev)
    pairs = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    flat = torch.where(ok, p, P).flatten()  # slot of each pair in token order, P for ids outside [0, P)
    pairs.index_add_(0, flat, torch.ones(p.numel(), dtype=torch.int64, device=dev))
    tab[:, :P_local] = pairs[:P].view(W, P_local)
    tab[:, P_local] = has.sum(0)
    tab[:, P_local + 1] = (~ok).sum()
    pos = torch.where(has, torch.cumsum(has.long(), 0) - 1, -1)
    first = torch.cumsum(tab[:, P_local], 0) - tab[:, P_local]  # [W] each block's first row
    packed = x.new_zeros((T, L))
    packed[:, :H] = x
    slots, weights, nums = pair_meta(packed, hm, p.shape[1])
    slots.copy_(phys)
    weights.copy_(w)
    # a pair's number: the earlier pairs (token order) of its slot
    order = torch.argsort(flat, stable=True)
    rank_in_slot = torch.empty_like(flat)
    rank_in_slot[order] = torch.arange(flat.numel(), device=dev) - (torch.cumsum(pairs, 0) - pairs)[flat[order]]
    nums.copy_(rank_in_slot.view(T, p.shape[1]))
    dst = torch.where(has, first + pos, -1)  # [T, W]
    tok = torch.arange(T, device=dev).unsqueeze(1).expand(T, W)[has]  # tokens, (t, d) in row-major order
    rows = packed.new_empty((int(tab[:, P_local].sum()), L))
    rows[dst[has]] = packed[tok]
    return tab, pos, rows


def unpack_rows(recv: torch.Tensor, M: int, P_local: int, rank: int, hm: int,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """recv [R_in, L] (sources' rows back to back, in rank order), M the pairs they hold for this rank's
    P_local experts -> (index [M] int64: the received row of each batch row, batch rows by
    local expert, then source rank, then receive order; pair_rows [R_in, k] int64: each pair's batch row, -1
    where the pair is elsewhere; pair_weights [R_in, k] float32, 0 there)."""
    R = recv.shape[0]
    slots, weights, _ = pair_meta(recv, hm, top_k)
    slots = slots.long()
    here = (slots >= 0) & (slots // P_local == rank)
    r = torch.arange(R, device=recv.device).unsqueeze(1)
    # rows of a source come after lower sources' rows, so (expert, received row) orders by expert, source, order
    key = torch.where(here, (slots % P_local) * max(R, 1) + r, P_local * max(R, 1))
    order = torch.argsort(key.flatten(), stable=True)[:M]
    pair_rows = torch.full((R * top_k,), -1, dtype=torch.int64, device=recv.device)
    pair_rows[order] = torch.arange(order.shape[0], device=recv.device)
    return order // top_k, pair_rows.view(R, top_k), torch.where(here, weights, 0.0)


def partial_rows(y: torch.Tensor, pair_rows: torch.Tensor, pair_weights: torch.Tensor) -> torch.Tensor:
    """Per received row r: sum_j pair_weights[r, j] * y[pair_rows[r, j]] (float32, -1 rows skipped) -> [R_in, H]
    in y's dtype."""
    return weighted_rows(y, pair_rows, pair_weights, mask=pair_rows >= 0)


def sum_home(home: torch.Tensor, sent: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """home [R_out, H] partial rows back in send order (sent [W] rows per destination block), pos [T, W] ->
    out [T, H]: per token the float32 sum of its rows, in home's dtype."""
    first = torch.cumsum(sent, 0) - sent
    at = torch.where(pos >= 0, first + pos, 0)  # [T, W]
    rows = home.index_select(0, at.flatten()).view(pos.shape[0], pos.shape[1], home.shape[1]).float()
    return torch.where((pos >= 0).unsqueeze(-1), rows, 0.0).sum(1).to(home.dtype)


def header_words(blocks: torch.Tensor, block_rows: int, columns: int) -> torch.Tensor:
    """The count table rows in the headers of fixed blocks [W * BS, L]: [W, columns] int64 (a strided view)."""
    return blocks.view(-1, block_rows, blocks.shape[1])[:, 0].view(torch.int64)[:, :columns]


def pack_blocks(x: torch.Tensor, phys: torch.Tensor, w: torch.Tensor, P_local: int, W: int, hm: int, L: int,
                block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed blocks (the torch comm's decode mode): (pos [T, W] int64, blocks [W * BS, L]): block d is a header
    row (the count table row for d in its first P_local + 2 int64 words) then the rows to d in token order,
    zeros after them. BS = block_rows > T."""
    tab, pos, rows = pack_rows(x, phys, w, P_local, W, hm, L)
    blocks = x.new_zeros((W * block_rows, L))
    header_words(blocks, block_rows, P_local + 2).copy_(tab)
    first = 0
    for d, n in enumerate(tab[:, P_local].tolist()):
        blocks[d * block_rows + 1: d * block_rows + 1 + n] = rows[first:first + n]
        first += n
    return pos, blocks


def unpack_blocks(recv: torch.Tensor, P_local: int, rank: int, W: int, hm: int, top_k: int, cap: int,
                  hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed blocks received, recv [W * BS, L] -> (xe [P_local, cap, H] the masked batch (padding rows zero),
    counts [P_local], pair_rows [W * BS, k] int64 (flat row of xe; -1: header, padding or elsewhere),
    pair_weights [W * BS, k] float32, bad [W] ids outside [0, P) per source). Inside
    an expert: sources in rank order, each source's rows in its order."""
    R, BS = recv.shape[0], recv.shape[0] // W
    tab = header_words(recv, BS, P_local + 2)
    n = tab[:, P_local].tolist()
    at = torch.cat([torch.arange(s * BS + 1, s * BS + 1 + n[s], device=recv.device) for s in range(W)])
    M = int(tab[:, :P_local].sum())
    index, prow, pw = unpack_rows(recv.index_select(0, at), M, P_local, rank, hm, top_k)
    counts = tab[:, :P_local].sum(0)
    expert = torch.repeat_interleave(torch.arange(P_local, device=recv.device), counts, output_size=M)
    flat = expert * cap + torch.arange(M, device=recv.device) - (torch.cumsum(counts, 0) - counts)[expert]
    xe = recv.new_zeros((P_local * cap, hidden))
    xe[flat] = recv[at[index], :hidden]
    pair_rows = torch.full((R, top_k), -1, dtype=torch.int64, device=recv.device)
    pair_weights = torch.zeros((R, top_k), dtype=torch.float32, device=recv.device)
    pair_rows[at] = torch.cat([flat, flat.new_full((1,), -1)])[torch.where(prow >= 0, prow, M)]
    pair_weights[at] = pw
    return xe.view(P_local, cap, hidden), counts, pair_rows, pair_weights, tab[:, P_local + 1].clone()


def sum_home_blocks(home: torch.Tensor, pos: torch.Tensor, block_rows: int) -> torch.Tensor:
    """home [W * BS, H] partial rows back in fixed blocks (block d's rows from row d * BS + 1), pos [T, W] ->
    out [T, H]: per token the float32 sum of its rows, in home's dtype."""
    W = pos.shape[1]
    sent = torch.full((W,), block_rows, dtype=torch.int64, device=home.device)
    return sum_home(home[1:] if home.shape[0] else home, sent, pos)
