"""`deepep` comm: dispatch/combine over DeepEP v1.2.1's `Buffer` (normal mode for prefill, low-latency for decode).

Dimension legend: T tokens on this rank (T <= max_tokens in low-latency mode), k experts per token, H hidden,
W ranks, P = num_slots physical expert slots, P_local = P // W, R tokens this rank receives in normal mode
(one row per (token, destination rank)), M (received token, local expert) pairs, C = W * max_tokens.

Experts are named by physical slot: DeepEP gets topk_idx = placement.physical_ids(topk_ids, rank) and
num_experts = P, so slot p lives on rank p // P_local as DeepEP expects.

normal mode (prefill; contiguous batch): get_dispatch_layout -> dispatch (each token crosses NVLink once
per destination rank, with its top-k ids and weights) -> combine, all with async_finish=True on DeepEP's
comm stream; the halves make the current stream wait on DeepEP's events, never the host. One host wait
is inherent: DeepEP's dispatch spins on the host until the received counts arrive (it must size recv_x
and returns the per-expert counts as a Python list), so normal mode cannot be captured in a CUDA graph.
The receiving rank sorts its (token, local expert)
pairs by expert (deepep_layout, vectorised), and before combine reduces each received token's local
expert rows with its top-k weights, so DeepEP's combine (a plain sum over ranks) returns the exact
weighted sum.

low_latency mode (decode; masked batch [P_local, C, H] + int32 counts, DeepGEMM's masked layout; with
dispatch_dtype=float8_e4m3fn DeepEP quantises per 128 channels as it sends (scale amax / 448 by its own
rounding, amax >= 1e-4: close to, not bit-equal to, fp8_quant's) and the batch is FP8, x_scale DeepEP's
column-major [P_local, C, H / 128] view; combine stays bf16):
low_latency_dispatch / low_latency_combine with return_recv_hook=True: the send half issues the
kernel that sends, the receive half calls the hook that receives, so other work can sit in between.
No host sync; CUDA-graph capturable (a graph must hold whole dispatch + combine pairs: DeepEP
alternates two buffers on the host). At most two low-latency exchanges may be between their halves at
once (DeepEP's double buffer); a third is refused. Over NVLink inside one host NVSHMEM's IBGDA transport
may fail to initialise; DeepEP then uses NVLink P2P (allow_nvlink_for_low_latency_mode=True, its
default and its tests' setting). Keep NVLink multicast off: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 (DeepEP sets the last itself).

A rank with T == 0 sends one zero token that selects no expert (ids -1), so DeepEP never sees an empty
tensor. A rank given T > max_tokens in low-latency mode sends the same (none of its tokens) and takes part in
both exchanges, so its peers finish with the right outputs; its combine raises ValueError.
Timeouts: DeepEP's are fixed when it is built (NUM_CPU_TIMEOUT_SECS = 100 s for normal
dispatch's host wait, after which it raises "DeepEP error: CPU recv timeout", re-raised here as
TimeoutError naming the rank and stage; its GPU kernels spin at most NUM_TIMEOUT_CYCLES ~ 100 s, then
print "DeepEP timeout ... rank r" and trap, and the CUDA error surfaces at the next host sync). An
ENABLE_FAST_DEBUG build cuts both to 10 s. This module adds no wait of its own, so timeout_s is only
validated and kept for interface parity. Call close() on every rank (a collective) when done.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Routing
from nanomoe_fn.comm.deepep_layout import (
    FP8,
    DeepEPHandle,
    _Combining,
    _Dispatching,
    check_options,
    environment_reason,
    expert_order,
    gather_expert_rows,
    pad_empty,
    token_weighted_sum,
    world_reason,
)
from nanomoe_fn.comm.plan import check_dispatch_args, oversized_error
from nanomoe_fn.eplb.placement import Placement

_OPTIONS = ("mode", "hidden", "num_slots", "max_tokens", "top_k", "dtype", "group", "timeout_s", "dispatch_dtype")


def _import_deep_ep() -> tuple[Any, str | None]:
    """(deep_ep module, None) or (None, why it does not import). Imported lazily: CPU machines lack it."""
    try:
        import deep_ep
    except Exception as err:  # noqa: BLE001 - ImportError, or OSError/undefined symbols from a mismatched build
        text = str(err).splitlines()[0] if str(err) else ""
        return None, f"{type(err).__name__}: {text}"
    return deep_ep, None


class DeepEPComm:
    """DeepEP `Buffer` dispatch/combine; one Buffer per instance over `group` (default: the world).

    Construction is a collective (a handshake of the options, then DeepEP's own rendezvous); set this
    rank's GPU first (torch.cuda.set_device). hidden, num_slots, max_tokens and top_k are keywords.
    """

    name = "deepep"
    _live_low_latency = 0  # NVSHMEM is initialised once per process: one low-latency Buffer at a time

    @property
    def shares_micro_batches(self) -> bool:
        """Whether two micro-batches may keep exchanges in flight on this one instance (two-batch overlap
        with one comm). Not in low-latency mode: that hung on 2 H200s (run 59 of gpu_tests_h200.md, each
        exchange on its micro-batch's stream; not diagnosed), and a process holds one such instance."""
        return self.mode != "low_latency"

    def __init__(self, mode: str = "normal", *, hidden: int, num_slots: int, max_tokens: int, top_k: int,
                 dtype: torch.dtype = torch.bfloat16, group: Any = None, timeout_s: float = 60.0,
                 dispatch_dtype: torch.dtype | None = None) -> None:
        check_options(mode, hidden, num_slots, max_tokens, top_k, dtype, timeout_s, dispatch_dtype)
        ok, reason = self.supports(mode=mode, hidden=hidden, num_slots=num_slots, max_tokens=max_tokens,
                                   top_k=top_k, dtype=dtype, group=group, timeout_s=timeout_s,
                                   dispatch_dtype=dispatch_dtype)
        if not ok:
            raise ValueError(f"comm backend 'deepep' is unavailable: {reason}")
        if mode == "low_latency" and DeepEPComm._live_low_latency:
            raise ValueError("another low-latency DeepEPComm is open in this process (NVSHMEM is initialised "
                             "once per process); close() it first")
        deep_ep, _ = _import_deep_ep()
        self.mode, self.hidden, self.num_slots, self.max_tokens, self.top_k = mode, hidden, num_slots, max_tokens, top_k
        self.dtype, self.timeout_s = dtype, float(timeout_s)
        self.fp8 = dispatch_dtype == FP8  # low-latency FP8 dispatch: an FP8 masked batch (module docstring)
        self.dispatch_dtype = FP8 if self.fp8 else dtype
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.local_slots = num_slots // self.world_size
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._ll_in_flight = 0
        self._handshake()
        B, W = deep_ep.Buffer, self.world_size
        if mode == "low_latency":
            rdma = B.get_low_latency_rdma_size_hint(max_tokens, hidden, W, num_slots)
            self.buffer = self._call("init", B, self.group, 0, rdma, low_latency_mode=True,
                                     num_qps_per_rank=self.local_slots, allow_nvlink_for_low_latency_mode=True,
                                     allow_mnnvl=False, explicitly_destroy=True)
            DeepEPComm._live_low_latency += 1
        else:
            # NVLink buffer: the larger of the dispatch and combine configs' hints for bf16 rows; the RDMA
            # hint is 0 within one host (<= 8 ranks), and DeepEP refuses RDMA bytes there outside low latency
            nvl = max(c.get_nvl_buffer_size_hint(hidden * 2, W) for c in (B.get_dispatch_config(W),
                                                                         B.get_combine_config(W)))
            self.buffer = self._call("init", B, self.group, nvl, 0, low_latency_mode=False, explicitly_destroy=True)

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Whether DeepEP can run with these options here, and why not (same keywords as the constructor)."""
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            return False, f"unknown option(s) {unknown}; DeepEPComm takes {list(_OPTIONS)}"
        mode = options.get("mode", "normal")
        try:
            check_options(mode, *(options.get(k) for k in _OPTIONS[1:6]), options.get("timeout_s"),
                          options.get("dispatch_dtype"))
        except (TypeError, ValueError) as err:
            return False, str(err)
        _, import_error = _import_deep_ep()
        initialised = dist.is_available() and dist.is_initialized()
        group = options.get("group")
        backend = str(dist.get_backend(group)) if initialised else None
        reason = environment_reason(import_error, torch.cuda.is_available(), initialised, backend)
        if not reason:
            reason = world_reason(mode, dist.get_world_size(group), options.get("num_slots"),
                                  options.get("max_tokens"))
        return not reason, reason

    def _handshake(self) -> None:
        """Every rank must build the same comm: a ValueError names the field the ranks disagree on."""
        mine = dict(mode=self.mode, hidden=self.hidden, num_slots=self.num_slots, max_tokens=self.max_tokens,
                    top_k=self.top_k, dtype=str(self.dtype), dispatch_dtype=str(self.dispatch_dtype))
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        for field in mine:
            values = [d[field] for d in everyone]
            if len(set(values)) > 1:
                raise ValueError(f"ranks disagree on DeepEPComm.{field}: {values} (by rank)")

    def _call(self, stage: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call DeepEP; its errors come back naming this rank and the stage (timeouts as TimeoutError)."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            kind = TimeoutError if "timeout" in text.lower() else RuntimeError
            raise kind(f"rank {self.rank}: EP stage 'deepep/{stage}' failed: {text}") from err

    def close(self) -> None:
        """Release DeepEP's buffers (a collective: every rank calls it). Idempotent."""
        if getattr(self, "buffer", None) is None:
            return
        self.buffer.destroy()
        self.buffer = None
        if self.mode == "low_latency":
            DeepEPComm._live_low_latency -= 1

    def _check_inputs(self, x: torch.Tensor, routing: Routing, placement: Placement) -> None:
        if getattr(self, "buffer", None) is None:
            raise RuntimeError("this DeepEPComm is closed")
        check_dispatch_args(x, routing, placement)
        if x.dtype != self.dtype:
            raise TypeError(f"x must be {self.dtype} (this comm's dtype), got {x.dtype}")
        if x.shape[1] != self.hidden or x.device != self.device:
            raise ValueError(f"x must be [T, hidden={self.hidden}] on {self.device}, got {tuple(x.shape)} "
                             f"on {x.device}")
        if routing.topk_ids.shape[1] != self.top_k:
            raise ValueError(f"routing.topk_ids must have top_k={self.top_k} columns, got {routing.topk_ids.shape[1]}")
        if placement.world_size != self.world_size or placement.num_physical != self.num_slots:
            raise ValueError(f"placement must have world_size={self.world_size} and num_physical={self.num_slots} "
                             f"(this comm's), got {placement.world_size} and {placement.num_physical}")

    def _check_handle(self, handle: Any) -> DeepEPHandle:
        if not isinstance(handle, DeepEPHandle):
            raise ValueError(f"handle must be the DeepEPHandle from this comm's dispatch_recv, got "
                             f"{type(handle).__name__}")
        if handle.owner != id(self) or handle.mode != self.mode:
            raise ValueError(f"handle comes from another comm (mode {handle.mode!r}); pass this {self.mode!r} "
                             f"comm's own dispatch handle")
        return handle

    def _ll_enter(self, stage: str) -> None:
        if self._ll_in_flight >= 2:
            raise RuntimeError(f"rank {self.rank}: EP stage 'deepep/{stage}': two low-latency exchanges are "
                               f"already in flight (DeepEP double-buffers); finish one first")
        self._ll_in_flight += 1

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> _Dispatching:
        """Start dispatch: normal mode runs DeepEP's layout and dispatch asynchronously (one host wait for the
        counts, inside DeepEP); low-latency mode launches the sending kernel only."""
        self._check_inputs(x, routing, placement)
        T, buf = x.shape[0], self.buffer
        idx = placement.physical_ids(routing.topk_ids, self.rank).to(torch.int64).contiguous()
        w = routing.topk_weights.to(torch.float32).contiguous()
        # low-latency mode past max_tokens: send no token but take part (the peers' exchange completes and their
        # outputs are right); this rank's combine raises after its exchange
        refused = T if self.mode == "low_latency" and T > self.max_tokens else 0
        xs, idx, w = pad_empty(*((x[:0], idx[:0], w[:0]) if refused else (x.contiguous(), idx, w)))
        if self.mode == "low_latency":
            self._ll_enter("dispatch")
            recv_x, counts, deep_handle, _, hook = self._call(
                "dispatch", buf.low_latency_dispatch, xs, idx, self.max_tokens, self.num_slots,
                use_fp8=self.fp8, async_finish=False, return_recv_hook=True)
            handle = DeepEPHandle("low_latency", id(self), deep_handle, idx, w, 0 if refused else T,
                                  refused_tokens=refused)
            return _Dispatching(handle, recv_x, counts, hook)
        per_rank, per_rdma, per_expert, in_rank, layout_done = self._call(
            "dispatch/layout", buf.get_dispatch_layout, idx, self.num_slots, previous_event=buf.capture(),
            async_finish=True, allocate_on_comm_stream=True)
        recv_x, recv_idx, recv_w, per_expert_list, deep_handle, done = self._call(
            "dispatch", buf.dispatch, xs, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            previous_event=layout_done, async_finish=True, allocate_on_comm_stream=True)
        handle = DeepEPHandle("normal", id(self), deep_handle, idx, w, T, recv_weights=recv_w,
                              num_rows=int(sum(per_expert_list)))  # a host list already: no sync
        return _Dispatching(handle, recv_x, recv_idx, done)

    def dispatch_recv(self, pending: _Dispatching) -> tuple[ExpertBatch, DeepEPHandle]:
        """Finish dispatch: normal -> contiguous batch [M, H] sorted by local expert + int64 counts;
        low_latency -> DeepEP's masked batch [P_local, C, H] + its int32 counts (no copy)."""
        h = pending.handle
        if self.mode == "low_latency":
            self._call("dispatch/recv", pending.finish)  # the hook: launches the receiving kernel
            self._ll_in_flight -= 1
            if self.fp8:  # (fp8 [P_local, C, H], float32 scales [P_local, C, H / 128], a column-major view)
                return ExpertBatch(pending.recv_x[0], pending.recv_meta, "masked", x_scale=pending.recv_x[1]), h
            return ExpertBatch(pending.recv_x, pending.recv_meta, "masked"), h
        pending.finish.current_stream_wait()  # the stream waits on DeepEP's event; the host does not
        order, counts, pair_rows = expert_order(pending.recv_meta, self.local_slots, h.num_rows)
        rows = gather_expert_rows(pending.recv_x, order, self.top_k)
        handle = DeepEPHandle("normal", h.owner, h.deep_handle, h.topk_idx, h.topk_weights, h.num_tokens,
                              recv_weights=h.recv_weights, pair_rows=pair_rows, num_rows=h.num_rows)
        return ExpertBatch(rows, counts), handle

    def combine_send(self, y: ExpertBatch, handle: DeepEPHandle) -> _Combining:
        """Start combine: normal mode reduces each received token's local rows with its weights, then
        DeepEP sums over ranks; low-latency mode launches DeepEP's weighted combine's sending kernel."""
        h = self._check_handle(handle)
        if getattr(self, "buffer", None) is None:
            raise RuntimeError("this DeepEPComm is closed")
        want = ("masked", (self.local_slots, self.world_size * self.max_tokens, self.hidden)) \
            if self.mode == "low_latency" else ("contiguous", (h.num_rows, self.hidden))
        if (y.layout, tuple(y.x.shape)) != want or y.x.dtype != self.dtype:
            raise ValueError(f"y must be the {want[0]} batch {want[1]} in {self.dtype} that dispatch delivered, "
                             f"got {y.layout} {tuple(y.x.shape)} in {y.x.dtype}")
        buf = self.buffer
        if self.mode == "low_latency":
            self._ll_enter("combine")
            out, _, hook = self._call("combine", buf.low_latency_combine, y.x.contiguous(), h.topk_idx,
                                      h.topk_weights, h.deep_handle, async_finish=False, return_recv_hook=True)
            return _Combining(out, hook, h.num_tokens, h.refused_tokens)
        tokens = token_weighted_sum(y.x, h.pair_rows, h.recv_weights).contiguous()  # [R, H]
        out, _, done = self._call("combine", buf.combine, tokens, h.deep_handle, previous_event=buf.capture(),
                                  async_finish=True, allocate_on_comm_stream=True)
        return _Combining(out, done, h.num_tokens)

    def combine_recv(self, pending: _Combining) -> torch.Tensor:
        """Finish combine: [T, H] in x's dtype, the top-k weighted sum of each token's expert outputs."""
        if self.mode == "low_latency":
            self._call("combine/recv", pending.finish)
            self._ll_in_flight -= 1
            if pending.refused_tokens:
                raise oversized_error(self.rank, "deepep", pending.refused_tokens, self.max_tokens,
                                      "use normal mode for larger batches")
        else:
            pending.finish.current_stream_wait()
        return pending.out[: pending.num_tokens]
