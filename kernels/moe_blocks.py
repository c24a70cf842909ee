"""Block tables over an alignment: full BM-row blocks plus TM-row tail blocks per expert (Triton).

Dimension legend: E experts, TM the alignment's block (each expert's rows padded to a multiple of TM),
BM > TM the GEMM's main tile rows (a multiple of TM), NM / NT static upper bounds of main / tail
blocks, NBIN histogram-style bins (a power of two > E).

Why: with segments padded to BM, an expert with 257 rows and BM = 128 pays for 384 rows of MMA
(about 20% waste at 256 rows per expert with uniform routing). Padding to TM = 64 instead and
covering each segment with floor(p / BM) main blocks plus (p mod BM) / TM tail blocks computes at
most TM - 1 padding rows per expert; the tails run as a second, small launch with BLOCK_M = TM.
Tables are device tensors of static size (no host sync): `main_rows[NM]` (first aligned row of each
block), `main_experts[NM]`, `tail_rows[NT]`, `tail_experts[NT]`, `counts[2]` = (main, tail) used, and
the merged list for a single launch: `merged_rows[NM + NT]`, `merged_codes[NM + NT]` = expert | 2^30
for a tail block, each expert's main blocks followed by its tail blocks (so they run side by side), and per
expert its first merged entry and its entry count, `expert_first[E]`, `expert_blocks[E]` (a GEMM's
program order then groups only blocks of one expert: expert_group below), and `merged_tails[NM + NT]`, the
carried-tail flags of kernels/fused_moe_wgmma_tail.py: for TN = 32 (bits 0-1) and TN = 16 (bits 2-3), bit 0 / 2
on an expert's last main block when its tail has at most TN real rows (the tail's row TN is padding: alignments
put padding last), bit 1 / 3 on that tail block. One launch fills every list, BB entries per program.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_align import Alignment


class BlockTables(NamedTuple):
    """Blocks of BM rows (main) and TM rows (tail) over an alignment; see the module docstring."""

    main_rows: torch.Tensor
    main_experts: torch.Tensor
    tail_rows: torch.Tensor
    tail_experts: torch.Tensor
    counts: torch.Tensor
    merged_rows: torch.Tensor
    merged_codes: torch.Tensor
    merged_tails: torch.Tensor
    expert_first: torch.Tensor
    expert_blocks: torch.Tensor
    block_m: int
    tail_m: int


@triton.jit
def _tables_kernel(padded_ptr, ids_ptr, main_rows_ptr, main_experts_ptr, tail_rows_ptr, tail_experts_ptr,
                   counts_ptr, merged_rows_ptr, merged_codes_ptr, merged_tails_ptr, first_ptr, nblocks_ptr, E,
                   num_rows, P_MAIN, P_TAIL, BM: tl.constexpr,
                   TM: tl.constexpr, NBIN: tl.constexpr, BB: tl.constexpr):
    # BB entries per program: programs [0, P_MAIN) of the main list, the next P_TAIL of the tail list, the
    # rest of the merged list; each recomputes the per-expert sums (NBIN values) instead of waiting on another
    pid = tl.program_id(0)
    bins = tl.arange(0, NBIN)
    live = bins < E
    padded = tl.load(padded_ptr + bins, mask=live, other=0)
    seg_start = tl.cumsum(padded, axis=0) - padded
    n_main = padded // BM
    n_tail = (padded - n_main * BM) // TM
    if pid == 0:
        tl.store(counts_ptr, tl.sum(n_main, axis=0))
        tl.store(counts_ptr + 1, tl.sum(n_tail, axis=0))
        tl.store(first_ptr + bins, tl.cumsum(n_main + n_tail, axis=0) - n_main - n_tail, mask=live)
        tl.store(nblocks_ptr + bins, n_main + n_tail, mask=live)
    if pid < P_MAIN:
        main_end = tl.cumsum(n_main, axis=0)
        _fill_chunk(main_rows_ptr, main_experts_ptr, pid * BB, tl.sum(n_main, axis=0), main_end,
                    main_end - n_main, seg_start, BM, live, bins, BB)
    elif pid < P_MAIN + P_TAIL:
        tail_end = tl.cumsum(n_tail, axis=0)
        _fill_chunk(tail_rows_ptr, tail_experts_ptr, (pid - P_MAIN) * BB, tl.sum(n_tail, axis=0), tail_end,
                    tail_end - n_tail, seg_start + n_main * BM, TM, live, bins, BB)
    else:
        # merged: expert e's entries are its n_main main blocks, then its n_tail tail blocks
        n_all = n_main + n_tail
        all_end = tl.cumsum(n_all, axis=0)
        all_start = all_end - n_all
        i = (pid - P_MAIN - P_TAIL) * BB + tl.arange(0, BB)
        owner = tl.sum(((all_end[None, :] <= i[:, None]) & live[None, :]).to(tl.int32), axis=1)
        sel = bins[None, :] == owner[:, None]
        j = i - tl.sum(tl.where(sel, all_start[None, :], 0), axis=1)
        nm = tl.sum(tl.where(sel, n_main[None, :], 0), axis=1)
        seg = tl.sum(tl.where(sel, seg_start[None, :], 0), axis=1)
        tail = j >= nm
        row = seg + tl.where(tail, nm * BM + (j - nm) * TM, j * BM)
        ok = i < tl.sum(n_all, axis=0)
        tl.store(merged_rows_ptr + i, row, mask=ok)
        tl.store(merged_codes_ptr + i, owner | tl.where(tail, 0x40000000, 0), mask=ok)
        # carried tails: the expert's last main block and its (first) tail block, when that tail is short
        has_tail = tl.sum(tl.where(sel, n_tail[None, :], 0), axis=1) > 0
        pair = ok & (nm > 0) & has_tail & ((j == nm - 1) | (j == nm))
        t_row = seg + nm * BM
        bit = tl.where(tail, 2, 1)
        flags = tl.zeros_like(bit)
        if TM > 32:
            flags = tl.where(pair & (tl.load(ids_ptr + t_row + 32, mask=pair, other=0) >= num_rows), bit, 0)
        if TM > 16:
            flags |= tl.where(pair & (tl.load(ids_ptr + t_row + 16, mask=pair, other=0) >= num_rows), bit * 4, 0)
        tl.store(merged_tails_ptr + i, flags, mask=ok)


@triton.jit
def _fill_chunk(rows_ptr, experts_ptr, i0, used, ends, starts, seg_first, step, live, bins, BB: tl.constexpr):
    # entry i belongs to expert e with starts[e] <= i < ends[e]: row = seg_first[e] + (i - starts[e]) * step
    i = i0 + tl.arange(0, BB)
    owner = tl.sum(((ends[None, :] <= i[:, None]) & live[None, :]).to(tl.int32), axis=1)
    sel = bins[None, :] == owner[:, None]
    first = tl.sum(tl.where(sel, seg_first[None, :], 0), axis=1)
    lo = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
    tl.store(rows_ptr + i, first + (i - lo) * step, mask=i < used)
    tl.store(experts_ptr + i, owner, mask=i < used)


def block_tables(align: Alignment, block_m: int) -> BlockTables:
    """Main blocks of `block_m` rows and tail blocks of `align.block_m` rows covering every expert's
    padded segment; block_m must be a multiple of align.block_m. One launch, no host sync."""
    tm = align.block_m
    if block_m <= tm or block_m % tm:
        raise ValueError(f"block_m ({block_m}) must be a multiple of the alignment block ({tm}) and larger")
    E = align.padded_counts.numel()
    R = align.sorted_ids.numel()
    dev = align.sorted_ids.device
    n_main, n_tail = R // block_m, min(R // tm, E * (block_m // tm - 1))
    buf = torch.empty(5 * n_main + 5 * n_tail + 2 + 2 * E, dtype=torch.int32, device=dev)
    n_all = n_main + n_tail
    main_rows, main_experts, tail_rows, tail_experts, counts, merged_rows, merged_codes, merged_tails, first, \
        nblocks = torch.split(buf, [n_main, n_main, n_tail, n_tail, 2, n_all, n_all, n_all, E, E])
    if E:
        nbin = triton.next_power_of_2(E + 1)
        bb = max(1, min(64, 8192 // nbin))
        # one program per bb entries of each list's static bound (those past the used count store nothing):
        # the single-program loop this replaced took 68 us at 32 experts and 315 us at 256 (4096 tokens, H200)
        p_main, p_tail = triton.cdiv(n_main, bb), triton.cdiv(n_tail, bb)
        grid = (max(1, p_main + p_tail + triton.cdiv(n_main + n_tail, bb)),)
        _tables_kernel[grid](align.padded_counts, align.sorted_ids, main_rows, main_experts, tail_rows, tail_experts,
                             counts, merged_rows, merged_codes, merged_tails, first, nblocks, E, align.num_rows,
                             p_main, p_tail, BM=block_m, TM=tm, NBIN=nbin, BB=bb)
    else:
        counts.zero_()
    return BlockTables(main_rows, main_experts, tail_rows, tail_experts, counts, merged_rows, merged_codes,
                       merged_tails, first, nblocks, block_m, tm)


GROUP_BYTES = 24 << 20  # the A rows one expert group may hold in L2 while its programs sweep the column tiles


def expert_group_blocks(setting: bool | int, block_m: int, depth: int, itemsize: int, group_m: int) -> int:
    """Most blocks of one expert in one program group (expert_group's G; 0: groups of group_m blocks whatever
    their experts) for a GEMM config's EXPERT_GROUPS setting: False -> 0, an int -> itself, True -> as many
    BLOCK_M-row A tiles of `depth` columns as GROUP_BYTES hold, at least group_m and at most 64."""
    if setting is True:
        return max(group_m, min(64, GROUP_BYTES // max(1, block_m * depth * itemsize)))
    return int(setting)


@triton.jit
def expert_group(pid, num_pid_n, codes_ptr, first_ptr, nblocks_ptr, G: tl.constexpr):
    """(pid_m, pid_n) of program pid over a merged list when groups never straddle experts: expert e's blocks
    split into ceil(n_e / G) groups of near-equal size, each group's programs consecutive (pids num_pid_n *
    [g0, g0 + size)), its blocks first then its column tiles, so the group's blocks read each weight tile of e
    side by side. pid must be < num_pid_n * (blocks in use)."""
    q = pid // num_pid_n  # a block of pid's group: the group's pids cover num_pid_n x its blocks
    e = tl.load(codes_ptr + q) & 0x3FFFFFFF
    f = tl.load(first_ptr + e)
    nb = tl.load(nblocks_ptr + e)
    groups = (nb + G - 1) // G
    base = nb // groups
    extra = nb - base * groups  # the first `extra` groups hold base + 1 blocks
    j = q - f
    big = extra * (base + 1)
    g = tl.where(j < big, j // (base + 1), extra + (j - big) // base)
    g0 = f + g * base + tl.minimum(g, extra)
    size = base + (g < extra).to(tl.int32)
    local = pid - g0 * num_pid_n
    return g0 + local % size, local // size
