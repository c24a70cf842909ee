"""`dispatch` and `combine`: both halves of a comm backend's exchange, back to back.

Dimension legend: T tokens, H hidden, k experts per token.
A schedule that overlaps communication calls the halves (comm.dispatch_send / dispatch_recv,
combine_send / combine_recv) itself; these are the plain sequential composition.
"""

from __future__ import annotations

import torch

from nanomoe_fn.batch import ExpertBatch, Handle, Routing
from nanomoe_fn.comm.base import Comm
from nanomoe_fn.eplb.placement import Placement


def dispatch(x: torch.Tensor, routing: Routing, comm: Comm, placement: Placement) -> tuple[ExpertBatch, Handle]:
    """Move each (token, k) row of x [T, H] to the rank owning its slot; rows grouped by local expert
    (contiguous, or the masked [P_local, C, H] layout for fixed-capacity comms)."""
    return comm.dispatch_recv(comm.dispatch_send(x, routing, placement))


def combine(y: ExpertBatch, handle: Handle, comm: Comm) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them with the top-k weights -> [T, H].

    handle must be the one `dispatch` on this same comm returned, not yet combined (each combines once;
    several dispatches may be open at a time), and y that dispatch's batch after the experts (same
    layout, rows, hidden size and dtype). Anything else is a ValueError naming `handle` or `y`, raised
    before any exchange starts, so no peer is left waiting on a rank that refused (a peer that passed
    a good handle ends with its comm's timeout)."""
    return comm.combine_recv(comm.combine_send(y, handle))
