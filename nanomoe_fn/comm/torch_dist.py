"""`torch` comm: dispatch/combine over torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU).

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P_local slots per
rank, N = T * k rows sent, M rows received, Hw = H * itemsize / 8 (rows moved as 8-byte words).

Dispatch is one count exchange ([W, P_local] ints) and one payload exchange; combine is one payload
exchange back. The payload split sizes must be known on the host, so dispatch_send reads the
per-rank sums of the counts back once: one small D2H copy ([2, W] ints into pinned memory) and one
event synchronize, the only host sync of this comm (it is the prefill-style path; comm/torch_fixed.py
is the sync-free fixed-capacity path for decode). Nothing else waits on the host on GPUs: the count
exchange runs on the current stream and each payload exchange on NCCL's stream, joined by
`Work.wait()` without a timeout (a stream wait). A peer that never arrives is caught by the
comm's StageWatchdog (comm/watchdog.py): an error naming the rank and stage, never a hang. On CPU
(gloo) every wait is `Work.wait(timeout)` on the host, which raises the same kind of error.

Order of work on GPUs (one stream unless said): the count exchange, the per-rank sums and their copy
to the host, then the sort of the pairs and the row gather (queued behind the copy, so they run
while the host waits for it), the host read, the payload exchange on NCCL's stream, and the
receive-side order (repeat_interleave + argsort of M expert ids, queued now so it runs while the
rows travel); dispatch_recv is one stream wait and one gather. Combine: one scatter back, the
exchange, the inverse of the send order (queued while the rows travel), the weighted sum. Row copies
move 8-byte words where the row size allows (same bytes, fewer and wider loads): results are
bit-identical to plain row indexing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.comm.plan import (
    check_combine,
    check_dispatch_args,
    check_pending,
    invert_order,
    reduce_pairs,
    stamp_handle,
)
from nanomoe_fn.comm.watchdog import StageWatchdog
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing


@dataclass
class _InFlight:
    work: Any
    stage: str


def _wait(rank: int, timeout_s: float, inflight: _InFlight) -> None:
    """Host wait for a CPU (gloo) collective; a peer that does not arrive in time raises TimeoutError
    naming the stage. Never used for CUDA tensors (there the stream waits, see TorchComm._join)."""
    try:
        ok = inflight.work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # gloo reports timeouts and vanished peers as RuntimeError
        raise TimeoutError(
            f"rank {rank}: EP stage '{inflight.stage}' failed waiting for peers "
            f"(timeout {timeout_s:g}s): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if ok is False:
        raise TimeoutError(f"rank {rank}: EP stage '{inflight.stage}' timed out after {timeout_s:g}s")


def wide_rows(t: torch.Tensor) -> torch.Tensor:
    """t [R, H] viewed as 8-byte words [R, Hw] when its rows allow (same bytes), else t itself.
    Row gathers/scatters then copy 8 bytes per element instead of 2 (bf16)."""
    size = t.element_size()
    if (t.dim() == 2 and size < 8 and t.is_contiguous() and (t.shape[1] * size) % 8 == 0
            and (t.storage_offset() * size) % 8 == 0):
        return t.view(torch.int64)
    return t


class TorchComm:
    """all_to_all_single dispatch/combine over an initialised torch.distributed process group.

    timeout_s: how long a stage may wait for peers (on GPUs keep it below the process group's own
    timeout, the backstop; see comm/watchdog.py). After a timeout the comm is unusable: every call
    raises the error (`check()`); `close()` stops the watchdog thread.
    """

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
        self.watchdog = StageWatchdog(self.rank, self.timeout_s, group)
        self._tables: dict[tuple, torch.Tensor] = {}  # constant index tables by (name, sizes, device)
        self._host_splits: torch.Tensor | None = None  # pinned [2, W] int64: the one host read
        self._failed: TimeoutError | None = None  # a failed host wait (CPU path): every later call raises it

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Available once torch.distributed has a default process group."""
        if not dist.is_available():
            return False, "torch.distributed is not available in this torch build"
        if not dist.is_initialized():
            return False, "torch.distributed is not initialised; call init_process_group first"
        return True, ""

    def check(self) -> None:
        """Raise the error of a stage that timed out on this rank (host attribute read, no sync)."""
        if self._failed is not None:  # a host wait that failed (gloo): the comm stays failed
            raise TimeoutError(*self._failed.args)
        self.watchdog.check()

    def _host_wait(self, inflight: _InFlight) -> None:
        """The host-side wait of the CPU path; its failure is kept, so every later call raises it at once."""
        try:
            _wait(self.rank, self.timeout_s, inflight)
        except TimeoutError as err:
            self._failed = err
            raise

    def close(self) -> None:
        """Stop the watchdog thread (the process group stays as it is)."""
        self.watchdog.close()

    def _table(self, key: tuple, make: Any) -> torch.Tensor:
        """A constant index tensor, built once per key (not cached while a CUDA graph is captured:
        its kernels would not run before the graph does)."""
        t = self._tables.get(key)
        if t is None:
            t = make()
            if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._tables[key] = t
        return t

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None,
             in_splits: list[int] | None, stage: str, async_op: bool = True) -> _InFlight:
        """Launch all_to_all_single. async_op=False on CUDA runs it on the current stream (no host wait)."""
        try:
            work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)
        except RuntimeError as err:
            raise TimeoutError(f"rank {self.rank}: EP stage '{stage}' could not reach its peers: "
                               f"{str(err).splitlines()[0]}") from err
        return _InFlight(work, stage)

    def _join(self, inflight: _InFlight, device: torch.device, watch: bool = True) -> None:
        """Make the current stream wait for a collective (GPU; then watch it unless a later stage's watch
        covers it) or wait on the host with the timeout (CPU)."""
        if device.type == "cuda":
            inflight.work.wait()  # no timeout: the stream waits, the host does not
            if watch:
                self.watchdog.arm(inflight.stage, device=device)
        else:
            self._host_wait(inflight)

    def _start_read(self, sums: torch.Tensor, stage: str) -> Any:
        """Start the one host read of sums [2, W]. GPU: a non-blocking copy into pinned memory and an
        event (which the watchdog polls too); work queued after this does not delay the read."""
        if not sums.is_cuda:
            return sums.tolist()
        if self._host_splits is None or self._host_splits.shape != sums.shape:
            self._host_splits = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        self._host_splits.copy_(sums, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(sums.device))
        self.watchdog.arm(stage, done, sums.device)
        return done

    def _finish_read(self, started: Any) -> list[list[int]]:
        """Wait for the read (one event synchronize, no polling loop) -> [[send splits], [recv splits]]."""
        if isinstance(started, list):
            return started
        try:
            started.synchronize()  # releases the GIL: the watchdog thread runs (and aborts) meanwhile
        finally:
            self.check()  # an absent peer: the error, not the garbage counts
        return self._host_splits.tolist()

    def _phys(self, x: torch.Tensor, routing: Routing, placement: Placement) -> torch.Tensor:
        """Checks; the physical slot of each (token, k) pair, flat [N] int64."""
        self.check()
        check_dispatch_args(x, routing, placement)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process "
                             f"group's world size ({self.world_size})")
        return placement.physical_ids(routing.topk_ids, self.rank).reshape(-1).long()

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Exchange counts, read their per-rank sums (the one host sync), start the payload exchange."""
        phys = self._phys(x, routing, placement)
        W, P_local, k = self.world_size, placement.local_experts, routing.topk_ids.shape[1]
        on_gpu = x.is_cuda
        cnt = phys.new_zeros((2, W * P_local))  # row 0: rows this rank sends per slot; row 1: rows it receives
        cnt[0].index_add_(0, phys, torch.ones_like(phys))
        # GPU: on the current stream (async_op=False launches there, no host wait); its completion is
        # watched through the host read. CPU: a host wait with the timeout.
        exchange = self._a2a(cnt[1], cnt[0], None, None, "dispatch/counts", async_op=not on_gpu)
        if not on_gpu:
            self._host_wait(exchange)
        read = self._start_read(cnt.view(2, W, P_local).sum(2), "dispatch/counts")
        # queued behind the read, so on GPUs they run while the host waits for it
        send_order = torch.argsort(phys, stable=True)  # [N]: pairs sorted by slot (rank, then local expert)
        rows = wide_rows(x).index_select(0, send_order // k)  # [N, Hw]
        send_splits, recv_splits = self._finish_read(read)
        recv = rows.new_empty((sum(recv_splits), rows.shape[1]))
        inflight = self._a2a(recv, rows, recv_splits, send_splits, "dispatch/payload")
        # received rows come grouped by source rank, then by local expert: order them by expert
        # (queued now, so on GPUs it runs while the payload travels on NCCL's stream)
        small = torch.int16 if P_local < 2**15 else torch.int32  # narrow sort keys: fewer radix passes
        expert_of_seg = self._table(("seg", W, P_local, x.device),
                                    lambda: torch.arange(P_local, device=x.device, dtype=small).repeat(W))
        row_expert = torch.repeat_interleave(expert_of_seg, cnt[1], output_size=recv.shape[0])
        recv_order = torch.argsort(row_expert, stable=True)  # [M]: received row of each batch row
        counts = cnt[1].view(W, P_local).sum(0)
        handle = Handle(send_order, routing.topk_weights, recv_order, tuple(send_splits), tuple(recv_splits))
        return inflight, recv, counts, handle, x.dtype

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Join the payload exchange and gather the received rows into expert order."""
        check_pending(isinstance(pending, tuple) and len(pending) == 5 and isinstance(pending[3], Handle)
                      and pending[3].recv_order is not None, self, pending)
        inflight, recv, counts, handle, dtype = pending
        self.check()
        self._join(inflight, recv.device)
        batch_x = recv.index_select(0, handle.recv_order).view(dtype)  # [M, H]
        batch = ExpertBatch(batch_x, counts)
        return batch, stamp_handle(self, batch, handle)

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Put rows back in received order and start sending them home."""
        self.check()
        check_combine(self, y, handle)  # host only, before the exchange: a refusing rank leaves no peer waiting
        if handle.recv_order is None or handle.send_splits is None or handle.recv_splits is None:
            raise ValueError("handle must come from TorchComm.dispatch_recv (it has no split tables)")
        yw = wide_rows(y.x.contiguous())
        back = torch.empty_like(yw).index_copy_(0, handle.recv_order, yw)  # back[recv_order[i]] = y[i]
        home = yw.new_empty((sum(handle.send_splits), yw.shape[1]))
        inflight = self._a2a(home, back, list(handle.send_splits), list(handle.recv_splits), "combine/payload")
        pair_rows = invert_order(handle.send_order)  # row of `home` per pair, queued while rows travel
        return inflight, home, handle, pair_rows, y.x.dtype

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Join the exchange and reduce this rank's rows with the top-k weights -> [T, H]."""
        inflight, home, handle, pair_rows, dtype = pending
        self.check()
        self._join(inflight, home.device)
        return reduce_pairs(home.view(dtype), handle, pair_rows)
