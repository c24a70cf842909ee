"""Merging the MLA decode's split partials: a kernel of its own, or the tail of stage 1 itself.

Dimension legend: R query rows, N heads, C latent (value) dims, K splits of the context, BH heads and BC value
columns per merge tile, CK splits read at a time.

Each split k of a row leaves a partial output o_k [N, C] (normalised within the split) and its base-2 lse_k [N];
the row's output is sum_k 2^(lse_k - m) o_k / sum_k 2^(lse_k - m), m = max_k lse_k (all splits empty: 0).
`merge_tile` computes one [BH, BC] tile of it; `_mla_decode_reduce` runs it over a grid of its own (a second
launch), and `grid_merge` runs it at the end of stage 1 (kernels/mla_decode_keymajor.py, MERGE):

- GRID_SYNC (GPUs): every program arrives on a counter (after its partials are stored), waits until all have
  arrived, then merges the tiles chunk = pid, pid + programs, ... Waiting is only safe when every program of
  the launch is resident at once, so mla_decode uses it only when the programs fit one per multiprocessor. It
  saves the second launch and its gap: at one query row the reduction is ~3 of ~12 us (mla_notes.md).
- otherwise (the CPU interpreter, which runs programs one after another): the last program to arrive merges
  every tile. Same tiles, same arithmetic: the CI tests check the merge math this way.

The counter: int32 [1] zeroed per call by mla_decode (a fill in the graph), or a caller's int64 [1] `workspace`
zeroed once and kept: each launch adds `programs` arrivals and waits for the next multiple of `programs`, so it
needs no reset, but one launch at a time may use it (one stream, or calls ordered by events).
Loads of other programs' partials bypass L1 (`.cg`): L1 is not coherent across multiprocessors.
"""

from __future__ import annotations

import triton
import triton.language as tl
from nanomoe_kernels.reduce_ops import add as _add
from nanomoe_kernels.reduce_ops import maximum as _maximum


@triton.jit
def _ld(ptrs, mask, other, L2_ONLY: tl.constexpr):
    if L2_ONLY:
        return tl.load(ptrs, mask=mask, other=other, cache_modifier=".cg")
    return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def merge_tile(o_part_ptr, lse_ptr, out_ptr, stride_pr, stride_pn, stride_pk, stride_lr, stride_ln, stride_or,
               stride_on, N, C, SPLITS, hblk, row, cblk, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, L2_ONLY: tl.constexpr):
    """Tile (head block hblk, row, value block cblk) of the merged output, the K partials read CHUNK_K splits at
    a time as [BH, CHUNK_K, BC]."""
    offs_h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, CHUNK_K)
    mask_h = offs_h < N
    mask_hc = mask_h[:, None, None] & (offs_c < C)[None, None, :]
    lse_rows = lse_ptr + row.to(tl.int64) * stride_lr + offs_h[:, None] * stride_ln
    lse = _ld(lse_rows + offs_k[None, :], mask_h[:, None] & (offs_k[None, :] < SPLITS), float("-inf"), L2_ONLY)
    m = tl.reduce(lse, 1, _maximum)
    m = tl.where(m == float("-inf"), 0.0, m)            # all splits empty: weights are all 0
    denom = tl.reduce(tl.exp2(lse - m[:, None]), 1, _add)
    acc = tl.full([BLOCK_H, BLOCK_C], 0.0, tl.float32)
    part = (o_part_ptr + row.to(tl.int64) * stride_pr + offs_h[:, None, None].to(tl.int64) * stride_pn
            + offs_c[None, None, :])
    for k0 in range(0, SPLITS, CHUNK_K):
        ks = k0 + offs_j
        w = tl.exp2(_ld(lse_rows + ks[None, :], mask_h[:, None] & (ks[None, :] < SPLITS), float("-inf"),
                        L2_ONLY) - m[:, None])
        o_k = _ld(part + ks[None, :, None] * stride_pk, mask_hc & (ks < SPLITS)[None, :, None], 0.0, L2_ONLY)
        acc += tl.reduce(w[:, :, None] * o_k.to(tl.float32), 1, _add)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = out_ptr + row.to(tl.int64) * stride_or + offs_h[:, None] * stride_on + offs_c[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & (offs_c < C)[None, :])


@triton.jit(do_not_specialize=["SPLITS"])
def _mla_decode_reduce(
    o_part_ptr, lse_ptr, out_ptr,
    stride_pr, stride_pn, stride_pk, stride_lr, stride_ln, stride_or, stride_on,
    N, C, SPLITS,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
):
    """Program (head block, row, value block): one merge tile (the merge's own launch)."""
    merge_tile(o_part_ptr, lse_ptr, out_ptr, stride_pr, stride_pn, stride_pk, stride_lr, stride_ln, stride_or,
               stride_on, N, C, SPLITS, tl.program_id(0), tl.program_id(1), tl.program_id(2), BLOCK_H, BLOCK_C,
               BLOCK_K, CHUNK_K, False)


@triton.jit
def grid_merge(sync_ptr, o_part_ptr, lse_ptr, out_ptr, stride_pr, stride_pn, stride_pk, stride_lr, stride_ln,
               stride_or, stride_on, N, C, SPLITS, ROWS, NH, NC, pid, programs, BLOCK_H: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr, GRID_SYNC: tl.constexpr):
    """The end of a stage-1 program (pid of `programs`) whose partials are stored: arrive, then merge (module
    docstring). NH, NC: head and value blocks of the merge tiles; chunks = NH * ROWS * NC."""
    tl.debug_barrier()  # every warp's partial stores are issued before the arrival
    ticket = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    chunks = NH * ROWS * NC
    target = (ticket // programs + 1) * programs  # a counter kept across launches counts on (no reset)
    if GRID_SYNC:
        seen = ticket + 1
        while seen < target:
            seen = tl.atomic_add(sync_ptr, 0, sem="acquire")
        tl.debug_barrier()
        for chunk in range(pid, chunks, programs):
            merge_tile(o_part_ptr, lse_ptr, out_ptr, stride_pr, stride_pn, stride_pk, stride_lr, stride_ln,
                       stride_or, stride_on, N, C, SPLITS, chunk % NH, (chunk // NH) % ROWS, chunk // (NH * ROWS),
                       BLOCK_H, BLOCK_C, BLOCK_K, CHUNK_K, True)
    else:
        if ticket + 1 == target:
            for chunk in range(0, chunks):
                merge_tile(o_part_ptr, lse_ptr, out_ptr, stride_pr, stride_pn, stride_pk, stride_lr, stride_ln,
                           stride_or, stride_on, N, C, SPLITS, chunk % NH, (chunk // NH) % ROWS,
                           chunk // (NH * ROWS), BLOCK_H, BLOCK_C, BLOCK_K, CHUNK_K, True)

