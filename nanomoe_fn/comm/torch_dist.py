"""`torch` comm: dispatch/combine over torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU).

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P_local slots per
rank, N = T * k rows sent, M rows received.

Dispatch is one count exchange ([W, P_local] ints) and one payload exchange; combine is one payload
exchange back. The payload split sizes must be known on the host, so dispatch_send reads the counts back
once (a host sync: this is the prefill-style path; comm/torch_fixed.py is the sync-free fixed-capacity
path for decode). Every wait has a timeout and fails with the rank and stage named, never an endless
hang.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange, repeat

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.comm.plan import check_dispatch_args, gather_rows, reduce_pairs, sort_pairs
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


@dataclass
class _InFlight:
    work: Any
    stage: str


def _wait(rank: int, timeout_s: float, inflight: _InFlight) -> None:
    """Wait for a collective; a peer that does not arrive in time raises TimeoutError naming the stage."""
    try:
        ok = inflight.work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # gloo/NCCL report timeouts and vanished peers as RuntimeError
        raise TimeoutError(
            f"rank {rank}: EP stage '{inflight.stage}' failed waiting for peers "
            f"(timeout {timeout_s:g}s): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if ok is False:
        raise TimeoutError(f"rank {rank}: EP stage '{inflight.stage}' timed out after {timeout_s:g}s")


class TorchComm:
    """all_to_all_single dispatch/combine over an initialised torch.distributed process group."""

    name = "torch"

    def __init__(self, group: Any = None, timeout_s: float = 60.0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("the torch comm needs torch.distributed initialised (init_process_group) first")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = float(timeout_s)

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Available once torch.distributed has a default process group."""
        if not dist.is_available():
            return False, "torch.distributed is not available in this torch build"
        if not dist.is_initialized():
            return False, "torch.distributed is not initialised; call init_process_group first"
        return True, ""

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
             in_splits: list[int] | None, stage: str) -> _InFlight:
        try:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        except RuntimeError as err:
            raise TimeoutError(f"rank {self.rank}: EP stage '{stage}' could not reach its peers: "
                               f"{str(err).splitlines()[0]}") from err
        return _InFlight(work, stage)

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Exchange counts (waits for them), then start the payload exchange."""
        check_dispatch_args(x, routing, placement)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process "
                             f"group's world size ({self.world_size})")
        W, P_local = self.world_size, placement.local_experts
        phys = placement.physical_ids(routing.topk_ids, self.rank)
        send_order, counts = sort_pairs(phys, placement.num_physical)
        send_counts = rearrange(counts, "(w p) -> w p", w=W).contiguous()
        recv_counts = torch.empty_like(send_counts)
        _wait(self.rank, self.timeout_s, self._a2a(recv_counts, send_counts, None, None, "dispatch/counts"))
        # host copy of both split tables: the payload exchange needs its sizes on the host
        both = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = tuple(both[0]), tuple(both[1])
        rows = gather_rows(x, send_order, routing.topk_ids.shape[1])
        recv = rows.new_empty((sum(recv_splits), x.shape[1]))
        inflight = self._a2a(recv, rows, list(recv_splits), list(send_splits), "dispatch/payload")
        handle = Handle(send_order, routing.topk_weights, None, send_splits, recv_splits)
        return inflight, recv, recv_counts, P_local, handle

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Wait for the payload and sort the received rows by local expert."""
        inflight, recv, recv_counts, P_local, handle = pending
        _wait(self.rank, self.timeout_s, inflight)
        M = recv.shape[0]
        # received rows come grouped by source rank, then by local expert within each source
        local_expert = repeat(torch.arange(P_local, device=recv.device), "p -> (w p)", w=self.world_size)
        row_expert = torch.repeat_interleave(local_expert, recv_counts.flatten(), output_size=M)
        recv_order = torch.argsort(row_expert, stable=True)
        batch = ExpertBatch(recv.index_select(0, recv_order), recv_counts.sum(0))
        return batch, Handle(handle.send_order, handle.topk_weights, recv_order,
                             handle.send_splits, handle.recv_splits)

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Put rows back in received order and start sending them home."""
        if y.layout != "contiguous":
            raise ValueError(f"torch combine expects a contiguous ExpertBatch, got layout {y.layout!r}")
        if handle.recv_order is None or handle.send_splits is None or handle.recv_splits is None:
            raise ValueError("handle must come from TorchComm.dispatch_recv (it has no split tables)")
        if y.x.shape[0] != handle.recv_order.shape[0]:
            raise ValueError(f"y must have the {handle.recv_order.shape[0]} rows dispatch delivered, "
                             f"got {y.x.shape[0]}")
        back = torch.empty_like(y.x)
        back[handle.recv_order] = y.x
        home = y.x.new_empty((sum(handle.send_splits), y.x.shape[1]))
        inflight = self._a2a(home, back.contiguous(), list(handle.send_splits), list(handle.recv_splits),
                             "combine/payload")
        return inflight, home, handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Wait for this rank's rows and reduce them with the top-k weights."""
        inflight, home, handle = pending
        _wait(self.rank, self.timeout_s, inflight)
        return reduce_pairs(home, handle)
