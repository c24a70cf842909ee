"""EPLB's per-step recorder of expert load (the remap of routed pairs lives with Placement, placement.py).

Dimension legend: L layers, E logical experts, T tokens, k experts per token, window = steps kept by the
recorder.

It runs once per MoE layer per forward step, so it never syncs with the host: no `.item()`,
`.tolist()`, `bincount` (its output size depends on data) or data-dependent shapes; the step
counter lives on the device. A layer index is a Python int (static per layer), not data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanomoe_fn.tree import register_dataclass


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


register_dataclass(RecorderState)


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
