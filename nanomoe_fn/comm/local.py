"""`local` comm: one rank owns every expert slot, so dispatch is a sort and combine an unsort.

Dimension legend: T tokens, k experts per token, H hidden, P slots, N = T * k rows.
"""

from __future__ import annotations

from typing import Any

import torch

from nanomoe_fn.batch import ExpertBatch, Handle, Routing
from nanomoe_fn.comm.plan import (
    check_combine,
    check_dispatch_args,
    check_pending,
    gather_rows,
    reduce_pairs,
    sort_pairs,
    stamp_handle,
)
from nanomoe_fn.eplb.placement import Placement


class LocalComm:
    """Single-rank dispatch/combine (world size 1)."""

    name = "local"
    rank = 0
    world_size = 1

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Always available."""
        return True, ""

    def close(self) -> None:
        """Nothing to release: the single-rank comm holds no buffers (the Comm interface's close)."""

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Sort the (token, k) rows by slot; nothing moves between ranks."""
        check_dispatch_args(x, routing, placement)
        if placement.world_size != 1:
            raise ValueError(f"placement.world_size must be 1 for the local comm, got {placement.world_size}")
        phys = placement.physical_ids(routing.topk_ids)
        send_order, counts = sort_pairs(phys, placement.num_physical)
        rows = gather_rows(x, send_order, routing.topk_ids.shape[1])
        batch = ExpertBatch(rows, counts)
        return batch, stamp_handle(self, batch, Handle(send_order, routing.topk_weights))

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """The batch is ready as sent."""
        check_pending(isinstance(pending, tuple) and len(pending) == 2 and isinstance(pending[1], Handle),
                      self, pending)
        return pending

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Nothing to send. handle must be this comm's, from a dispatch not yet combined, and y the
        contiguous batch it delivered (ValueError naming `handle` or `y` otherwise)."""
        check_combine(self, y, handle)
        return y.x, handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Unsort and reduce with the top-k weights."""
        y, handle = pending
        return reduce_pairs(y, handle)
