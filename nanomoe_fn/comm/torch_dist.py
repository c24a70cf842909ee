"""`torch` comm: dispatch/combine over torch.distributed all-to-all (NCCL on GPUs, gloo on CPU).

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P slots, P_local = P // W,
L row length, R_out rows sent, R_in rows received, M batch rows (pairs this rank's experts take).

One row per (token, destination rank) (comm/token_rows.py): a token crosses to a rank once however many
of its k experts live there, with its slot ids and weights packed into the row, so the receiver needs
nothing else to place it (k = 8 over 2 ranks: about 4x fewer bytes than one row per pair). Dispatch:
  1. pack: count this rank's pairs per slot and rows per rank into the count table tab [W, P_local + 2]
     (with the ids outside [0, P) found here) and write the rows (on GPUs one Triton kernel,
     kernels/ep_rows.py, into per-destination blocks; on CPUs torch ops);
  2. exchange the count tables (one small all_to_all_single) and read them on the host: the payload's
     split sizes must be known there (one D2H copy and one event wait, the only host sync of this comm).
     An id outside [0, P) on any rank is in every rank's table: every rank raises ValueError there, no
     rows move;
  3. exchange the rows (all_to_all on GPUs, sent from the blocks; all_to_all_single on CPUs);
  4. dispatch_recv: the stream waits for the rows, then each pair gets its batch row (experts in order,
     source ranks in order inside each; on GPUs one kernel, from the received table and the pair numbers
     packed in the rows). The batch is "gathered" (batch.py): x is the received rows
     [R_in, H] (a view with row stride L), index [M] their batch rows; nothing is copied k times.
Combine: each received row's pairs are summed with their weights here (float32), one partial row goes
back to the token's rank (one all_to_all_single), and that rank adds its partial rows.

Nothing else waits on the host on GPUs: the count exchange runs on the current stream, each payload
exchange on NCCL's stream joined by `Work.wait()` without a timeout (a stream wait). A peer that never
arrives is caught by the comm's StageWatchdog (comm/watchdog.py): an error naming the rank and stage,
never a hang. On CPU (gloo) every wait is `Work.wait(timeout)` on the host, which raises the same kind
of error. Host time is most of a decode dispatch (its kernels take a few us each), so the GPU path keeps
its Python short: one kernel per step, one watchdog arm per dispatch. `_a2a`, `_join` and `_table` serve
comm/torch_fixed.py too.

`TorchComm(max_tokens=T_max)` is the decode mode (comm/torch_blocks.py): fixed blocks of T_max + 1 rows per
destination, no count exchange and no host read, a masked batch; CUDA-graph capturable; with graphs=True (opt-in)
its eager GPU calls replay graphs of their own (comm/torch_graphs.py). max_tokens None: exact splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Handle, Routing, TokenRowPlan
from nanomoe_fn.comm import token_rows, torch_blocks, torch_graphs
from nanomoe_fn.comm.plan import check_combine, check_dispatch_args, check_pending, stamp_handle
from nanomoe_fn.comm.watchdog import InFlight, StageWatchdog, host_wait
from nanomoe_fn.eplb.placement import Placement


@dataclass
class _Pending:
    """What dispatch_send hands to dispatch_recv."""

    inflight: InFlight
    recv: torch.Tensor  # [R_in, L]
    tab: torch.Tensor  # [2, W, P_local + 2]: sent, received
    pos: torch.Tensor  # [T, W]
    M: int
    kernels: Any
    hidden: int
    hm: int
    topk_weights: torch.Tensor
    splits: tuple[tuple[int, ...], tuple[int, ...]]  # rows sent to / received from each rank


class TorchComm:
    """All-to-all dispatch/combine of token rows over an initialised torch.distributed process group.

    timeout_s: how long a stage may wait for peers (on GPUs keep it below the process group's own
    timeout, the backstop; see comm/watchdog.py). After a timeout the comm is unusable: every call
    raises the error (`check()`); `close()` stops the watchdog thread. max_tokens: None (exact splits, one
    host read per dispatch) or the most tokens a rank dispatches at once (the decode mode, module docstring;
    its buffers may take at most max_buffer_bytes per dispatch). graphs (opt-in, default False): the decode mode's
    eager calls on GPUs replay CUDA graphs (comm/torch_graphs.py); then call `close()` before destroy_process_group,
    which NCCL holds forever while a graph of its collectives lives. False: every call launches its own.
    """

    name = "torch"

    def __init__(self, group: Any = None, timeout_s: float = 60.0, max_tokens: int | None = None,
                 max_buffer_bytes: int = torch_blocks.DEFAULT_MAX_BUFFER_BYTES, graphs: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("the torch comm needs torch.distributed initialised (init_process_group) first")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):  # bool refused too
            raise ValueError(f"max_tokens must be None or a positive int (tokens per rank), got {max_tokens!r}")
        if not isinstance(max_buffer_bytes, int) or max_buffer_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be a positive int, got {max_buffer_bytes!r}")
        if not isinstance(graphs, bool):
            raise ValueError(f"graphs must be True or False, got {graphs!r}")
        self.max_tokens, self.max_buffer_bytes, self.graphs = max_tokens, max_buffer_bytes, graphs
        self._graph_sets, self._graph_stream, self._graph_pool, self._graph_exit = {}, None, None, None  # torch_graphs
        self._err: torch.Tensor | None = None  # decode mode on GPUs: [set, stage, peer, 0] the GPU writes (pinned)
        self._err_np: Any = None  # its numpy view: read with no CUDA call
        self._block_sizes: dict[tuple, tuple[int, int]] = {}  # decode mode: (HM, L) per shape, bound checked
        self.group, self.rank, self.world_size = group, dist.get_rank(group), dist.get_world_size(group)
        self.timeout_s = float(timeout_s)
        self.watchdog = StageWatchdog(self.rank, self.timeout_s, group)
        self._tables: dict[tuple, torch.Tensor] = {}  # constant index tables by (name, sizes, device)
        self._host_splits: torch.Tensor | None = None  # pinned count tables [2, W, C] int64: the one host read
        self._failed: TimeoutError | None = None  # a failed host wait (CPU path): every later call raises it
        if max_tokens is not None:
            torch_blocks.check_same_max_tokens(self)
            if torch.cuda.is_available():
                self.error_word_addr()  # pinned now, not inside a CUDA graph capture

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
        if self._err_np is not None and self._err_np[0]:
            raise ValueError(f"rank {self.rank}: routing.topk_ids held expert ids outside the slots on some rank "
                             f"(found on the GPU by an earlier decode-mode dispatch; this comm is unusable now)")
        self.watchdog.check()

    def error_word_addr(self) -> int:
        """Address of the int32 error word [set, stage, peer, 0] in pinned host memory (decode mode on GPUs)."""
        if self._err is None:
            self._err = torch.zeros(4, dtype=torch.int32).pin_memory()
            self._err_np = self._err.numpy()
        return self._err.data_ptr()

    def _host_wait(self, inflight: InFlight) -> None:
        """The host-side wait of the CPU path; its failure is kept, so every later call raises it at once."""
        try:
            host_wait(self.rank, self.timeout_s, inflight)
        except TimeoutError as err:
            self._failed = err
            raise

    def close(self) -> None:
        """Stop the watchdog thread and destroy the decode mode's CUDA graphs (call it before destroy_process_group)."""
        self.watchdog.close()
        torch_graphs.drop(self)

    def _table(self, key: tuple, make: Any) -> torch.Tensor:
        """A constant index tensor, built once per key (not kept from a graph capture: it never ran)."""
        t = self._tables.get(key)
        if t is None:
            t = make()
            if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
                self._tables[key] = t
        return t

    def _a2a(self, out: Any, inp: Any, out_splits: list[int] | None, in_splits: list[int] | None, stage: str,
             async_op: bool = True) -> InFlight:
        """Launch all_to_all_single (tensors) or all_to_all (lists of per-rank tensors, NCCL).
        async_op=False on CUDA runs it on the current stream (no host wait)."""
        try:
            if isinstance(out, list):
                work = dist.all_to_all(out, inp, group=self.group, async_op=async_op)
            else:
                work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)
        except RuntimeError as err:
            raise TimeoutError(f"rank {self.rank}: EP stage '{stage}' could not reach its peers: "
                               f"{str(err).splitlines()[0]}") from err
        return InFlight(work, stage)

    def _join(self, inflight: InFlight, device: torch.device, watch: bool = True) -> None:
        """Make the current stream wait for a collective (GPU; then watch it unless a later stage's watch
        covers it) or wait on the host with the timeout (CPU)."""
        if device.type == "cuda":
            inflight.work.wait()  # no timeout: the stream waits, the host does not
            if watch:
                self.watchdog.arm(inflight.stage, device=device)
        else:
            self._host_wait(inflight)

    def _start_read(self, cnt: torch.Tensor, stage: str) -> Any:
        """Start the one host read of the count tables cnt [2, W, C]. GPU: a non-blocking copy into pinned
        memory and an event (which the watchdog polls too); work queued after this does not delay the read."""
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
        """Wait for the read (one event synchronize, no polling loop) -> the count tables [2, W, C] (numpy)."""
        if isinstance(started, np.ndarray):
            return started
        try:
            started.synchronize()  # releases the GIL: the watchdog thread runs (and aborts) meanwhile
        finally:
            self.check()  # an absent peer: the error, not the garbage counts
        return self._host_splits.numpy()

    def _phys(self, x: torch.Tensor, routing: Routing, placement: Placement, values: bool = True,
              flat: bool = True) -> torch.Tensor:
        """Checks (ids' values too with `values`); each pair's physical slot, flat [N] or [T, k] (flat=False)."""
        self.check()
        check_dispatch_args(x, routing, placement, values=values)
        if placement.world_size != self.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the process group's world "
                             f"size ({self.world_size})")
        # identity: the ids are the slots, int32 or int64 as given (no widening copy)
        ids = routing.topk_ids if placement.is_identity else placement.physical_ids(routing.topk_ids, self.rank)
        return ids.reshape(-1) if flat else ids if ids.is_contiguous() else ids.contiguous()

    _kernels = staticmethod(token_rows.kernels_for)

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Pack the token rows, exchange and read the count tables (the one host sync), start the rows
        (decode mode: fixed blocks, one exchange, no host read)."""
        if self.max_tokens is not None:
            return torch_blocks.dispatch_send(self, x, routing, placement), placement.local_experts
        # ids outside [0, P) are found by pack and reported by every rank after the count exchange; a
        # non-identity placement looks the ids up in its tables first, so they are checked before that
        phys = self._phys(x, routing, placement, values=not placement.is_identity)
        (T, k), H, W, P_local = routing.topk_ids.shape, x.shape[1], self.world_size, placement.local_experts
        kern = self._kernels(x)
        hm, L = token_rows.row_layout(H, x.dtype, k)
        w = routing.topk_weights.to(torch.float32).contiguous()
        tab = torch.zeros((2, W, P_local + 2), dtype=torch.int64, device=x.device)  # [sent, received]
        sent, got = tab.unbind(0)
        if kern is not None:  # rows into per-destination blocks of T rows (the order the programs ran)
            pos, rows = torch.empty((T, W), dtype=torch.int64, device=x.device), x.new_empty((W * T, L))
            kern.pack_rows(x.contiguous(), phys.view(T, k).contiguous(), w, sent, pos, rows, hm)
            # on the current stream (no host wait); watched through the read
            self._a2a(got, sent, None, None, "dispatch/counts", async_op=False)
        else:
            packed, pos, rows = token_rows.pack_rows(x, phys.view(T, k), w, P_local, W, hm, L)
            sent.copy_(packed)
            self._host_wait(self._a2a(got, sent, None, None, "dispatch/counts"))
        host = self._finish_read(self._start_read(tab, "dispatch/counts"))  # [2, W, P_local + 2]
        bad = host[1, :, P_local + 1]
        if bad.any():
            ranks = [r for r in range(W) if bad[r]]
            raise ValueError(f"rank {self.rank}: routing.topk_ids holds expert ids outside [0, {W * P_local}) on "
                             f"rank(s) {ranks} ({int(bad.sum())} ids; found by dispatch, no rows were sent)")
        send_splits, recv_splits = host[0, :, P_local].tolist(), host[1, :, P_local].tolist()
        recv = x.new_empty((sum(recv_splits), L))
        if kern is not None:  # destination d's rows: the first send_splits[d] rows of its block
            ins = rows.split([n for c in send_splits for n in (c, T - c)])[::2]
            inflight = self._a2a(list(recv.split(recv_splits)), list(ins), None, None, "dispatch/payload")
        else:
            inflight = self._a2a(recv, rows, recv_splits, send_splits, "dispatch/payload")
        return _Pending(inflight, recv, tab, pos, int(host[1, :, :P_local].sum()), kern, H, hm,
                        routing.topk_weights, (tuple(send_splits), tuple(recv_splits)))

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, Handle]:
        """Join the row exchange and give each received pair its batch row (a gathered batch; decode mode: a
        masked batch)."""
        if self.max_tokens is not None:
            check_pending(isinstance(pending, tuple) and len(pending) == 2, self, pending)
            return torch_blocks.dispatch_recv(self, *pending)
        check_pending(isinstance(pending, _Pending), self, pending)
        p = pending
        self.check()
        R, k, dev, got = p.recv.shape[0], p.topk_weights.shape[1], p.recv.device, p.tab[1]
        P_local = got.shape[1] - 2
        if p.kernels is not None:
            p.inflight.work.wait()  # the stream waits for the rows; watched once unpack is queued
            counts = torch.empty(P_local, dtype=torch.int64, device=dev)
            index = torch.empty(p.M, dtype=torch.int32, device=dev)
            pair_rows = torch.empty((R, k), dtype=torch.int32, device=dev)
            pair_weights = torch.empty((R, k), dtype=torch.float32, device=dev)
            p.kernels.unpack_rows(p.recv, got, counts, index, pair_rows, pair_weights, self.rank, p.hm)
            self.watchdog.arm(p.inflight.stage, device=dev)
        else:
            self._join(p.inflight, dev)
            counts = got[:, :P_local].sum(0)
            index, pair_rows, pair_weights = token_rows.unpack_rows(p.recv, p.M, P_local, self.rank, p.hm, k)
        batch = ExpertBatch(p.recv[:, :p.hidden], counts, "gathered", index)  # rows of stride L
        plan = TokenRowPlan(p.pos, p.tab[0], pair_rows, pair_weights)
        handle = Handle(None, p.topk_weights, None, p.splits[0], p.splits[1], token_rows=plan)
        return batch, stamp_handle(self, batch, handle)

    def combine_send(self, y: ExpertBatch, handle: Handle) -> Any:
        """Sum each received row's pairs with their weights here and send the partial rows home."""
        self.check()
        check_combine(self, y, handle)  # host only, before the exchange: a refusing rank leaves no peer waiting
        plan = handle.token_rows
        if plan is None or handle.send_splits is None or handle.recv_splits is None:
            raise ValueError("handle must come from TorchComm.dispatch_recv (it has no token-row plan)")
        yx = y.x.contiguous().view(-1, y.x.shape[-1])  # masked (decode mode): flat over [P_local * cap]
        s = torch_graphs.owned_by(self, handle.origin.call) if plan.block_rows else None
        if s is not None:  # the decode mode's dispatch replayed a graph: so does its combine
            return torch_graphs.combine_send(self, s, yx), None, handle
        kern = self._kernels(yx)
        if kern is not None:
            part = yx.new_empty((plan.pair_rows.shape[0], yx.shape[1]))
            kern.partial_rows(yx, plan.pair_rows, plan.pair_weights, part, checked=True)
        else:
            part = token_rows.partial_rows(yx, plan.pair_rows, plan.pair_weights)
        home = part.new_empty((sum(handle.send_splits), part.shape[1]))
        inflight = self._a2a(home, part, list(handle.send_splits), list(handle.recv_splits), "combine/payload")
        return inflight, home, handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Join the exchange and add each token's partial rows -> [T, H]."""
        inflight, home, handle = pending
        self.check()
        plan = handle.token_rows
        if plan.block_rows:
            return torch_blocks.combine_recv(self, inflight, home, handle)
        self._join(inflight, home.device)
        kern = self._kernels(home)
        if kern is None:
            return token_rows.sum_home(home, plan.tab[:, -2], plan.pos)
        out = home.new_empty((plan.pos.shape[0], home.shape[1]))
        kern.sum_home(home, plan.tab, plan.pos, out, checked=True)
        return out
