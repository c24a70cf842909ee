"""Blocks sized to each expert for the swap-AB expert GEMM (kernels/fused_moe_swap.py), listed on the device.

Dimension legend: E experts, EP = next power of two >= E, R aligned rows (kernels.moe_align with block_m = GRAIN =
16), MOST = 288 rows a block at most, NB = cdiv(R, MOST) + E, the static bound of the blocks, BB blocks per program.

Expert e's c = padded_counts[e] aligned rows (a multiple of 16, starting at the exclusive cumsum of the padded
counts) are split into nb = ceil(c / MOST) blocks of ceil(c / nb) rows rounded up to 16; the last takes the rest.
So an expert of up to 288 rows is one block, and every block streams each weight tile once: the grouped kernel's
time follows its weight-tile streams, not its MMA rows (bench/results/expert_ffn_notes.md, runs 253-258).
Programs of BB blocks each write the lists (each sums the E counts itself); sizes are static, so nothing syncs
with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_align import Alignment

GRAIN, MOST = 16, 288


class SwapBlocks(NamedTuple):
    """The swap kernel's blocks over an alignment: rows [NB] (first aligned row), sizes [NB] (rows, a multiple of
    16 in 16..MOST; 0 past the used ones), experts [NB], count [1] blocks used (all int32, on the rows' device)."""

    rows: torch.Tensor
    sizes: torch.Tensor
    experts: torch.Tensor
    count: torch.Tensor


@triton.jit
def _swap_blocks_kernel(counts_ptr, rows_ptr, sizes_ptr, experts_ptr, count_ptr, E, NB, MOST: tl.constexpr,
                        GRAIN: tl.constexpr, EP: tl.constexpr, BB: tl.constexpr):
    # program p lists blocks p*BB .. p*BB + BB - 1; each program sums the E counts itself (a few hundred values)
    offs = tl.arange(0, EP)
    c = tl.load(counts_ptr + offs, mask=offs < E, other=0)
    nb = (c + MOST - 1) // MOST
    chunk = (c + tl.maximum(nb, 1) - 1) // tl.maximum(nb, 1)
    chunk = (chunk + GRAIN - 1) // GRAIN * GRAIN
    ends = tl.cumsum(nb, axis=0)               # expert e's blocks are ends[e] - nb[e] .. ends[e] - 1
    starts = tl.cumsum(c, axis=0) - c          # expert e's first aligned row
    total = tl.sum(nb, axis=0)
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(count_ptr, total)
    b = pid * BB + tl.arange(0, BB)
    e = tl.sum((ends[None, :] <= b[:, None]).to(tl.int32), axis=1)   # [BB]: the expert of block b
    mine = offs[None, :] == e[:, None]                                  # [BB, EP]
    c_e = tl.sum(tl.where(mine, c[None, :], 0), axis=1)
    chunk_e = tl.sum(tl.where(mine, chunk[None, :], 0), axis=1)
    j = b - tl.sum(tl.where(mine, (ends - nb)[None, :], 0), axis=1)
    row = tl.sum(tl.where(mine, starts[None, :], 0), axis=1) + j * chunk_e
    used = b < total
    tl.store(rows_ptr + b, tl.where(used, row, 0), mask=b < NB)
    tl.store(sizes_ptr + b, tl.where(used, tl.minimum(chunk_e, c_e - j * chunk_e), 0), mask=b < NB)
    tl.store(experts_ptr + b, tl.where(used, e, 0), mask=b < NB)


def max_swap_blocks(align: Alignment) -> int:
    """NB: the static bound of an alignment's swap blocks (sum over experts of ceil(c / MOST) <= R / MOST + E)."""
    return triton.cdiv(align.sorted_ids.numel(), MOST) + align.padded_counts.numel()


def swap_blocks(align: Alignment) -> SwapBlocks:
    """The swap kernel's block list for an alignment to GRAIN rows (see the module docstring); no host sync."""
    if align.block_m != GRAIN:
        raise ValueError(f"swap blocks need an alignment to {GRAIN} rows, got block_m={align.block_m}")
    E = align.padded_counts.numel()
    nb = max_swap_blocks(align)
    buf = torch.empty(3 * nb + 1, dtype=torch.int32, device=align.sorted_ids.device)   # one allocation
    rows, sizes, experts, count = buf[:nb], buf[nb:2 * nb], buf[2 * nb:3 * nb], buf[3 * nb:]
    if E:   # the kernel writes every entry, the count too
        ep = triton.next_power_of_2(E)
        bb = max(16, 4096 // ep)   # [BB, EP] tiles of 4096 values
        _swap_blocks_kernel[(triton.cdiv(nb, bb),)](align.padded_counts, rows, sizes, experts, count, E, nb,
                                                    MOST=MOST, GRAIN=GRAIN, EP=ep, BB=bb)
    else:
        count.zero_()
    return SwapBlocks(rows, sizes, experts, count)
