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

import torch

from nanomoe_fn.comm.plan import weighted_rows

META_BYTES_PER_PAIR = 12  # int32 slot id + float32 weight + int32 pair number
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # rows the Triton kernels take (GPUs)


def row_layout(hidden: int, dtype: torch.dtype, top_k: int) -> tuple[int, int]:
    """(HM, L): where the pair data starts and the row length, in elements of dtype (16-byte aligned)."""
    size = dtype.itemsize
    hm = -(-hidden * size // 16) * 16 // size
    meta = -(-top_k * META_BYTES_PER_PAIR // 16) * 16 // size
    return hm, hm + meta


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
