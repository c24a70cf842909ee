"""Shared dispatch/combine arithmetic: sort (token, k) pairs by physical slot, and undo it.

Dimension legend: T tokens, k experts per token, H hidden, P physical slots, N = T * k pairs.
All vectorised; no loop over tokens and no host sync.
"""

from __future__ import annotations

import torch

from nanomoe_fn.batch import Handle
from nanomoe_fn.checks import FLOAT_DTYPES, INT_DTYPES, check_expert_ids, check_tensor
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


def check_dispatch_args(x: torch.Tensor, routing: Routing, placement: Placement, values: bool = True) -> None:
    """Shapes, dtypes, devices and (with `values`) id ranges of dispatch's inputs."""
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    ids = check_tensor("routing.topk_ids", routing.topk_ids, dim=2, dtypes=INT_DTYPES, device=x.device)
    w = check_tensor("routing.topk_weights", routing.topk_weights, dim=2, device=x.device)
    if ids.shape[0] != x.shape[0] or tuple(w.shape) != tuple(ids.shape):
        raise ValueError(f"routing must be [T={x.shape[0]}, k] ids and weights, got topk_ids "
                         f"{tuple(ids.shape)} and topk_weights {tuple(w.shape)}")
    if values:
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


# float32 working set of one combine chunk: [tokens, k, H] rows widened for the weighted sum
REDUCE_CHUNK_BYTES = 256 << 20


def invert_order(order: torch.Tensor) -> torch.Tensor:
    """inv [N] with inv[order[i]] = i: where each pair sits in send order."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inv


def reduce_pairs(y: torch.Tensor, handle: Handle, pair_rows: torch.Tensor | None = None,
                 chunk_bytes: int = REDUCE_CHUNK_BYTES) -> torch.Tensor:
    """Sum each token's k expert rows with its top-k weights -> [T, H] in y's dtype.

    y [R, H]: expert output rows. pair_rows [N = T * k]: the row of y holding pair t * k + j
    (default: y is in send order, so the inverse of handle.send_order). The sum runs in float32
    over token chunks: each gathers its T_c * k rows in y's dtype, widens them and takes one
    [1, k] x [k, H] product per token, so the float32 temporaries stay under chunk_bytes
    (one [T * k, H] float32 buffer would be 3.7 GB at 16k tokens of DeepSeek-V3).
    """
    T, k = handle.topk_weights.shape
    H = y.shape[-1]
    if pair_rows is None:
        pair_rows = invert_order(handle.send_order)
    idx = pair_rows.view(T, k)
    w = handle.topk_weights.float().unsqueeze(1)  # [T, 1, k]
    out = y.new_empty((T, H))
    step = max(1, chunk_bytes // max(1, 4 * k * H))  # tokens per chunk: a host int, no sync
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = y.index_select(0, idx[t0:t1].flatten()).view(t1 - t0, k, H).float()
        out[t0:t1] = torch.bmm(w[t0:t1], rows).squeeze(1)
    return out
