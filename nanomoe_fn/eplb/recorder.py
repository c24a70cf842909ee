"""EPLB's per-step parts: the expert-load recorder and the logical -> physical remap of routed pairs.

Dimension legend: L layers, E logical experts, P physical slots, W ranks (GPUs), R max replicas of one
expert, T tokens, k experts per token, window = steps kept by the recorder.

Both run once per MoE layer per forward step, so neither syncs with the host: no `.item()`,
`.tolist()`, `bincount` (its output size depends on data) or data-dependent shapes; the step
counter lives on the device. A layer index is a Python int (static per layer), not data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.tree import register_dataclass

# Odd multipliers (golden ratio, murmur-style) that scramble (step, rank, expert) into a rotation.
_MIX_STEP, _MIX_RANK, _MIX_EXPERT = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_MOD = 2_147_483_647


@register_dataclass
@dataclass(frozen=True, eq=False)
class RecorderState:
    """Sliding-window expert loads.

    counts [window, L, E]: tokens per logical expert, one row per recorded step (a ring buffer).
    step [] int64 on the device: the step being recorded; row step % window is its row.
    """

    counts: torch.Tensor
    step: torch.Tensor

    @property
    def window(self) -> int:
        """Steps kept."""
        return int(self.counts.shape[0])


def init_recorder(window: int, num_layers: int, num_experts: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.int64) -> RecorderState:
    """An empty recorder: zero counts [window, L, E] and step 0, both on `device`."""
    if window < 1 or num_layers < 1 or num_experts < 1:
        raise ValueError(f"window, num_layers and num_experts must be >= 1, got {window}, {num_layers}, "
                         f"{num_experts}")
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    counts = torch.zeros(window, num_layers, num_experts, dtype=dtype, device=device)
    return RecorderState(counts, torch.zeros((), dtype=torch.int64, device=device))


def record(state: RecorderState, topk_ids: torch.Tensor, layer: int) -> RecorderState:
    """Add this batch's routed pairs topk_ids [T, k] (logical ids) to `layer`'s row of the current step.

    Ids < 0 (padding, masked tokens) are ignored. Several calls in one step add up (two-batch overlap
    records each micro-batch). Donates `state`: the counts buffer is updated in place and shared
    with the returned state (as with JAX buffer donation; copying [window, L, E] per layer per step
    would cost more than the layer), so use only the returned state afterwards.
    """
    window, L, E = state.counts.shape
    if not 0 <= layer < L:
        raise ValueError(f"layer must lie in [0, {L}), got {layer}")
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.device != state.counts.device:
        raise ValueError(f"topk_ids must be int32/int64 on {state.counts.device}, got {topk_ids.dtype} on "
                         f"{topk_ids.device}")
    ids = topk_ids.reshape(-1).long()
    valid = ids >= 0
    row = (state.step % window) * L + layer  # [] device: no host sync
    flat = row * E + torch.where(valid, ids, torch.zeros_like(ids))
    state.counts.view(-1).index_add_(0, flat, valid.to(state.counts.dtype))
    return RecorderState(state.counts, state.step)


def advance(state: RecorderState) -> RecorderState:
    """End the current step: bump the step and clear its row (the oldest in the window).

    Donates `state` like `record`: both buffers are updated in place, so a captured CUDA graph that
    records and advances keeps working on the same two tensors at every replay.
    """
    state.step.add_(1)
    state.counts.index_fill_(0, (state.step % state.counts.shape[0]).view(1), 0)
    return RecorderState(state.counts, state.step)


def windowed_load(state: RecorderState) -> torch.Tensor:
    """Tokens per logical expert [L, E] (int64) summed over the last `window` steps, the current one
    included. Stays on the device; the rebalancer moves it to the host once per rebalance."""
    return state.counts.sum(0, dtype=torch.int64)


def global_load(state: RecorderState, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Windowed load [L, E] (int64, CPU) summed over the ranks of `group` (EP): the rebalancer's input.

    Each rank records only its own tokens; every rank must rebalance on the same totals so that all
    compute the same placement (rebalance_experts is deterministic). Collective when a process group
    is initialised; one host sync, once per rebalance.
    """
    load = windowed_load(state)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
    return load.cpu()


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
