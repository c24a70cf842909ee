"""The comm backend interface: dispatch and combine, each split into a send half and a receive half.

Splitting every exchange lets a schedule (two-batch overlap, shared-expert overlap) put compute
between the halves; `dispatch` and `combine` in nanomoe_fn/moe/dispatch.py just call both halves.

Dimension legend: T tokens, H hidden, P_local local expert slots.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nanomoe_fn.batch import ExpertBatch, Handle, Routing
from nanomoe_fn.eplb.placement import Placement


class Comm(Protocol):
    """One EP rank's view of the expert-parallel group."""

    name: str
    rank: int
    world_size: int

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Start moving each (token, k) row of x [T, H] to the rank that owns its slot."""

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Finish dispatch: this rank's rows grouped by local expert (contiguous or masked, per comm),
        and the handle for combine."""

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Start returning expert outputs (same layout as dispatch's batch) to their source ranks."""

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Finish combine: the weighted sum of each token's k expert outputs, [T, H]."""

    def close(self) -> None:
        """Release what the comm holds (watchdog threads, CUDA graphs, peer-mapped or DeepEP buffers); call it on
        every rank before destroy_process_group. Idempotent; a closed comm refuses further exchanges."""


def supports_comm(name: str, **options: Any) -> tuple[bool, str]:
    """Whether comm backend `name` can run here, and why not."""
    from nanomoe_fn.comm import COMM_BACKENDS

    if name not in COMM_BACKENDS:
        return False, f"unknown comm backend {name!r}; known: {sorted(COMM_BACKENDS)}"
    return COMM_BACKENDS[name].supports(**options)


def make_comm(name: str, **options: Any) -> Comm:
    """Build comm backend `name`, or raise ValueError with the reason it cannot run here."""
    ok, reason = supports_comm(name, **options)
    if not ok:
        raise ValueError(f"comm backend {name!r} is unavailable: {reason}")
    from nanomoe_fn.comm import COMM_BACKENDS

    return COMM_BACKENDS[name](**options)
