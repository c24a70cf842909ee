"""`dispatch`: both halves of a comm backend's dispatch exchange, back to back (its inverse: combine.py).

Dimension legend: T tokens, H hidden, k experts per token.
A schedule that overlaps communication calls the halves (comm.dispatch_send / dispatch_recv) itself;
this is the plain sequential composition.
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
