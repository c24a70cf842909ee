"""EPLB: place logical experts (with hot ones replicated) onto GPUs so every GPU gets the same load.

Dimension legend: L layers, E logical experts, P physical slots (E + redundant), W GPUs, N nodes,
G expert groups, R max replicas of one expert, S = P // W slots per GPU, T tokens, k experts per token.

The algorithm has the structure of DeepSeek's EPLB, written afresh here:
  hierarchical: pack whole expert groups onto nodes (equal group count per node, balanced load), so
                the grouped top-k of DeepSeek-V3 keeps most traffic inside a node; replicate the
                hottest experts within each node (each replica takes an even share of its expert's
                tokens); pack the node's replicas onto its GPUs (equal slot count per GPU).
  global:       the same with one node and one group: replicate over all slots, pack onto all GPUs.
Each packing is greedy largest-first into the lightest GPU with room, then improved by pairwise
swaps out of the heaviest pack. A final guard keeps the result never less balanced than the identity
placement on the same counts (falls back to identity plus same-GPU replicas, which equals it).

Loads of replicas assume an expert's tokens split evenly over its replicas, which is what
`remap_dynamic` does per step; the static same-rank-first remap only approximates it.
This file runs on the host at rebalance time (every ~1000 steps), not on the decode path; the per-step
parts live in recorder.py (load) and placement.py (remap), weight re-placement in move.py; the
package nanomoe_fn.eplb re-exports all of them.
"""

from __future__ import annotations

import heapq

import torch

from nanomoe_fn.eplb.placement import Placement

POLICIES = ("hierarchical", "global")


def _pack_greedy(w: list[float], num_packs: int) -> list[int]:
    """Largest-first into the lightest pack with room; every pack gets len(w) // num_packs items."""
    cap = len(w) // num_packs
    heap = [(0.0, p) for p in range(num_packs)]  # (load, pack) of packs that still have room
    count = [0] * num_packs
    pack = [0] * len(w)
    for i in sorted(range(len(w)), key=lambda i: (-w[i], i)):
        load, p = heapq.heappop(heap)
        pack[i] = p
        count[p] += 1
        if count[p] < cap:
            heapq.heappush(heap, (load + w[i], p))
    return pack


def _refine(w: torch.Tensor, pack: torch.Tensor, num_packs: int, max_swaps: int) -> torch.Tensor:
    """Swap items between the heaviest pack and another while that lowers the pair's max load.

    w [n] float64, pack [n] int64. Each accepted swap strictly lowers the sum of squared pack loads,
    so this stops; item counts per pack never change.
    """
    pack = pack.clone()
    for _ in range(max_swaps):
        loads = torch.zeros(num_packs, dtype=w.dtype).index_add_(0, pack, w)
        hi = int(torch.argmax(loads))
        inside, outside = (pack == hi).nonzero().flatten(), (pack != hi).nonzero().flatten()
        if outside.numel() == 0:
            break
        d = w[inside][:, None] - w[outside][None, :]  # [a, b] load moved from hi to the other pack
        pair_max = torch.maximum(loads[hi] - d, loads[pack[outside]][None, :] + d)
        pair_max = torch.where(d > 0, pair_max, torch.full_like(pair_max, float("inf")))
        best = int(torch.argmin(pair_max))
        if not float(pair_max.flatten()[best]) < float(loads[hi]) * (1 - 1e-12):
            break
        i, j = inside[best // outside.numel()], outside[best % outside.numel()]
        pack[i], pack[j] = pack[j].clone(), pack[i].clone()
    return pack


def _pack_equal(weight: torch.Tensor, num_packs: int) -> torch.Tensor:
    """weight [X, n] float64 -> pack index [X, n] int64, n // num_packs items per pack, balanced loads."""
    X, n = weight.shape
    out = torch.empty(X, n, dtype=torch.int64)
    for x in range(X):
        greedy = torch.tensor(_pack_greedy(weight[x].tolist(), num_packs), dtype=torch.int64)
        out[x] = greedy if num_packs in (1, n) else _refine(weight[x], greedy, num_packs, 4 * n)
    return out


def _replicate(weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """weight [X, n] -> item of each replica [X, num_slots]: items first, then greedy min-max copies.

    Each extra slot copies the item with the highest per-replica load (ties: the fewest copies, then
    the lowest id), which minimises the largest per-replica load.
    """
    X, n = weight.shape
    rows = torch.arange(X)
    item = torch.cat([torch.arange(n).expand(X, n), torch.empty(X, num_slots - n, dtype=torch.int64)], 1)
    cnt = torch.ones(X, n, dtype=torch.int64)
    for s in range(n, num_slots):
        share = weight / cnt
        tied = share == share.amax(-1, keepdim=True)
        pick = torch.where(tied, cnt, torch.full_like(cnt, num_slots + 1)).argmin(-1)
        item[:, s] = pick
        cnt[rows, pick] += 1
    return item


def _hierarchical(weight: torch.Tensor, P: int, G: int, N: int, W: int) -> torch.Tensor:
    """weight [L, E] float64 -> phy2log [L, P]; slots of node n are [n * P / N, (n + 1) * P / N)."""
    L, E = weight.shape
    node_of_group = _pack_equal(weight.view(L, G, E // G).sum(-1), N)  # [L, G]
    # Logical ids of each node's experts [L, N, E / N]: its groups in id order, experts in id order.
    group_order = torch.argsort(node_of_group * G + torch.arange(G), dim=-1)  # [L, G], node-major
    node_experts = (group_order[..., None] * (E // G) + torch.arange(E // G)).view(L * N, E // N)
    node_weight = weight.gather(-1, node_experts.view(L, E)).view(L * N, E // N)
    rep = _replicate(node_weight, P // N)  # [L * N, P / N] index into the node's experts
    cnt = torch.zeros_like(node_weight).scatter_add_(-1, rep, torch.ones_like(rep, dtype=weight.dtype))
    gpu = _pack_equal((node_weight / cnt).gather(-1, rep), W // N)  # [L * N, P / N]
    logical = node_experts.gather(-1, rep)
    order = torch.argsort(gpu * E + logical, dim=-1)  # GPU-major, then logical id: S slots per GPU
    return logical.gather(-1, order).view(L, P)


def _tables(phy2log: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [L, P] -> (log2phy [L, E, R] padded with -1, ascending slots; logcnt [L, E])."""
    L, P = phy2log.shape
    logcnt = torch.zeros(L, E, dtype=torch.int64).scatter_add_(-1, phy2log, torch.ones_like(phy2log))
    R = max(int(logcnt.max()), 1) if L else 1
    order = torch.argsort(phy2log * P + torch.arange(P), dim=-1)  # slots grouped by expert, ascending
    starts = torch.cumsum(logcnt, -1) - logcnt
    nth = torch.arange(P) - starts.gather(-1, phy2log.gather(-1, order))  # replica number of each
    log2phy = torch.full((L, E * R), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log.gather(-1, order) * R + nth, order)
    return log2phy.view(L, E, R), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load of each GPU [L, W] when each expert's load weight [L, E] splits evenly over its replicas."""
    weight = torch.as_tensor(weight).double()
    phy2log = torch.as_tensor(phy2log).long()
    if weight.dim() != 2 or phy2log.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError(f"weight must be [L, E] and phy2log [L, P], got {tuple(weight.shape)} and "
                         f"{tuple(phy2log.shape)}")
    if phy2log.shape[1] % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide the physical slots ({phy2log.shape[1]})")
    cnt = torch.zeros_like(weight).scatter_add_(-1, phy2log, torch.ones_like(phy2log, dtype=weight.dtype))
    per_slot = (weight / cnt.clamp(min=1)).gather(-1, phy2log)  # [L, P]
    return per_slot.view(weight.shape[0], num_gpus, -1).sum(-1)


def balancedness(load: torch.Tensor) -> torch.Tensor:
    """Mean over max of the per-GPU load along the last dim (1.0 = perfect; all-zero counts as 1.0)."""
    load = torch.as_tensor(load).double()
    top = load.amax(-1)
    return torch.where(top > 0, load.mean(-1) / top.clamp(min=1e-300), torch.ones_like(top))


def _identity_fallback(weight: torch.Tensor, P: int, W: int) -> torch.Tensor:
    """Identity placement [L, P] with each GPU's extra slots holding copies of its own hottest experts.

    A copy on the expert's own GPU does not move load, so GPU loads equal the identity's exactly.
    """
    L, E = weight.shape
    own = torch.arange(E).view(W, E // W).expand(L, W, E // W)
    hot = torch.argsort(-weight.view(L, W, E // W), dim=-1, stable=True)
    extra = own.gather(-1, hot.repeat(1, 1, -(-(P - E) // E) or 1)[..., : (P - E) // W])
    return torch.cat([own, extra], -1).view(L, P)


def _check(weight: torch.Tensor, P: int, G: int, N: int, W: int, policy: str) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [L, E] loads, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must hold finite, non-negative loads")
    E = weight.shape[1]
    if E < 1:
        raise ValueError(f"weight must have at least one logical expert, got shape {tuple(weight.shape)}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if W < 1 or P % W:
        raise ValueError(f"num_replicas ({P}) must be a multiple of num_gpus ({W})")
    if P < E:
        raise ValueError(f"num_replicas ({P}) must be >= the logical experts ({E}): every expert needs a "
                         f"slot")
    if policy == "hierarchical":
        if N < 1 or W % N:
            raise ValueError(f"num_gpus ({W}) must be a multiple of num_nodes ({N})")
        if G < 1 or E % G:
            raise ValueError(f"num_groups ({G}) must divide the logical experts ({E})")
        if G % N:
            raise ValueError(f"num_groups ({G}) must be a multiple of num_nodes ({N}) for the hierarchical "
                             f"policy; use policy='global'")


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, policy: str = "hierarchical"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place E logical experts with loads weight [L, E] into num_replicas = P slots on num_gpus GPUs.

    Returns (phy2log [L, P], log2phy [L, E, R] padded with -1, logcnt [L, E]), all int64 on the CPU.
    Slot p lives on GPU p // (P / W), and GPU g on node g // (W / N). `global` ignores groups/nodes.
    `hierarchical` keeps each group's replicas on one node, so node balance is bounded by how evenly
    whole groups pack onto nodes (with few groups per node and skewed groups, prefer `global`; DeepSeek
    uses hierarchical for prefill's smaller EP and global for decode's large EP). Unlike DeepSeek's
    code, G % N != 0 is an error rather than a silent switch to global. Deterministic: every rank that
    passes the same weight (global_load) gets the same placement.
    """
    weight = torch.as_tensor(weight).detach().to("cpu", torch.float64)
    P, G, N, W = num_replicas, num_groups, num_nodes, num_gpus
    _check(weight, P, G, N, W, policy)
    L, E = weight.shape
    if policy == "global":  # one node, one group: replicas may go to any GPU
        G, N = 1, 1
    phy2log = _hierarchical(weight, P, G, N, W)
    if E % W == 0 and L:  # the guard: never less balanced than identity (its max load is the measure)
        identity = torch.arange(E).expand(L, E)
        worse = gpu_loads(weight, phy2log, W).amax(-1) > gpu_loads(weight, identity, W).amax(-1) * (1 + 1e-9)
        phy2log = torch.where(worse[:, None], _identity_fallback(weight, P, W), phy2log)
    log2phy, logcnt = _tables(phy2log, E)
    return phy2log, log2phy, logcnt


def placement_for_layer(phy2log: torch.Tensor, layer: int, num_logical: int, world_size: int) -> Placement:
    """The Placement of one MoE layer from rebalance_experts' phy2log [L, P] (world_size = W)."""
    if phy2log.dim() != 2 or not 0 <= layer < phy2log.shape[0]:
        raise ValueError(f"phy2log must be [L, P] and layer in [0, L); got {tuple(phy2log.shape)}, {layer}")
    return Placement.from_phy2log(phy2log[layer], num_logical, world_size)


def identity_placements(num_layers: int, num_experts: int, world_size: int) -> list[Placement]:
    """One identity Placement per layer (the starting point before the first rebalance)."""
    return [Placement.identity(num_experts, world_size) for _ in range(num_layers)]

