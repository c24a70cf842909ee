"""An alignment moved to fixed strides: expert e's aligned rows at rows e*cap .. (DeepGEMM's masked layout
[E, cap, H] seen as E*cap rows), for a caller that knows cap >= every expert's padded count.

Dimension legend: E experts, N rows the alignment sorts, BM its block_m, cap rows per expert (a multiple of
BM), R its aligned rows, NBIN a power of two > E, BLK slots per step, EC experts laid out (E, or a group
e0 .. e1 of them).

Slots past an expert's padded count hold the hole id N + 1: the permute kernel neither reads nor writes those
rows, and the inverse / unpermute kernels never match them. One launch (one program per expert), no host
sync; `live[E]` (rows per expert that hold a real row id) comes out of the same kernel, for the GEMMs'
masked_m.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_align import Alignment


@triton.jit(do_not_specialize=["E0", "EC", "N", "cap"])
def _capacity_kernel(padded_ptr, src_ids_ptr, ids_ptr, expert_ids_ptr, num_padded_ptr, live_ptr, E, E0, EC, N,
                     cap, BM: tl.constexpr, NBIN: tl.constexpr, BLK: tl.constexpr):
    e = tl.program_id(0)  # expert E0 + e of all E, at rows e * cap of the EC experts laid out here
    bins = tl.arange(0, NBIN)
    padded = tl.load(padded_ptr + bins, mask=bins < E, other=0)
    mine = bins == E0 + e
    my_pad = tl.sum(tl.where(mine, padded, 0), axis=0)
    my_src = tl.sum(tl.where(bins < E0 + e, padded, 0), axis=0)  # the expert's first aligned row
    if e == 0:
        tl.store(num_padded_ptr, EC * cap)
    j = tl.arange(0, BLK)
    live = tl.zeros([BLK], dtype=tl.int32)
    for s0 in range(0, cap, BLK):
        s = s0 + j
        ok = s < cap
        have = ok & (s < my_pad)
        ids = tl.load(src_ids_ptr + my_src + s, mask=have, other=N + 1)
        live += (have & (ids < N)).to(tl.int32)
        dst = e.to(tl.int64) * cap + s
        tl.store(ids_ptr + dst, ids, mask=ok)
        tl.store(expert_ids_ptr + dst // BM, e + 0 * s, mask=ok & (s % BM == 0))
    tl.store(live_ptr + e, tl.sum(live, axis=0))


def with_capacity(align: Alignment, capacity: int,
                  experts: tuple[int, int] | None = None) -> tuple[Alignment, torch.Tensor]:
    """(`align` with expert e's aligned rows moved to rows e*capacity .. (num_padded = E*capacity), live [E]
    int32: real rows per expert). capacity: a multiple of block_m >= every expert's padded count (the caller
    reads them; a smaller one would drop rows: checked here when padded_counts is on the CPU, the caller's to
    keep elsewhere). experts=(e0, e1): only those experts, expert e0 + i at rows i*capacity (an alignment of
    EC = e1 - e0 experts, expert ids and padded counts local to it; live [EC]), so a caller can run the masked
    layout a group of experts at a time."""
    if not isinstance(capacity, int) or capacity < 0 or capacity % align.block_m:
        raise ValueError(f"capacity must be an int >= 0 and a multiple of block_m={align.block_m}, got {capacity!r}")
    pc = align.padded_counts
    E, dev = pc.shape[0], pc.device
    e0, e1 = (0, E) if experts is None else experts
    if not (isinstance(e0, int) and isinstance(e1, int) and 0 <= e0 <= e1 <= E):
        raise ValueError(f"experts must be a pair (e0, e1) with 0 <= e0 <= e1 <= {E}, got {experts!r}")
    if pc.device.type == "cpu" and e1 > e0 and int(pc[e0:e1].max()) > capacity:
        raise ValueError(f"capacity={capacity} is below an expert's padded count ({int(pc[e0:e1].max())})")
    EC = e1 - e0
    ids = torch.empty(EC * capacity, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(EC * capacity // align.block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    live = torch.empty(EC, dtype=torch.int32, device=dev)
    if EC == 0:
        num_padded.zero_()
    else:
        _capacity_kernel[(EC,)](pc, align.sorted_ids, ids, expert_ids, num_padded, live, E, e0, EC, align.num_rows,
                                capacity, BM=align.block_m, NBIN=triton.next_power_of_2(E + 1),
                                BLK=min(1024, triton.next_power_of_2(max(capacity, 16))))
    return Alignment(ids, expert_ids, num_padded, align.block_m, align.num_rows, pc[e0:e1]), live
