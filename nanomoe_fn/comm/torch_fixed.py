"""`torch_fixed` comm: fixed-size dispatch/combine over all_to_all_single, no host sync.

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, H hidden, W ranks,
P_local slots per rank, C rows one rank may send to one rank (the rank capacity), N = T * k pairs.

Every rank sends every peer a [C, H] block (equal splits), so nothing about the routing has to
reach the host: the decode path, CUDA-graph capturable. The default C = T_max * min(k, P_local)
can never overflow (a token picks each expert at most once); a smaller C saves bandwidth, and a
block that would need more than C rows is an error (asynchronous on GPUs), never a drop. The batch
comes out in the masked layout [P_local, W * T_max, H] with per-expert counts: the layout and
sizing of DeepEP's low-latency mode and DeepGEMM's masked GEMM (one expert gets at most T_max rows
from each rank).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.checks import check_values
from nanomoe_fn.comm.plan import check_dispatch_args, gather_rows, invert_order, reduce_pairs, sort_pairs
from nanomoe_fn.comm.torch_dist import TorchComm, _wait
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


class TorchFixedComm(TorchComm):
    """Equal-split all_to_all dispatch/combine sized for at most `max_tokens` tokens per rank."""

    name = "torch_fixed"

    def __init__(self, max_tokens: int, rank_capacity: int | None = None, group: Any = None,
                 timeout_s: float = 60.0) -> None:
        super().__init__(group, timeout_s)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int (tokens per rank), got {max_tokens!r}")
        if rank_capacity is not None and (not isinstance(rank_capacity, int) or rank_capacity < 1):
            raise ValueError(f"rank_capacity must be a positive int or None, got {rank_capacity!r}")
        self.max_tokens = max_tokens
        self.rank_capacity = rank_capacity

    def block_rows(self, top_k: int, local_experts: int) -> int:
        """C: rows in each per-destination block."""
        return self.rank_capacity or self.max_tokens * min(top_k, local_experts)

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Scatter rows into fixed [W, C, H] blocks and start the exchange (counts ride along)."""
        check_dispatch_args(x, routing, placement)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process "
                             f"group's world size ({self.world_size})")
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"x has {x.shape[0]} tokens, more than this comm's max_tokens={self.max_tokens}")
        W, P_local, k = self.world_size, placement.local_experts, routing.topk_ids.shape[1]
        C = self.block_rows(k, P_local)
        phys = placement.physical_ids(routing.topk_ids, self.rank)
        send_order, counts = sort_pairs(phys, placement.num_physical)
        send_counts = rearrange(counts, "(w p) -> w p", w=W).contiguous()
        per_rank = send_counts.sum(1)
        check_values(per_rank.max() <= C, f"rank {self.rank}: more than rank_capacity={C} rows for one "
                                          f"destination rank; raise rank_capacity (or leave it None)")
        dest = phys.flatten().long()[send_order] // P_local
        within = torch.arange(send_order.numel(), device=x.device) - (torch.cumsum(per_rank, 0) - per_rank)[dest]
        slot_pos = dest * C + within.clamp_max(C - 1)  # each sent row's place in the [W * C] send buffer
        send = x.new_zeros((W * C, x.shape[1]))
        send[slot_pos] = gather_rows(x, send_order, k)
        recv = torch.empty_like(send)
        recv_counts = torch.empty_like(send_counts)
        counts_work = self._a2a(recv_counts, send_counts, None, None, "dispatch/counts")
        payload_work = self._a2a(recv, send, None, None, "dispatch/payload")
        return counts_work, payload_work, recv, recv_counts, Handle(send_order, routing.topk_weights,
                                                                    slot_pos=slot_pos)

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Wait; move each received row to its expert: masked [P_local, W * T_max, H]."""
        counts_work, payload_work, recv, recv_counts, handle = pending
        _wait(self.rank, self.timeout_s, counts_work)
        _wait(self.rank, self.timeout_s, payload_work)
        W, P_local = recv_counts.shape
        C, H, cap = recv.shape[0] // W, recv.shape[1], W * self.max_tokens
        # row j of source w's block belongs to local expert e where cum[w, e-1] <= j < cum[w, e]
        cum = torch.cumsum(recv_counts, 1)
        j = torch.arange(C, device=recv.device).expand(W, C).contiguous()
        expert = torch.searchsorted(cum, j, right=True)  # [W, C]; P_local = padding row
        e = expert.clamp_max(P_local - 1)
        within = j - (cum - recv_counts).gather(1, e)
        before = (torch.cumsum(recv_counts, 0) - recv_counts).gather(1, e)  # rows of e from earlier sources
        flat = torch.where(expert < P_local, e * cap + before + within, torch.full_like(e, P_local * cap))
        packed = recv.new_zeros((P_local * cap + 1, H))  # + a spare row that absorbs the padding
        packed[flat.flatten()] = recv
        batch = ExpertBatch(packed[:-1].view(P_local, cap, H), recv_counts.sum(0), "masked")
        return batch, Handle(handle.send_order, handle.topk_weights, slot_pos=handle.slot_pos,
                             pack_index=flat.flatten())

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Gather each block row back out of the masked batch and start sending blocks home."""
        if y.layout != "masked":
            raise ValueError(f"torch_fixed combine expects the masked ExpertBatch it dispatched, got {y.layout!r}")
        if handle.pack_index is None or handle.slot_pos is None:
            raise ValueError("handle must come from TorchFixedComm.dispatch_recv (it has no slot tables)")
        flat = torch.cat([y.x.reshape(-1, y.x.shape[-1]), y.x.new_zeros((1, y.x.shape[-1]))])
        back = flat.index_select(0, handle.pack_index)  # [W * C, H]
        home = torch.empty_like(back)
        return self._a2a(home, back, None, None, "combine/payload"), home, handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Wait; pick each pair's row out of the blocks and reduce with the top-k weights."""
        work, home, handle = pending
        _wait(self.rank, self.timeout_s, work)
        # pair t * k + j sits in send-order row inv[p], which went to block row slot_pos[inv[p]]
        return reduce_pairs(home, handle, handle.slot_pos[invert_order(handle.send_order)])
