"""Align rows to GEMM blocks per expert: the sort step in front of the Triton grouped GEMM.

Dimension legend: T tokens, k experts per token, N rows to align (T*k (token, k) pairs on the unsorted
path, rows of the batch otherwise), E experts, BM block_m (the GEMM's M tile), R = static upper bound
of the rows after padding (a multiple of BM), NB = R // BM blocks, C chunk of ids per program,
S sub-chunk, NBIN histogram bins (a power of two > E; the last bin collects padding and bad ids).

The result (`Alignment`) lists, per expert, its rows padded up to a multiple of BM: `sorted_ids[R]`
holds a row id (< N) or the sentinel N for padding, `expert_ids[NB]` the expert of each BM block,
`padded_counts[E]` each expert's rows after padding and `num_padded[1]` their sum. Sizes are static
upper bounds (N + min(E, N) * (BM - 1), rounded up to BM; E * ceil(cap / BM) * BM for the masked
layout), so nothing syncs with the host and the kernels can be captured in a CUDA graph. Entries
past `num_padded` are never written: the GEMM stops there.

Three layouts:
- unsorted (`moe_align`): expert ids of N rows in any order (topk_ids flattened). Three kernels:
  per-chunk histograms, a grid turning them into per-chunk write offsets and block owners (each program
  sums the histograms itself, then writes its share), and a stable scatter (rows keep their order within
  an expert).
- contiguous (`moe_align_contiguous`): rows already sorted by expert plus counts [E]; one program per
  expert writes its rows' ids and padding, no sort.
- masked (`moe_align_masked`): x [E, cap, H] flattened to E*cap rows; expert e owns rows
  e*cap .. e*cap + counts[e]. Same kernel as contiguous with fixed row starts.
kernels/moe_capacity.py moves any of these to fixed strides (expert e's aligned rows at e*cap: the masked
layout).
Ids outside [0, E) and counts outside their range are dropped by the kernels (never read, never
computed). With `validate=True` the wrappers check them: ValueError at once on the CPU, an
asynchronous device assert on a GPU (no host sync; it surfaces at the next synchronisation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from nanomoe_kernels.checks import check_values


class Alignment(NamedTuple):
    """Rows grouped by expert and padded to `block_m`; every tensor lives on the rows' device.

    sorted_ids [R] int32: row id, or `num_rows` (the sentinel) for padding.
    expert_ids [R // block_m] int32: the expert of each block_m block of sorted_ids.
    num_padded [1] int32: rows used in sorted_ids (a multiple of block_m).
    padded_counts [E] int32: rows of each expert after padding (kernels.moe_blocks reads them).
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int
    num_rows: int
    padded_counts: torch.Tensor


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n, E, C: tl.constexpr, NBIN: tl.constexpr):
    # counts [num_chunks, E]: how many of this chunk's ids name each expert
    chunk = tl.program_id(0)
    offs = chunk * C + tl.arange(0, C)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
    ids = tl.where((ids >= 0) & (ids < E), ids, NBIN - 1)
    hist = tl.histogram(ids, NBIN)
    bins = tl.arange(0, NBIN)
    tl.store(counts_ptr + chunk * E + bins, hist, mask=bins < E)


@triton.jit
def _offsets_kernel(counts_ptr, base_ptr, sorted_ids_ptr, expert_ids_ptr, seg_ptr,
                    num_chunks, E, n, BM: tl.constexpr, NBIN: tl.constexpr, CB: tl.constexpr, BB: tl.constexpr):
    # every program: totals per expert -> padded segments; program p then writes the chunk offsets and the
    # segment tails of experts e = p mod P, and every P-th run of BB entries of expert_ids (a single program
    # walking every block took 38 us at 128 experts x 32k rows, 76 us on the 16-row alignment: H200, run 268)
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    bins = tl.arange(0, NBIN)
    live = bins < E
    mine = live & (bins % P == pid)
    rows = tl.arange(0, CB)
    totals = tl.zeros([NBIN], dtype=tl.int32)
    for c0 in range(0, num_chunks, CB):
        m = ((c0 + rows) < num_chunks)[:, None] & live[None, :]
        tile = tl.load(counts_ptr + (c0 + rows)[:, None] * E + bins[None, :], mask=m, other=0)
        totals += tl.sum(tile, axis=0)
    padded = (totals + BM - 1) // BM * BM
    seg_end = tl.cumsum(padded, axis=0)
    seg_start = seg_end - padded
    if pid == 0:
        # seg [E + 1]: padded rows per expert, then their sum (num_padded)
        tl.store(seg_ptr + bins, padded, mask=live)
        tl.store(seg_ptr + E, tl.sum(padded, axis=0))
    # base [num_chunks, E]: exclusive prefix over chunks, offset by the expert's segment start
    running = seg_start
    for c0 in range(0, num_chunks, CB):
        m = ((c0 + rows) < num_chunks)[:, None] & live[None, :]
        ptrs = (c0 + rows)[:, None] * E + bins[None, :]
        tile = tl.load(counts_ptr + ptrs, mask=m, other=0)
        tl.store(base_ptr + ptrs, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=m & mine[None, :])
        running += tl.sum(tile, axis=0)
    # the sentinel in each segment's tail (fewer than BM slots per expert)
    for j0 in range(0, BM, 16):
        j = j0 + tl.arange(0, 16)
        pos = (seg_start + totals)[:, None] + j[None, :]
        tl.store(sorted_ids_ptr + pos, n, mask=mine[:, None] & (pos < seg_end[:, None]))
    # block b belongs to the expert whose segment holds row b*BM: count segments ending at or before it
    nblocks = tl.sum(padded, axis=0) // BM
    blk = tl.arange(0, BB)
    for b0 in range(pid * BB, nblocks, P * BB):
        b = b0 + blk
        owner = tl.sum(((seg_end[None, :] <= b[:, None] * BM) & live[None, :]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, owner, mask=b < nblocks)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, sorted_ids_ptr, n, E, C: tl.constexpr, S: tl.constexpr,
                    NBIN: tl.constexpr):
    # stable: row i lands at base[chunk, e] + (earlier rows of e in this chunk); base advances per sub-chunk
    chunk = tl.program_id(0)
    sub = tl.arange(0, S)
    bins = tl.arange(0, NBIN)
    row_base = base_ptr + chunk * E
    for s0 in range(0, C, S):
        offs = chunk * C + s0 + sub
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1).to(tl.int32)
        ok = (ids >= 0) & (ids < E)
        same = (ids[:, None] == ids[None, :]) & (sub[None, :] < sub[:, None]) & ok[None, :]
        rank = tl.sum(same.to(tl.int32), axis=1)
        base = tl.load(row_base + ids, mask=ok, other=0)
        tl.store(sorted_ids_ptr + base + rank, offs, mask=ok)
        hist = tl.histogram(tl.where(ok, ids, NBIN - 1), NBIN)
        # all threads must have read base before it moves on (and see the new value after)
        tl.debug_barrier()
        cur = tl.load(row_base + bins, mask=bins < E, other=0)
        tl.store(row_base + bins, cur + hist, mask=bins < E)
        tl.debug_barrier()


@triton.jit
def _align_counts_kernel(counts_ptr, sorted_ids_ptr, expert_ids_ptr, seg_ptr, E, n, cap,
                         MASKED: tl.constexpr, BM: tl.constexpr, NBIN: tl.constexpr, BLK: tl.constexpr):
    # program e: expert e's rows (already grouped) and its padding, written at its padded offset
    e = tl.program_id(0)
    bins = tl.arange(0, NBIN)
    cnt = tl.load(counts_ptr + bins, mask=bins < E, other=0).to(tl.int32)
    cnt = tl.maximum(cnt, 0)
    if MASKED:
        start = bins * cap
        cnt = tl.minimum(cnt, cap)
    else:
        start = tl.cumsum(cnt, axis=0) - cnt
        cnt = tl.maximum(tl.minimum(cnt, n - start), 0)  # rows past n do not exist: never read them
    padded = (cnt + BM - 1) // BM * BM
    seg_start = tl.cumsum(padded, axis=0) - padded
    mine = bins == e
    my_cnt = tl.sum(tl.where(mine, cnt, 0), axis=0)
    my_start = tl.sum(tl.where(mine, start, 0), axis=0)
    my_seg = tl.sum(tl.where(mine, seg_start, 0), axis=0)
    my_pad = tl.sum(tl.where(mine, padded, 0), axis=0)
    if e == 0:
        tl.store(seg_ptr + bins, padded, mask=bins < E)
        tl.store(seg_ptr + E, tl.sum(padded, axis=0))
    j = tl.arange(0, BLK)
    for i0 in range(0, my_pad, BLK):
        i = i0 + j
        ids = tl.where(i < my_cnt, my_start + i, n)
        tl.store(sorted_ids_ptr + my_seg + i, ids, mask=i < my_pad)
    for b0 in range(0, my_pad // BM, BLK):
        b = b0 + j
        tl.store(expert_ids_ptr + my_seg // BM + b, e + 0 * b, mask=b < my_pad // BM)


_OFFSET_PROGRAMS = 128  # each recomputes the per-expert totals: more buys nothing once every block has a program


def _bins(num_experts: int) -> int:
    return triton.next_power_of_2(num_experts + 1)


def _empty(rows: int, block_m: int, num_rows: int, E: int, device: torch.device) -> Alignment:
    R = triton.cdiv(rows, block_m) * block_m
    seg = torch.empty(E + 1, dtype=torch.int32, device=device)
    return Alignment(torch.empty(R, dtype=torch.int32, device=device),
                     torch.empty(R // block_m, dtype=torch.int32, device=device),
                     seg[E:], block_m, num_rows, seg[:E])


def _check_block_m(block_m: int) -> None:
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m!r}")


def _check_ids(name: str, t: object, dims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    return t


def chunk_rows(n: int) -> int:
    """Rows per histogram chunk for n rows (a power of two, >= 16): all n up to 128, else 128-1024 rows, ~128
    chunks once n passes 16k. The scatter walks its chunk 128 rows at a time, serially (H200, run 270: 8k rows in
    1024-row chunks 16.5 us, in 256-row chunks 5.1; 512 rows in one chunk 11.3)."""
    if n <= 128:
        return max(16, triton.next_power_of_2(n))
    return min(1024, max(128, triton.next_power_of_2(triton.cdiv(n, 128))))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, validate: bool = False,
              chunk: int | None = None) -> Alignment:
    """Sort the rows of `topk_ids` ([T, k] or [N]; row r = flat index t*k + j) by expert, padded to block_m.

    Stable within an expert. Rows with an id outside [0, num_experts) are left out (`validate=True`
    checks for them: ValueError on the CPU, an async device assert on a GPU). `chunk`: rows per histogram
    chunk, a power of two >= 16 (default `chunk_rows(N)`); the result does not depend on it.
    """
    _check_ids("topk_ids", topk_ids, (1, 2))
    _check_block_m(block_m)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n = ids.numel()
    if validate and n:
        check_values(((ids >= 0) & (ids < num_experts)).all(),
                      f"topk_ids holds expert ids outside [0, {num_experts})")
    out = _empty(n + min(num_experts, n) * (block_m - 1), block_m, n, num_experts, ids.device)
    if n == 0:
        out.padded_counts.zero_(), out.num_padded.zero_()
        return out
    C = chunk_rows(n) if chunk is None else chunk
    S = min(C, 128)
    num_chunks = triton.cdiv(n, C)
    # counts, then each chunk's first write slot per expert, both [num_chunks, E]
    counts = torch.empty(2, num_chunks, num_experts, dtype=torch.int32, device=ids.device)
    nbin = _bins(num_experts)
    _count_kernel[(num_chunks,)](ids, counts[0], n, num_experts, C=C, NBIN=nbin)
    bb = max(1, min(64, 8192 // nbin))
    # programs over expert_ids' static bound (nothing read from the device): those past the blocks in use idle
    grid = (min(triton.cdiv(out.expert_ids.numel(), bb), _OFFSET_PROGRAMS),)
    _offsets_kernel[grid](counts[0], counts[1], out.sorted_ids, out.expert_ids, out.padded_counts, num_chunks,
                          num_experts, n, BM=block_m, NBIN=nbin, CB=max(1, min(16, 8192 // nbin)), BB=bb)
    _scatter_kernel[(num_chunks,)](ids, counts[1], out.sorted_ids, n, num_experts, C=C, S=S, NBIN=nbin)
    return out


def _align_counts(counts: torch.Tensor, block_m: int, n: int, cap: int, masked: bool) -> Alignment:
    E = counts.shape[0]
    bound = E * triton.cdiv(cap, block_m) * block_m if masked else n + min(E, n) * (block_m - 1)
    out = _empty(bound, block_m, n, E, counts.device)
    if n == 0 or E == 0:
        out.padded_counts.zero_(), out.num_padded.zero_()
        return out
    _align_counts_kernel[(E,)](counts.contiguous(), out.sorted_ids, out.expert_ids, out.padded_counts, E, n,
                               cap, MASKED=masked, BM=block_m, NBIN=_bins(E), BLK=64)
    return out


def moe_align_contiguous(counts: torch.Tensor, num_rows: int, block_m: int, validate: bool = False
                         ) -> Alignment:
    """Align a batch whose `num_rows` rows are already sorted by expert, counts [E] rows per expert.

    No sort: expert e's rows are offsets[e] .. offsets[e] + counts[e] (offsets = exclusive cumsum).
    Counts must be >= 0 and sum to at most num_rows; rows past num_rows are never read (`validate=True`
    checks it).
    """
    _check_ids("counts", counts, (1,))
    _check_block_m(block_m)
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if validate and counts.numel():
        check_values((counts >= 0).all() & (counts.sum() <= num_rows),
                      f"counts must be >= 0 and sum to at most the {num_rows} rows")
    return _align_counts(counts, block_m, num_rows, 0, masked=False)


def moe_align_masked(counts: torch.Tensor, capacity: int, block_m: int, validate: bool = False) -> Alignment:
    """Align the masked layout [E, capacity, H] seen as E*capacity rows: expert e owns e*capacity + i,
    i < counts[e]. Counts must lie in [0, capacity]; they are clamped to it, never read past
    (`validate=True` checks them).
    """
    _check_ids("counts", counts, (1,))
    _check_block_m(block_m)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if validate and counts.numel():
        check_values(((counts >= 0) & (counts <= capacity)).all(),
                      f"counts must lie in [0, capacity={capacity}]")
    return _align_counts(counts, block_m, counts.shape[0] * capacity, capacity, masked=True)
