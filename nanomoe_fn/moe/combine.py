"""`combine`: both halves of a comm backend's combine exchange, back to back (the inverse of dispatch.py).

Dimension legend: T tokens, H hidden.
A schedule that overlaps communication calls the halves (comm.combine_send / combine_recv) itself; this
is the plain sequential composition.
"""

from __future__ import annotations

import torch

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.comm.base import Comm


def combine(y: ExpertBatch, handle: Handle, comm: Comm) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them with the top-k weights -> [T, H].

    handle must be the one `dispatch` on this same comm returned, not yet combined (each combines once;
    several dispatches may be open at a time), and y that dispatch's batch after the experts (same
    layout, rows, hidden size and dtype). Anything else is a ValueError naming `handle` or `y`, raised
    before any exchange starts, so no peer is left waiting on a rank that refused (a peer that passed
    a good handle ends with its comm's timeout)."""
    return comm.combine_recv(comm.combine_send(y, handle))
