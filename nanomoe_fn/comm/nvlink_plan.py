"""Index math of the `nvlink` comm: where each token and each (token, k) pair lands on its destination.

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, W ranks, P physical slots,
P_local = P // W slots per rank, L = P + W entries of one rank's count row, cap = W * T_max rows per
expert in the masked layout, Q rows of the destination's expert layout.

The nvlink comm sends each token ONCE to each rank that owns one of its slots (DeepEP's normal-mode
accounting), together with a small per-token table: for each of its k pairs, the row it takes in
the destination's expert layout (or -1 when that pair lives on another rank). The destination then
copies the token into those rows itself (a local HBM copy), so NVLink carries each token at most W
times, not k times.

Every rank publishes one count row [L]: rows per physical slot [P], then tokens per destination [W].
After an all-gather of those rows (n_all [W, L], identical on every rank) each sender can compute,
with no further exchange, the exact row of each of its pairs at the destination:

  masked layout (decode):     row = e * cap + (rows of slot p from lower ranks) + (its index among mine)
  contiguous layout (prefill): row = (rows of the destination's lower experts, all sources) + the same two

so the destination's batch is grouped by local expert with per-expert counts and no gaps. Pure torch,
no host sync; runs on any device (the CPU tests check it against a loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("masked", "contiguous")


@dataclass(frozen=True, eq=False)
class LocalPlan:
    """This rank's routing, reduced to what the exchange needs (all on the tokens' device).

    flat [T * k] int64 physical slot of each pair; dest [T, k] int32 its rank; row [L] int64 this
    rank's count row; has [T, W] int32 1 where token t has a pair on rank d; tok_idx [T, W] int32 the
    token's row among those this rank sends to d (valid where has).
    """

    flat: torch.Tensor
    dest: torch.Tensor
    row: torch.Tensor
    has: torch.Tensor
    tok_idx: torch.Tensor


def local_plan(phys: torch.Tensor, num_slots: int, world_size: int) -> LocalPlan:
    """Count rows per slot and tokens per destination for phys [T, k] physical slot ids."""
    T, k = phys.shape
    W, P = world_size, num_slots
    flat = phys.reshape(-1).long()
    # index_add_ rather than bincount: bincount sizes its output from the data (a host sync on GPUs)
    counts = torch.zeros(P, dtype=torch.int64, device=phys.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    dest = torch.div(phys.long(), P // W, rounding_mode="floor")  # [T, k]
    has = torch.zeros((T, W), dtype=torch.int32, device=phys.device)
    has.scatter_(1, dest, 1)
    # scan along the last dim of the transpose: a scan down dim 0 of a [T, W] tensor is ~50x slower on GPUs
    tok_idx = (torch.cumsum(has.t().contiguous(), 1, dtype=torch.int32) - 1).t().contiguous()
    row = torch.cat([counts, has.sum(0, dtype=torch.int64)])
    return LocalPlan(flat, dest.to(torch.int32), row, has, tok_idx)


def slot_offsets(n_all: torch.Tensor, num_slots: int, world_size: int, layout: str, cap: int) -> torch.Tensor:
    """First row of each physical slot's expert in its destination's layout -> [P] int64."""
    P, W = num_slots, world_size
    P_local = P // W
    if layout == "masked":
        return (torch.arange(P, device=n_all.device) % P_local) * cap
    if layout != "contiguous":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tot = n_all[:, :P].sum(0).view(W, P_local)  # rows each destination expert receives from all sources
    return (torch.cumsum(tot, 1) - tot).reshape(P)


def pair_rows(plan: LocalPlan, n_all: torch.Tensor, rank: int, num_slots: int, world_size: int, layout: str,
              cap: int) -> torch.Tensor:
    """Row of each of this rank's pairs in its destination's expert layout -> [T, k] int32."""
    P = num_slots
    flat = plan.flat
    n = n_all[:, :P]
    base = (torch.cumsum(n, 0) - n)[rank]  # [P] rows of each slot sent by lower ranks
    mine = n[rank]
    # index of each pair among this rank's pairs of the same slot, in (t, k) order
    order = torch.argsort(flat, stable=True)
    start = torch.cumsum(mine, 0) - mine
    within = torch.empty_like(flat)
    within[order] = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    rows = slot_offsets(n_all, P, world_size, layout, cap)[flat] + base[flat] + within
    return rows.to(torch.int32).view(plan.dest.shape)


def received_counts(n_all: torch.Tensor, rank: int, num_slots: int, world_size: int) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """(rows per local expert [P_local] int64, tokens from each source [W] int32) at this rank."""
    P, W = num_slots, world_size
    P_local = P // W
    counts = n_all[:, rank * P_local:(rank + 1) * P_local].sum(0)
    return counts, n_all[:, P + rank].to(torch.int32)
