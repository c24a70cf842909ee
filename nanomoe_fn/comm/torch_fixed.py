"""`torch_fixed` comm: fixed-size dispatch/combine over all_to_all_single, no host sync (decode only).

Dimension legend: T tokens on this rank (T <= T_max = max_tokens), k experts per token, H hidden, W
ranks, P_local slots per rank, C rows one rank may send to one rank (the rank capacity), N = T * k
pairs, cap = W * T_max rows per expert in the masked batch, Hw = H * itemsize / 8 (8-byte words).

Every rank sends every peer a [C, H] block (equal splits), so nothing about the routing has to
reach the host: the decode path, CUDA-graph capturable on NCCL (no `.item()`, no host reads, no
Python branch on tensor values; the collectives join the current stream through `Work.wait()`
without a timeout, and the comm's StageWatchdog (comm/watchdog.py) turns a peer that never arrives
into an error naming the rank and stage, raised by the next call). The default C = T_max * min(k,
P_local) can never overflow (a token picks each expert at most once); a smaller C saves bandwidth,
and a block that would need more than C rows is an error on every rank, never a drop: the count exchange
carries each sender's fullest block (a ValueError before the payload on CPUs, a device assert on GPUs). A rank
given more than T_max tokens sends none of them but takes part in both exchanges, and its combine raises. The
batch comes out in the masked layout [P_local, cap, H] with per-expert counts: the layout and sizing
of DeepEP's low-latency mode and DeepGEMM's masked GEMM (one expert gets at most T_max rows from
each rank). Padding rows (past each expert's count) hold unspecified values, as in DeepEP's
low-latency buffers; nothing reads them.

Sizes: the masked batch is P_local * W * T_max rows and the blocks W * C rows each way. At prefill
sizes (T_max 4096, DeepSeek-V3 dims, 2 ranks) that is 15 GB and 4x the bytes the rows need, so a
dispatch whose buffers would pass `max_buffer_bytes` (default 2 GiB) is refused with a ValueError
that names max_tokens and the bytes: use the `torch` (exact splits) or `nvlink` comm for prefill.
"""

from __future__ import annotations

from typing import Any

import torch

from nanomoe_fn.batch import ExpertBatch, Handle, Routing
from nanomoe_fn.checks import check_values
from nanomoe_fn.comm.plan import check_combine, check_pending, reduce_pairs, stamp_handle
from nanomoe_fn.comm.torch_blocks import DEFAULT_MAX_BUFFER_BYTES, refuse_oversized
from nanomoe_fn.comm.torch_dist import TorchComm
from nanomoe_fn.eplb.placement import Placement


def wide_rows(t: torch.Tensor) -> torch.Tensor:
    """t [R, H] viewed as 8-byte words [R, Hw] when its rows allow (same bytes), else t itself.
    Row gathers/scatters then copy 8 bytes per element instead of 2 (bf16)."""
    size = t.element_size()
    if (t.dim() == 2 and size < 8 and t.is_contiguous() and (t.shape[1] * size) % 8 == 0
            and (t.storage_offset() * size) % 8 == 0):
        return t.view(torch.int64)
    return t


class TorchFixedComm(TorchComm):
    """Equal-split all_to_all dispatch/combine sized for at most `max_tokens` tokens per rank.

    max_buffer_bytes: the most one dispatch's buffers (masked batch + send/receive blocks) may take;
    larger sizes are refused at the first dispatch_send (where H and the dtype are known).
    """

    name = "torch_fixed"

    def __init__(self, max_tokens: int, rank_capacity: int | None = None, group: Any = None,
                 timeout_s: float = 60.0, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES) -> None:
        super().__init__(group, timeout_s)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int (tokens per rank), got {max_tokens!r}")
        if rank_capacity is not None and (not isinstance(rank_capacity, int) or rank_capacity < 1):
            raise ValueError(f"rank_capacity must be a positive int or None, got {rank_capacity!r}")
        if not isinstance(max_buffer_bytes, int) or max_buffer_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be a positive int, got {max_buffer_bytes!r}")
        self.max_tokens = max_tokens
        self.rank_capacity = rank_capacity
        self.max_buffer_bytes = max_buffer_bytes

    def block_rows(self, top_k: int, local_experts: int) -> int:
        """C: rows in each per-destination block."""
        return self.rank_capacity or self.max_tokens * min(top_k, local_experts)

    def buffer_bytes(self, hidden: int, dtype: torch.dtype, top_k: int, local_experts: int) -> int:
        """Bytes of one dispatch's buffers: the masked batch [P_local, W * T_max, H] with its W * C
        spare rows, and the send and receive blocks [W * C, H]."""
        W, C = self.world_size, self.block_rows(top_k, local_experts)
        row = hidden * torch.empty((), dtype=dtype).element_size()
        return (local_experts * W * self.max_tokens + 3 * W * C) * row

    def _check_size(self, hidden: int, dtype: torch.dtype, top_k: int, local_experts: int) -> None:
        need = self.buffer_bytes(hidden, dtype, top_k, local_experts)
        if need > self.max_buffer_bytes:
            raise ValueError(
                f"torch_fixed with max_tokens={self.max_tokens} would need {need / 2**30:.2f} GiB of buffers per "
                f"dispatch (masked batch [P_local={local_experts}, W * max_tokens={self.world_size * self.max_tokens}, "
                f"H={hidden}] + blocks [W * C={self.world_size * self.block_rows(top_k, local_experts)}, H] in "
                f"{dtype}), more than max_buffer_bytes={self.max_buffer_bytes}; torch_fixed is a decode path: "
                f"use the `torch` or `nvlink` comm for prefill-sized batches (or lower max_tokens)")

    def _check_blocks(self, fullest: torch.Tensor, C: int) -> None:
        """fullest [W]: each sender's fullest block (rows for one destination rank), from the count exchange, so
        every rank finds any rank's overflow: ValueError on the CPU (naming the senders), else a device assert."""
        what = f"rank {self.rank}: more than rank_capacity={C} rows for one destination rank"
        fix = "raise rank_capacity (or leave it None)"
        if fullest.device.type == "cpu" and not torch.compiler.is_compiling():
            over = (fullest > C).nonzero().flatten().tolist()
            if over:
                raise ValueError(f"{what} (sent by rank(s) {over}); {fix}")
            return
        check_values((fullest <= C).all(), f"{what} (sent by some rank); {fix}")

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Place rows in fixed [W, C] blocks, start both exchanges, and queue the receive-side index."""
        phys = self._phys(x, routing, placement)
        if x.shape[0] > self.max_tokens:  # refused by combine_recv (torch_blocks.refuse_oversized): no peer waits
            x, phys = x[:0], phys[:0]
        W, P_local, k = self.world_size, placement.local_experts, routing.topk_ids.shape[1]
        C, cap, dev = self.block_rows(k, P_local), W * self.max_tokens, x.device
        self._check_size(x.shape[1], x.dtype, k, P_local)
        N = phys.shape[0]  # <= T_max * k: the cached tables below never grow (safe in captured graphs)
        ones = self._table(("ones", self.max_tokens * k, dev), lambda: torch.ones(self.max_tokens * k,
                                                                                  dtype=torch.int64, device=dev))
        # the count table sent to each rank [W, P_local + 1]: the rows for its experts, then this rank's
        # fullest block (the same in every row), so every rank learns every sender's overflow
        send_counts = torch.zeros(W * P_local, dtype=torch.int64, device=dev)
        send_counts.index_add_(0, phys, ones[:N])
        send_counts = send_counts.view(W, P_local)
        per_rank = send_counts.sum(1)  # [W]
        send_tab = torch.cat([send_counts, per_rank.max().expand(W, 1)], 1)
        recv_tab = torch.empty_like(send_tab)
        recv_counts = recv_tab[:, :P_local]
        counts = self._a2a(recv_tab, send_tab, None, None, "dispatch/counts")
        on_host = dev.type == "cpu" and not torch.compiler.is_compiling()
        if on_host:  # every rank raises here, before the payload: no rank is left waiting for a peer that raised
            self._join(counts, dev)
            self._check_blocks(recv_tab[:, P_local], C)
        # each sent row's place in the [W * C] send buffer: its index in send order, shifted so that
        # destination d's rows start at d * C (clamped: an overflow, already an error, stays in bounds)
        send_order = torch.argsort(phys, stable=True)  # [N]: pairs sorted by slot (rank, then local expert)
        dest = phys.index_select(0, send_order) // P_local
        shift = self._table(("shift", W, C, dev), lambda: torch.arange(W, device=dev) * C) - (
            torch.cumsum(per_rank, 0) - per_rank)
        ramp = self._table(("ramp", self.max_tokens * k, dev), lambda: torch.arange(self.max_tokens * k, device=dev))
        slot_pos = (ramp[:N] + shift[dest]).clamp_(max=W * C - 1)
        xw = wide_rows(x)
        send = xw.new_empty((W * C, xw.shape[1]))  # padding rows are sent as they are: nobody reads them
        send.index_copy_(0, slot_pos, xw.index_select(0, send_order // k))
        recv = torch.empty_like(send)
        payload = self._a2a(recv, send, None, None, "dispatch/payload")
        if not on_host:  # no host read: a device assert on every rank (the payload's watch covers the counts)
            self._join(counts, dev, watch=False)
            self._check_blocks(recv_tab[:, P_local], C)
        # where row j of source w's block goes in the masked batch (flat over [P_local * cap] + spare rows):
        # with reps [W, P_local + 1] = each expert's rows then the block's padding, segment (w, e) starts
        # at e * cap + (rows of e from sources < w) and at w * C + (rows before e in block w) in the
        # buffer, so flat = buffer row + cumsum_w(reps) - cumsum_e(reps) + e * cap - w * C (the inclusive
        # sums differ from the exclusive ones by the same count); padding lands in the spare rows
        reps = torch.cat([recv_counts, C - recv_counts.sum(1, keepdim=True)], 1)
        table = self._table(("base", W, P_local, C, cap, dev), lambda: (
            torch.arange(P_local + 1, device=dev) * cap - (torch.arange(W, device=dev) * C)[:, None]))
        base = torch.cumsum(reps, 0) - torch.cumsum(reps, 1) + table
        flat = torch.repeat_interleave(base.flatten(), reps.flatten(), output_size=W * C)
        flat += self._table(("rows", W * C, dev), lambda: torch.arange(W * C, device=dev))
        handle = Handle(send_order, routing.topk_weights, slot_pos=slot_pos, pack_index=flat)
        return payload, recv, recv_counts.sum(0), handle, (P_local, cap, x.dtype)

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Join the payload; move each received row to its expert: masked [P_local, W * T_max, H]."""
        check_pending(isinstance(pending, tuple) and len(pending) == 5 and isinstance(pending[3], Handle)
                      and pending[3].pack_index is not None, self, pending)
        payload, recv, counts, handle, (P_local, cap, dtype) = pending
        self.check()
        self._join(payload, recv.device)
        packed = recv.new_empty((P_local * cap + recv.shape[0], recv.shape[1]))  # + spare rows for the padding
        packed.index_copy_(0, handle.pack_index, recv)
        batch = ExpertBatch(packed[: P_local * cap].view(P_local, cap, -1).view(dtype), counts, "masked")
        return batch, stamp_handle(self, batch, handle)

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Gather each block row back out of the masked batch and start sending blocks home."""
        self.check()
        check_combine(self, y, handle)  # host only, before the exchange: a refusing rank leaves no peer waiting
        if handle.pack_index is None or handle.slot_pos is None:
            raise ValueError("handle must come from TorchFixedComm.dispatch_recv (it has no slot tables)")
        rows = y.x.shape[0] * y.x.shape[1]
        yw = wide_rows(y.x.reshape(rows, y.x.shape[2]))
        # padding block rows (pack_index >= rows) fetch any valid row: combine_recv never reads them
        back = yw.index_select(0, handle.pack_index.clamp_max(rows - 1))  # [W * C, Hw]
        home = torch.empty_like(back)
        work = self._a2a(home, back, None, None, "combine/payload")
        # block row of `home` holding pair t * k + j (queued while the blocks travel)
        pair_rows = torch.empty_like(handle.slot_pos).index_copy_(0, handle.send_order, handle.slot_pos)
        return work, home, handle, pair_rows, y.x.dtype

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Join; pick each pair's row out of the blocks and reduce with the top-k weights -> [T, H]."""
        work, home, handle, pair_rows, dtype = pending
        self.check()
        self._join(work, home.device)
        refuse_oversized(self, handle)
        return reduce_pairs(home.view(dtype), handle, pair_rows)
