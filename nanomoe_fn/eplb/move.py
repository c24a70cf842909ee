"""Re-placing expert weights from an old placement to a new one, with chunked point-to-point.

Dimension legend: E logical experts, P physical slots, W ranks, S_old / S_new = P_old / W, P_new / W
local slots per rank, c = chunk_experts (most slots one rank sends, or receives, in one round).

Every rank computes the same MovePlan from the two placements (host work, once per rebalance):
  copies     slots whose expert this rank already holds: a local copy, no traffic;
  rounds     the rest, one transfer per (destination rank, expert) from a rank that holds it (the
             holder with the fewest sends so far), scheduled so each rank sends at most c and
             receives at most c slots per round;
  duplicates a second slot of one expert on the same destination copies the first one at the end.
Serving goes on between rounds with the old weights and placement: `begin_move`, then one
`run_move_round` per serving step, then `finish_move`; every rank switches to the new weights and
placement after the same (last) round. `replace_expert_weights` runs all rounds back to back.
The staging pytree holds the new layout beside the old one, so move one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nanomoe_fn.eplb.placement import Placement


@dataclass(frozen=True)
class Transfer:
    """Slot src_slot of src_rank (old layout) -> slot dst_slot of dst_rank (new layout)."""

    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class MovePlan:
    """What every rank copies, sends and receives to go from one placement to another."""

    world_size: int
    old_local: int  # S_old
    new_local: int  # S_new
    copies: tuple[tuple[tuple[int, int], ...], ...]  # per rank: (old slot, new slot) local copies
    rounds: tuple[tuple[Transfer, ...], ...]
    duplicates: tuple[tuple[tuple[int, int], ...], ...]  # per rank: (new slot, new slot) after rounds

    @property
    def num_rounds(self) -> int:
        """Rounds of point-to-point traffic (0 when nothing moves between ranks)."""
        return len(self.rounds)

    def sent_slots(self) -> int:
        """Expert slots that cross between ranks in total."""
        return sum(len(r) for r in self.rounds)


def plan_weight_moves(old: Placement, new: Placement, chunk_experts: int = 8) -> MovePlan:
    """The MovePlan from placement `old` to `new` (same logical experts and world size)."""
    if old.world_size != new.world_size:
        raise ValueError(f"old and new placements must have the same world_size, got {old.world_size} and "
                         f"{new.world_size}")
    if old.num_logical != new.num_logical:
        raise ValueError(f"old and new placements must have the same logical experts, got {old.num_logical} "
                         f"and {new.num_logical}")
    if chunk_experts < 1:
        raise ValueError(f"chunk_experts must be >= 1, got {chunk_experts}")
    W, S_old, S_new = old.world_size, old.local_experts, new.local_experts
    old_p2l, new_p2l = old.phy2log.tolist(), new.phy2log.tolist()
    holders: dict[int, dict[int, int]] = {}  # expert -> {rank: first old slot there}
    for p, e in enumerate(old_p2l):
        holders.setdefault(e, {}).setdefault(p // S_old, p % S_old)
    sends = [0] * W
    copies: list[list[tuple[int, int]]] = [[] for _ in range(W)]
    dups: list[list[tuple[int, int]]] = [[] for _ in range(W)]
    transfers: list[Transfer] = []
    for r in range(W):
        first_new: dict[int, int] = {}  # expert -> first new slot of it on rank r
        for j in range(S_new):
            e = new_p2l[r * S_new + j]
            if e in first_new:
                dups[r].append((first_new[e], j))
                continue
            first_new[e] = j
            if r in holders[e]:
                copies[r].append((holders[e][r], j))
            else:
                src = min(holders[e], key=lambda q: (sends[q], q))
                sends[src] += 1
                transfers.append(Transfer(src, holders[e][src], r, j))
    rounds: list[list[Transfer]] = []
    load: list[tuple[list[int], list[int]]] = []  # per round: (sends per rank, receives per rank)
    for t in transfers:
        k = next((i for i, (s, d) in enumerate(load) if s[t.src_rank] < chunk_experts
                  and d[t.dst_rank] < chunk_experts), len(rounds))
        if k == len(rounds):
            rounds.append([])
            load.append(([0] * W, [0] * W))
        rounds[k].append(t)
        load[k][0][t.src_rank] += 1
        load[k][1][t.dst_rank] += 1
    return MovePlan(W, S_old, S_new, tuple(map(tuple, copies)), tuple(map(tuple, rounds)),
                    tuple(map(tuple, dups)))


def _leaves(weights: Any, slots: int, name: str) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten(weights)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() < 1 or leaf.shape[0] != slots:
            shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise ValueError(f"{name} leaf {i} must be a tensor [{slots}, ...] (one row per local slot), "
                             f"got {shape}")
    return leaves, spec


def begin_move(plan: MovePlan, rank: int, weights: Any) -> Any:
    """A staging pytree in the new layout [S_new, ...] with this rank's local copies already made.

    weights: this rank's expert pytree in the old layout, every leaf [S_old, ...]."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank must lie in [0, {plan.world_size}), got {rank}")
    leaves, spec = _leaves(weights, plan.old_local, "weights")
    staged = [torch.zeros((plan.new_local, *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
              for leaf in leaves]
    if plan.copies[rank]:
        src, dst = (torch.tensor(c, device=leaves[0].device) for c in zip(*plan.copies[rank]))
        for old_leaf, new_leaf in zip(leaves, staged):
            new_leaf[dst] = old_leaf[src]
    return pytree.tree_unflatten(staged, spec)


def run_move_round(plan: MovePlan, round_index: int, rank: int, weights: Any, staging: Any,
                   group: dist.ProcessGroup | None = None, timeout_s: float = 60.0) -> None:
    """Round `round_index` of the plan on this rank: send its slots of `weights` (old layout), receive
    into `staging` (new layout, written in place). Every rank of the group must call it for the same
    round. A peer that does not answer within timeout_s, or is gone, raises RuntimeError naming rank and
    round; `weights` are never written (received slots land in `staging` only, after the whole round)."""
    if not 0 <= round_index < plan.num_rounds:
        raise ValueError(f"round_index must lie in [0, {plan.num_rounds}), got {round_index}")
    old_leaves, _ = _leaves(weights, plan.old_local, "weights")
    new_leaves, _ = _leaves(staging, plan.new_local, "staging")
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    out: dict[int, list[int]] = {}
    inc: dict[int, list[int]] = {}
    for t in plan.rounds[round_index]:  # same order on every rank, so messages pair up
        if t.src_rank == rank:
            out.setdefault(t.dst_rank, []).append(t.src_slot)
        if t.dst_rank == rank:
            inc.setdefault(t.src_rank, []).append(t.dst_slot)
    ops, received = [], []
    dev = old_leaves[0].device if old_leaves else torch.device("cpu")
    for dst, slots in sorted(out.items()):
        idx = torch.tensor(slots, device=dev)
        ops += [dist.P2POp(dist.isend, leaf.index_select(0, idx).contiguous(), peer(dst), group)
                for leaf in old_leaves]
    for src, slots in sorted(inc.items()):
        bufs = [torch.empty((len(slots), *leaf.shape[1:]), dtype=leaf.dtype, device=leaf.device)
                for leaf in new_leaves]
        ops += [dist.P2POp(dist.irecv, buf, peer(src), group) for buf in bufs]
        received.append((torch.tensor(slots, device=dev), bufs))
    if not ops:
        return
    try:  # posting fails at once on a group whose peer is gone; the waits when a peer dies or stalls
        works = dist.batch_isend_irecv(ops)
        for w in works:
            w.wait(timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # gloo raises RuntimeError, NCCL a DistBackendError
        peers = sorted(set(out) | set(inc))
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(f"rank {rank}: EPLB weight move round {round_index} did not finish within "
                           f"{timeout_s:g} s (peers {peers}; `weights` are unchanged, drop `staging`): "
                           f"{cause}") from err
    for idx, bufs in received:
        for new_leaf, buf in zip(new_leaves, bufs):
            new_leaf[idx] = buf


def finish_move(plan: MovePlan, rank: int, staging: Any, group: dist.ProcessGroup | None = None,
                timeout_s: float = 60.0) -> Any:
    """Fill the duplicate slots (a second replica of one expert on this rank); returns `staging`.

    With a process group of several ranks this is also the agreement step: every rank of the group must
    reach it (one all_reduce) before any rank switches to the new placement. A rank that failed a round
    never gets here, so the others raise RuntimeError naming this step within timeout_s and keep their
    old placement and weights: no rank can end on the new placement while another stays on the old one
    (a rank that only sent in the last rounds would otherwise finish although its peers failed)."""
    leaves, _ = _leaves(staging, plan.new_local, "staging")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        done = torch.ones(1, dtype=torch.int32, device=leaves[0].device if leaves else torch.device("cpu"))
        try:
            dist.all_reduce(done, group=group, async_op=True).wait(timeout=timedelta(seconds=timeout_s))
        except Exception as err:  # gloo raises RuntimeError, NCCL a DistBackendError
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RuntimeError(f"rank {rank}: EPLB weight move: not every rank finished its rounds (agreement step, "
                               f"{timeout_s:g} s); keep the old placement and `weights`, drop `staging`: "
                               f"{cause}") from err
    if plan.duplicates[rank]:
        src, dst = (torch.tensor(c, device=leaves[0].device) for c in zip(*plan.duplicates[rank]))
        for leaf in leaves:
            leaf[dst] = leaf[src]
    return staging


def replace_expert_weights(old: Placement, new: Placement, weights: Any, rank: int, chunk_experts: int = 8,
                           group: dist.ProcessGroup | None = None, timeout_s: float = 60.0) -> Any:
    """This rank's expert pytree re-laid from placement `old` [S_old, ...] to `new` [S_new, ...].

    Collective: every rank of the (EP) group calls it with the same placements. With one rank (or no
    process group) every slot is a local copy.
    """
    plan = plan_weight_moves(old, new, chunk_experts)
    staging = begin_move(plan, rank, weights)
    for r in range(plan.num_rounds):
        run_move_round(plan, r, rank, weights, staging, group, timeout_s)
    return finish_move(plan, rank, staging, group, timeout_s)
