"""Where an MLA decode tile's cache rows live: the addressing both decode stage-1 kernels share.

Dimension legend: BN cache rows per tile, G page size (PAGE), L_max cache capacity per sequence,
Dc cache row width. A contiguous cache is [B, L_max, Dc]; a paged one [P, G, Dc] with block table [B, M].
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_row0(bt_ptr, seq, n0, stride_bt, max_len, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """Row of a full tile's first cache row in the [rows, Dc] view the TMA descriptors see: inside its page
    when PAGED (BN divides G, so the tile lies in one page), else seq * L_max + n0."""
    if PAGED:
        row0 = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + n0 // PAGE) * PAGE + n0 % PAGE
    else:
        row0 = seq * max_len + n0
    return row0


@triton.jit
def tile_offsets(bt_ptr, seq, n0, offs_n, mask_n, stride_kv0, stride_kv1, stride_bt, PAGE: tl.constexpr,
                 PAGED: tl.constexpr, PAGE_TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets [BN] of the tile's cache rows offs_n (rows past mask_n read page 0: masked anyway)."""
    if PAGE_TILE:   # BN divides G: the tile lies in one page (n0 < end <= capacity: a real entry)
        page = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + n0 // PAGE)
        base = page.to(tl.int64) * stride_kv0 + (n0 % PAGE + tl.arange(0, BLOCK_N)) * stride_kv1
    elif PAGED:     # pages shorter than a tile: one page id per cache row
        page = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + offs_n // PAGE, mask=mask_n, other=0)
        base = page.to(tl.int64) * stride_kv0 + (offs_n % PAGE) * stride_kv1
    else:
        base = seq.to(tl.int64) * stride_kv0 + offs_n.to(tl.int64) * stride_kv1
    return base


@triton.jit
def split_range(len_ptr, row, split, SPLITS, max_len, BLOCK_N: tl.constexpr):
    """Cache rows [start, end) of this split of the row's context (whole tiles of BN rows per split, the last
    split ragged or empty) and end_full, where the row's ragged last tile starts. Lengths read on the device."""
    ctx = tl.minimum(tl.load(len_ptr + row), max_len)      # never read past the cache
    chunk = ((ctx + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)
    end_full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    return start, end, end_full
