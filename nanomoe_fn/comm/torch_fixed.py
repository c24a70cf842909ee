"""`torch_fixed` comm: fixed-capacity dispatch/combine over all_to_all_single, no host sync.

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P_local slots per
rank, P = W * P_local slots, C rows one rank may send to one slot (the capacity), N = T * k pairs.

Every rank sends every peer a [P_local, C, H] block (equal splits), so nothing about the routing
has to reach the host: the decode path, CUDA-graph capturable. C = the largest T any rank holds can
never overflow (a token picks each expert at most once); a smaller C saves memory and bandwidth,
and a slot that would receive more than C rows from one rank is an error (asynchronous on GPUs),
never a drop. The batch comes out in the masked layout [P_local, W * C, H] with per-expert counts,
the layout DeepEP's low-latency mode and DeepGEMM's masked GEMM use.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.checks import check_values
from nanomoe_fn.comm.plan import check_dispatch_args, gather_rows, reduce_pairs, sort_pairs
from nanomoe_fn.comm.torch_dist import TorchComm, _wait
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


class TorchFixedComm(TorchComm):
    """Equal-split all_to_all dispatch/combine with a fixed per-(rank, slot) capacity."""

    name = "torch_fixed"

    def __init__(self, capacity: int, group: Any = None, timeout_s: float = 60.0) -> None:
        super().__init__(group, timeout_s)
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (rows per rank and slot), got {capacity!r}")
        self.capacity = capacity

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Scatter rows into fixed [P, C, H] slots and start the exchange (counts ride along)."""
        check_dispatch_args(x, routing, placement)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process "
                             f"group's world size ({self.world_size})")
        C, P, k = self.capacity, placement.num_physical, routing.topk_ids.shape[1]
        phys = placement.physical_ids(routing.topk_ids, self.rank)
        send_order, counts = sort_pairs(phys, P)
        if P:
            check_values(counts.max() <= C, f"rank {self.rank}: a slot received more than capacity={C} rows "
                                            f"from this rank; raise the torch_fixed capacity")
        slot_sorted = phys.flatten().long()[send_order]
        within = torch.arange(send_order.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[slot_sorted]
        # position of each sent pair in the flat [P * C] send buffer
        flat_pos = slot_sorted * C + within.clamp_max(C - 1)
        send = x.new_zeros((P * C, x.shape[1]))
        send[flat_pos] = gather_rows(x, send_order, k)
        recv = torch.empty_like(send)
        send_counts = rearrange(counts, "(w p) -> w p", w=self.world_size).contiguous()
        recv_counts = torch.empty_like(send_counts)
        counts_work = self._a2a(recv_counts, send_counts, None, None, "dispatch/counts")
        payload_work = self._a2a(recv, send, None, None, "dispatch/payload")
        return counts_work, payload_work, recv, recv_counts, send_order, flat_pos, routing.topk_weights

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Wait; pack each slot's rows from all sources to the front: masked [P_local, W * C, H]."""
        counts_work, payload_work, recv, recv_counts, send_order, flat_pos, weights = pending
        _wait(self.rank, self.timeout_s, counts_work)
        _wait(self.rank, self.timeout_s, payload_work)
        W, C = self.world_size, self.capacity
        P_local, H = recv_counts.shape[1], recv.shape[1]
        blocks = rearrange(recv, "(w p c) h -> p (w c) h", w=W, c=C)  # [P_local, W * C, H], gaps between sources
        # destination of each received (source w, slot e, row j) in the packed masked layout
        starts = torch.cumsum(recv_counts, 0) - recv_counts  # [W, P_local]: rows before source w
        j = torch.arange(C, device=recv.device)
        valid = j.view(1, 1, C) < recv_counts.unsqueeze(-1)  # [W, P_local, C]
        dest = starts.unsqueeze(-1) + j.view(1, 1, C)
        dest = torch.where(valid, dest, torch.full_like(dest, W * C))  # invalid rows land in a spare row
        dest = rearrange(dest, "w p c -> p (w c)")
        packed = recv.new_zeros((P_local, W * C + 1, H))
        packed.scatter_(1, dest.unsqueeze(-1).expand(-1, -1, H), blocks)
        batch = ExpertBatch(packed[:, : W * C], recv_counts.sum(0), "masked")
        handle = Handle(send_order, weights, slot_pos=flat_pos, pack_index=dest)
        return batch, handle

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Unpack each slot's rows back into per-source blocks and start sending them home."""
        if y.layout != "masked":
            raise ValueError(f"torch_fixed combine expects the masked ExpertBatch it dispatched, got {y.layout!r}")
        W = self.world_size
        P_local, _, H = y.x.shape
        if handle.pack_index is None or handle.slot_pos is None:
            raise ValueError("handle must come from TorchFixedComm.dispatch_recv (it has no slot tables)")
        dest = handle.pack_index
        padded = torch.cat([y.x, y.x.new_zeros((P_local, 1, H))], dim=1)
        blocks = padded.gather(1, dest.unsqueeze(-1).expand(-1, -1, H))  # [P_local, W * C, H]
        back = rearrange(blocks, "p (w c) h -> (w p c) h", w=W).contiguous()
        home = torch.empty_like(back)
        return self._a2a(home, back, None, None, "combine/payload"), home, handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Wait; pick each pair's row out of the fixed slots and reduce with the top-k weights."""
        work, home, handle = pending
        _wait(self.rank, self.timeout_s, work)
        return reduce_pairs(home.index_select(0, handle.slot_pos), handle)
