"""Expert placement: which physical expert slot on which rank holds which logical expert, and the remap
of routed (token, k) pairs from logical experts to physical slots (static and dynamic: all of it here).

Dimension legend: E logical experts, P physical slots (E + redundant), W ranks (EP world size),
P_local = P // W slots per rank, R max replicas of one logical expert, T tokens, k experts per token.

Physical slot p lives on rank p // P_local as local expert p % P_local. The identity placement has
P == E and phy2log == arange(E). EPLB (nanomoe_fn/eplb/rebalance.py) produces placements with redundant slots.
The remap (physical_ids, remap_dynamic, remap) runs once per MoE layer per step, so it never syncs with
the host (no `.item()`, `.tolist()` or data-dependent shapes); the tables are built on the host once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Odd multipliers (golden ratio, murmur-style) that scramble (step, rank, expert) into a rotation.
_MIX_STEP, _MIX_RANK, _MIX_EXPERT = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_MOD = 2_147_483_647


@dataclass(frozen=True, eq=False)
class Placement:
    """Logical <-> physical expert tables for one MoE layer.

    phy2log [P] int64: logical expert held by each physical slot.
    log2phy [E, R] int64: physical replicas of each logical expert, padded with -1.
    logcnt [E] int64: replica count of each logical expert (>= 1).
    remap_policy: how dispatch picks a replica for each (token, k) pair: "static" (a replica on the
    sender's rank first) or "dynamic" (pairs dealt round-robin over the replicas: remap_dynamic).
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    world_size: int
    remap_policy: str = "static"

    def __post_init__(self) -> None:
        if self.remap_policy not in ("static", "dynamic"):
            raise ValueError(f"remap_policy must be 'static' or 'dynamic', got {self.remap_policy!r}")
        # one host check at construction (tables are built on the CPU; off the CPU assume not identity,
        # which is always correct); to() and with_policy() carry the flag over
        same = self.phy2log.numel() == self.log2phy.shape[0] and self.log2phy.shape[1] == 1
        same = same and self.phy2log.device.type == "cpu" and bool(
            torch.equal(self.phy2log, torch.arange(self.phy2log.numel())))
        object.__setattr__(self, "_identity", same)

    def _keep_flag(self, other: Placement) -> Placement:
        object.__setattr__(other, "_identity", self._identity)
        return other

    @property
    def is_identity(self) -> bool:
        """Slot p holds logical expert p (no replicas). Read from the table's shape and a flag set at
        construction, never from device data (no host sync)."""
        return self._identity

    def with_policy(self, remap_policy: str) -> Placement:
        """The same tables with another replica-choice policy."""
        return self._keep_flag(Placement(self.phy2log, self.log2phy, self.logcnt, self.world_size, remap_policy))

    @property
    def num_logical(self) -> int:
        """E, the number of logical experts."""
        return int(self.log2phy.shape[0])

    @property
    def num_physical(self) -> int:
        """P, the number of physical slots over all ranks."""
        return int(self.phy2log.shape[0])

    @property
    def local_experts(self) -> int:
        """P_local, physical slots per rank."""
        return self.num_physical // self.world_size

    @staticmethod
    def from_phy2log(phy2log: torch.Tensor, num_logical: int, world_size: int) -> Placement:
        """Build a placement from the physical -> logical table; checks every expert has a slot."""
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64).cpu()
        if phy2log.dim() != 1:
            raise ValueError(f"phy2log must be 1-D [P], got shape {tuple(phy2log.shape)}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        P = phy2log.numel()
        if P % world_size != 0:
            raise ValueError(
                f"world_size ({world_size}) must divide the physical slots (len(phy2log) = {P}); "
                f"pick a world size that divides it or add redundant slots"
            )
        if P and (int(phy2log.min()) < 0 or int(phy2log.max()) >= num_logical):
            raise ValueError(f"phy2log entries must lie in [0, {num_logical}), got range "
                             f"[{int(phy2log.min())}, {int(phy2log.max())}]")
        logcnt = torch.bincount(phy2log, minlength=num_logical)
        if num_logical and int(logcnt.min()) < 1:
            missing = torch.nonzero(logcnt == 0).flatten()[:8].tolist()
            raise ValueError(f"every logical expert needs a physical slot; missing e.g. {missing}")
        R = int(logcnt.max()) if num_logical else 1
        log2phy = torch.full((num_logical, R), -1, dtype=torch.int64)
        order = torch.argsort(phy2log, stable=True)
        starts = torch.cumsum(logcnt, 0) - logcnt
        rank_in_expert = torch.arange(P) - starts[phy2log[order]]
        log2phy[phy2log[order], rank_in_expert] = order
        return Placement(phy2log, log2phy, logcnt, world_size)

    @staticmethod
    def identity(num_experts: int, world_size: int) -> Placement:
        """Expert e in slot e: rank r holds experts [r * E / W, (r + 1) * E / W)."""
        if isinstance(world_size, int) and world_size >= 1 and num_experts % world_size:
            raise ValueError(f"world_size ({world_size}) must divide num_experts ({num_experts}) for the identity "
                             f"placement; pick a world size that divides it, or add redundant slots "
                             f"(Placement.from_phy2log with num_experts + r slots, r making them divisible)")
        return Placement.from_phy2log(torch.arange(num_experts), num_experts, world_size)

    def to(self, device: torch.device | str) -> Placement:
        """The same tables on another device (routing remaps on the tokens' device)."""
        return self._keep_flag(Placement(self.phy2log.to(device), self.log2phy.to(device),
                                         self.logcnt.to(device), self.world_size, self.remap_policy))

    def physical_ids(self, topk_ids: torch.Tensor, rank: int = 0) -> torch.Tensor:
        """Map logical topk_ids [T, k] to physical slots [T, k] by this placement's remap_policy.

        static: each (token, k) pair goes to the replica on the sender's own rank when there is one, else to
        replica number (token index mod replica count), which spreads one hot expert's tokens over its
        replicas without randomness. dynamic: remap_dynamic (equal shares per replica) at step 0,
        so an uneven share's extra pair rotates over ranks but not over steps (call remap_dynamic with the
        recorder's step for that). With one replica per expert both are phy = log2phy[id, 0]. Keep the
        placement on the tokens' device (`to(device)` once): the tables are moved here otherwise, every call.
        """
        if self.is_identity:  # slot e holds expert e: nothing to look up (and no table to move)
            return topk_ids.long()
        if self.remap_policy == "dynamic" and self.log2phy.shape[1] > 1:
            return remap_dynamic(self, topk_ids, 0, rank)
        log2phy = self.log2phy.to(topk_ids.device)
        logcnt = self.logcnt.to(topk_ids.device)
        ids = topk_ids.long()
        if log2phy.shape[1] == 1:
            return log2phy[ids, 0]
        T = ids.shape[0]
        spread = torch.arange(T, device=ids.device).unsqueeze(1) % logcnt[ids]
        choice = log2phy[ids, spread]
        reps = log2phy[ids]  # [T, k, R]
        on_rank = (reps >= 0) & (reps // self.local_experts == rank)
        local = torch.where(on_rank, reps, torch.full_like(reps, -1)).amax(-1)
        return torch.where(local >= 0, local, choice)

    def local_slots(self, rank: int) -> torch.Tensor:
        """Logical expert of each local slot on `rank`: phy2log[rank * P_local:(rank + 1) * P_local]."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        n = self.local_experts
        return self.phy2log[rank * n : (rank + 1) * n]


def remap_dynamic(placement: Placement, topk_ids: torch.Tensor, step: torch.Tensor | int = 0,
                  rank: int = 0) -> torch.Tensor:
    """Logical topk_ids [T, k] -> physical slots [T, k], each expert's pairs dealt round-robin over its
    replicas, so every replica gets an equal share (counts differ by at most one) in every batch.

    The deal starts at a replica chosen by hashing (step, rank, expert), so the extra pair of an
    uneven share rotates over replicas across steps and ranks. Deterministic given (step, rank);
    `step` may be a device tensor (e.g. RecorderState.step). Ids < 0 map to -1. The placement's tables
    should already be on topk_ids' device (`placement.to(device)` once at setup).
    """
    log2phy = placement.log2phy.to(topk_ids.device)
    logcnt = placement.logcnt.to(topk_ids.device)
    ids = topk_ids.long()
    if log2phy.shape[1] == 1:
        return torch.where(ids >= 0, log2phy[ids.clamp(min=0), 0], -1)
    E = log2phy.shape[0]
    flat = ids.reshape(-1)
    key = torch.where(flat >= 0, flat, E)  # invalid pairs sort last, into their own bucket
    order = torch.argsort(key, stable=True)
    first = torch.zeros(E + 2, dtype=torch.int64, device=ids.device)
    first.index_add_(0, key + 1, torch.ones_like(key))
    first = torch.cumsum(first, 0)  # first[e] = position of expert e's first pair in sort order
    nth = torch.empty_like(order)  # [T * k] how many earlier pairs of the batch chose the same expert
    nth[order] = torch.arange(order.numel(), device=ids.device) - first[key[order]]
    e = flat.clamp(min=0)
    # An int step stays a kernel scalar (a new device tensor would be a blocking host-to-device copy).
    base = step * _MIX_STEP + rank * _MIX_RANK
    base = base % _MOD if isinstance(base, int) else base
    mix = (base + e * _MIX_EXPERT) % _MOD  # [T * k] non-negative (floor modulo)
    replica = (nth + mix) % logcnt[e]
    phys = log2phy[e, replica]
    return torch.where(flat >= 0, phys, -1).view_as(ids)


def remap(placement: Placement, topk_ids: torch.Tensor, rank: int = 0, policy: str = "static",
          step: torch.Tensor | int = 0) -> torch.Tensor:
    """Logical topk_ids [T, k] -> physical slots [T, k] by policy: `static` (a replica on this rank
    first: Placement.physical_ids) or `dynamic` (equal share per replica: remap_dynamic)."""
    if policy == "static":
        return placement.physical_ids(topk_ids, rank)
    if policy == "dynamic":
        return remap_dynamic(placement, topk_ids, step, rank)
    raise ValueError(f"policy must be 'static' or 'dynamic', got {policy!r}")


def tokens_per_gpu(phys_ids: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Routed pairs each rank receives [W] (int64) for physical ids [T, k]; ids < 0 are not counted."""
    flat = phys_ids.reshape(-1).long()
    valid = flat >= 0
    gpu = torch.where(valid, flat, 0) // placement.local_experts
    out = torch.zeros(placement.world_size, dtype=torch.int64, device=phys_ids.device)
    return out.index_add_(0, gpu, valid.long())
