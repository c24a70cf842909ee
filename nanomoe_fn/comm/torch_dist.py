"""`torch` comm: dispatch/combine over torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU).

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P_local slots per
rank, N = T * k rows sent, M rows received, Hw = H * itemsize / 8 (rows moved as 8-byte words).

Dispatch is one count exchange ([W, P_local] ints) and one payload exchange; combine is one payload
exchange back. The payload split sizes must be known on the host, so dispatch_send reads the counts
back once: one small D2H copy ([2, W * P_local] ints into pinned memory) and one event synchronize, the
only host sync of this comm (it is the prefill-style path; comm/torch_fixed.py is the sync-free
fixed-capacity path for decode). Nothing else waits on the host on GPUs: the count exchange runs on
the current stream and each payload exchange on NCCL's stream, joined by `Work.wait()` without a
timeout (a stream wait). A peer that never arrives is caught by the comm's StageWatchdog
(comm/watchdog.py): an error naming the rank and stage, never a hang. On CPU (gloo) every wait is
`Work.wait(timeout)` on the host, which raises the same kind of error.

Order of work on GPUs (one stream unless said): the count exchange and its copy to the host, then the
sort of the pairs and the row gather (queued behind the copy, so they run while the host waits for
it), the host read, the payload exchange on NCCL's stream, and one host-to-device copy of the
per-expert counts and the receive-side order, both built on the host from the counts it read (numpy,
while the rows travel: no device sort, no small kernels); dispatch_recv is one stream wait and one
gather. Combine: one scatter back, the exchange, the inverse of the send order (queued while the rows
travel), the weighted sum. Host work per call is kept to few torch ops (each is a kernel launch on
GPUs): constant tables (ones, 0..n-1) are cached, int32 ids are sorted as they are. Row copies move
8-byte words where the row size allows (same bytes, fewer and wider loads): results are
bit-identical to plain row indexing.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Handle
from nanomoe_fn.comm.plan import (
    check_combine,
    check_dispatch_args,
    check_pending,
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


def recv_plan(cnt: np.ndarray, W: int, P_local: int, pin: bool) -> tuple[list[int], list[int], torch.Tensor]:
    """From the exchanged counts cnt [2, W * P_local] (row 0 sent per slot, row 1 received per (source rank,
    local expert)): (send splits [W], recv splits [W], plan [P_local + M] int64 on the host, pinned with `pin`)
    where plan[:P_local] = rows per local expert and plan[P_local:] = recv_order, the received row of each
    batch row. Received rows come grouped by source rank, then local expert; the batch wants them by expert,
    then source rank (what a stable sort of their expert ids gives): segment (e, w) of the batch is rows
    recv_start[w, e] ... of the received buffer."""
    c = cnt.reshape(2, W, P_local)
    seg = c[1].T.ravel()  # [P_local * W] rows of segment (e, w), in batch order
    M = int(seg.sum())
    recv_start = (np.cumsum(c[1].ravel()) - c[1].ravel()).reshape(W, P_local).T.ravel()  # by (e, w)
    plan = torch.empty(P_local + M, dtype=torch.int64, pin_memory=pin)
    out = plan.numpy()
    out[:P_local] = c[1].sum(0)
    out[P_local:] = np.repeat(recv_start - (np.cumsum(seg) - seg), seg) + np.arange(M)
    return c[0].sum(1).tolist(), c[1].sum(1).tolist(), plan


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
        self._host_splits: torch.Tensor | None = None  # pinned [2, W * P_local] int64: the one host read
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

    def _ramp(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        """First n entries of a cached int64 table, ones ("ones") or 0, 1, 2, ... ("arange"), grown to the next
        power of two when n outgrows it: one entry per (name, device), so the cache stays flat however T
        varies. Only for this (never graph-captured) comm: a grown table frees the old one."""
        t = self._tables.get((name, device))
        if t is None or t.shape[0] < n:
            size = 1 << max(6, (n - 1).bit_length())
            self._tables.pop((name, device), None)
            t = self._table((name, device), lambda: torch.ones(size, dtype=torch.int64, device=device)
                            if name == "ones" else torch.arange(size, device=device))
        return t[:n]

    def _start_read(self, cnt: torch.Tensor, stage: str) -> Any:
        """Start the one host read of cnt [2, W * P_local]. GPU: a non-blocking copy into pinned memory and an
        event (which the watchdog polls too); work queued after this does not delay the read."""
        if not cnt.is_cuda:
            return cnt.numpy()
        if self._host_splits is None or self._host_splits.shape != cnt.shape:
            self._host_splits = torch.empty(cnt.shape, dtype=cnt.dtype, pin_memory=True)
        self._host_splits.copy_(cnt, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(cnt.device))
        self.watchdog.arm(stage, done, cnt.device)
        return done

    def _finish_read(self, started: Any) -> np.ndarray:
        """Wait for the read (one event synchronize, no polling loop) -> the counts [2, W * P_local] (numpy)."""
        if isinstance(started, np.ndarray):
            return started
        try:
            started.synchronize()  # releases the GIL: the watchdog thread runs (and aborts) meanwhile
        finally:
            self.check()  # an absent peer: the error, not the garbage counts
        return self._host_splits.numpy()

    def _phys(self, x: torch.Tensor, routing: Routing, placement: Placement) -> torch.Tensor:
        """Checks; the physical slot of each (token, k) pair, flat [N] (int32 or int64)."""
        self.check()
        check_dispatch_args(x, routing, placement)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process "
                             f"group's world size ({self.world_size})")
        # identity: the ids are the slots, int32 or int64 as given (no widening copy: index_add_ and the
        # stable argsort take either and give the same counts and order)
        ids = routing.topk_ids if placement.is_identity else placement.physical_ids(routing.topk_ids, self.rank)
        return ids.reshape(-1)

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Exchange counts, read them (the one host sync), start the payload exchange."""
        phys = self._phys(x, routing, placement)
        W, P_local, k, dev = self.world_size, placement.local_experts, routing.topk_ids.shape[1], x.device
        on_gpu = x.is_cuda
        cnt = torch.zeros((2, W * P_local), dtype=torch.int64, device=dev)  # row 0: rows sent per slot; 1: received
        cnt[0].index_add_(0, phys, self._ramp("ones", phys.shape[0], dev))
        # GPU: on the current stream (async_op=False launches there, no host wait); its completion is
        # watched through the host read. CPU: a host wait with the timeout.
        exchange = self._a2a(cnt[1], cnt[0], None, None, "dispatch/counts", async_op=not on_gpu)
        if not on_gpu:
            self._host_wait(exchange)
        read = self._start_read(cnt, "dispatch/counts")
        # queued behind the read, so on GPUs they run while the host waits for it
        send_order = torch.argsort(phys, stable=True)  # [N]: pairs sorted by slot (rank, then local expert)
        rows = wide_rows(x).index_select(0, send_order // k)  # [N, Hw]
        send_splits, recv_splits, plan = recv_plan(self._finish_read(read), W, P_local, on_gpu)
        recv = rows.new_empty((plan.shape[0] - P_local, rows.shape[1]))  # [M, Hw]
        inflight = self._a2a(recv, rows, recv_splits, send_splits, "dispatch/payload")
        # the per-expert counts and the receive-side order, built on the host from the counts it read (no
        # sort on the device), go over in one copy, queued while the payload travels on NCCL's stream
        plan = plan.to(dev, non_blocking=True)  # [P_local + M]
        counts, recv_order = plan[:P_local], plan[P_local:]
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
        # row of `home` per pair (inv[send_order[i]] = i, as plan.invert_order), queued while rows travel
        order = handle.send_order
        pair_rows = torch.empty_like(order).index_copy_(0, order, self._ramp("arange", order.shape[0], order.device))
        return inflight, home, handle, pair_rows, y.x.dtype

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Join the exchange and reduce this rank's rows with the top-k weights -> [T, H]."""
        inflight, home, handle, pair_rows, dtype = pending
        self.check()
        self._join(inflight, home.device)
        return reduce_pairs(home.view(dtype), handle, pair_rows)
