"""Shared dispatch/combine arithmetic: sort (token, k) pairs by physical slot, and undo it.

Dimension legend: T tokens, k experts per token, H hidden, P physical slots, N = T * k pairs.
All vectorised; no loop over tokens and no host sync.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange

from nanomoe_fn.batch import Handle
from nanomoe_fn.checks import FLOAT_DTYPES, INT_DTYPES, check_expert_ids, check_tensor
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


def check_dispatch_args(x: torch.Tensor, routing: Routing, placement: Placement) -> None:
    """Shapes, dtypes, devices and id ranges of dispatch's inputs."""
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    ids = check_tensor("routing.topk_ids", routing.topk_ids, dim=2, dtypes=INT_DTYPES, device=x.device)
    w = check_tensor("routing.topk_weights", routing.topk_weights, dim=2, device=x.device)
    if ids.shape[0] != x.shape[0] or tuple(w.shape) != tuple(ids.shape):
        raise ValueError(f"routing must be [T={x.shape[0]}, k] ids and weights, got topk_ids "
                         f"{tuple(ids.shape)} and topk_weights {tuple(w.shape)}")
    check_expert_ids("routing.topk_ids", ids, placement.num_logical)


def sort_pairs(phys_ids: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the flattened pairs by slot. Returns (send_order [N] int64, counts [P] int64)."""
    flat = phys_ids.flatten().long()
    send_order = torch.argsort(flat, stable=True)
    # index_add_ rather than bincount: bincount sizes its output from the data (a host sync on GPUs)
    counts = torch.zeros(num_physical, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return send_order, counts


def gather_rows(x: torch.Tensor, send_order: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows to send [N, H]: the token of each pair, in send order."""
    return x.index_select(0, send_order // top_k)


def reduce_pairs(y_sent: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Undo the send order and sum each token's k expert outputs with its weights -> [T, H].

    Accumulates in float32 and returns y's dtype.
    """
    T, k = handle.topk_weights.shape
    pairs = torch.empty((T * k, y_sent.shape[-1]), dtype=torch.float32, device=y_sent.device)
    pairs[handle.send_order] = y_sent.float()
    out = einsum(rearrange(pairs, "(t k) h -> t k h", k=k), handle.topk_weights.float(), "t k h, t k -> t h")
    return out.to(y_sent.dtype)
