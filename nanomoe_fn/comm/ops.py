"""`OpComm`: a comm's four halves as torch custom ops, so a whole layer under any plan traces into one graph
(torch.compile(fullgraph=True)) instead of breaking the graph at every exchange.

Dimension legend: T tokens on this rank, H hidden, P_local local expert slots, C rows per expert (masked layout).

Each half is an opaque op (nanomoe::comm_dispatch_send, _dispatch_recv, _combine_send, _combine_recv): the
compiler never looks inside; at run time the op calls the wrapped comm's own method, host checks included.
The ops pass tensors only. What else a half hands to the next (pending exchanges, handles) stays in the
wrapper, first in first out: a plan receives and combines an OpComm's dispatches in the order it sent them
(two-batch overlap does), and a mismatch is an error, never a wrong pairing. Every op takes the wrapper's
`state` tensor and declares it mutated, so a compiled graph keeps one comm's halves in program order (its
collectives run in the same order on every rank). Ops find their wrapper by `key` in a table of live
wrappers (weak references: a wrapper that is gone leaves nothing behind).

Two kinds of batch trace. A decode-mode comm delivers the masked layout [P_local, C, H] with C known before
the exchange (nvlink decode without FP8 dispatch, the torch comm with max_tokens; `masked_rows`): fixed shapes.
Any other comm (prefill: the torch comm, nvlink and DeepEP's normal mode) delivers a batch whose row count
depends on the routing: the op hands it over as a gathered batch (x [R, H] made contiguous, index [M], counts),
R and M unbacked sizes in the graph (the comm reads its counts on the host inside the op, as it does eagerly);
a contiguous batch comes with index = arange(M). Rows in x's dtype (no FP8 dispatch) either way.
"""

from __future__ import annotations

import collections
import itertools
import weakref
from typing import Any

import torch

from nanomoe_fn.batch import ExpertBatch, Routing
from nanomoe_fn.eplb.placement import Placement

_LIVE: weakref.WeakValueDictionary[int, OpComm] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def masked_rows(comm: Any) -> int | None:
    """C, the rows per local expert of the masked batch `comm` delivers, or None if its batch is not masked
    at a size fixed in advance."""
    name, W = getattr(comm, "name", ""), getattr(comm, "world_size", 1)
    if name == "nvlink" and getattr(comm, "layout", None) == "masked" and not sends_fp8(comm):
        return W * comm.max_tokens
    if name == "torch" and getattr(comm, "max_tokens", None) is not None:
        return W * comm.max_tokens
    if name == "torch_fixed" or (name == "deepep" and getattr(comm, "mode", None) == "low_latency"):
        return W * comm.max_tokens  # their masked batch: [P_local, W * max_tokens, H]
    return None


def sends_fp8(comm: Any) -> bool:
    """Whether comm sends FP8 rows (nvlink's fp8, DeepEP's dispatch_dtype)."""
    return bool(getattr(comm, "fp8", False)) or getattr(comm, "dispatch_dtype", None) == torch.float8_e4m3fn


class OpComm:
    """comm seen through custom ops; placement: the one every dispatch uses (part of the wrapper: the ops
    carry tensors only). rows: C of a masked batch, None when the batch size depends on the routing (module
    docstring). The ordering token lives where the placement's tables do (the tokens' device)."""

    def __init__(self, comm: Any, placement: Placement) -> None:
        C = masked_rows(comm)
        if sends_fp8(comm):
            raise ValueError(f"comm must send rows in x's dtype: {comm.name!r} sends FP8 rows (its FP8 rows and "
                             f"scales do not pass through an OpComm)")
        if placement.world_size != comm.world_size:
            raise ValueError(f"placement.world_size ({placement.world_size}) must equal the comm's "
                             f"({comm.world_size})")
        self.comm, self.placement, self.rows = comm, placement, C
        self.name, self.rank, self.world_size = f"op:{comm.name}", comm.rank, comm.world_size
        self.state = torch.zeros(1, dtype=torch.int64, device=placement.phy2log.device)  # ordering token
        self.key = next(_KEYS)
        # first in, first out (module docstring): dispatches in flight, received (batch, handle), combines
        self._dispatching: collections.deque = collections.deque()
        self._received: collections.deque = collections.deque()
        self._combining: collections.deque = collections.deque()
        _LIVE[self.key] = self

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> torch.Tensor:
        """Start the dispatch (op); the pending value is x itself (combine's output takes its shape)."""
        if placement is not self.placement:
            raise ValueError("placement must be the one this OpComm was built with")
        torch.ops.nanomoe.comm_dispatch_send(self.state, self.key, x, routing.topk_ids, routing.topk_weights)
        return x

    def dispatch_recv(self, pending: torch.Tensor) -> tuple[ExpertBatch, torch.Tensor]:
        """Finish it (op) -> the masked batch [P_local, C, H] (or the gathered batch: module docstring) and its
        counts; the handle is x again."""
        if self.rows is None:
            x, index, counts = torch.ops.nanomoe.comm_dispatch_recv_rows(self.state, self.key, pending,
                                                                         self.placement.local_experts)
            return ExpertBatch(x, counts, "gathered", index), pending
        xe, counts = torch.ops.nanomoe.comm_dispatch_recv(self.state, self.key, pending,
                                                          self.placement.local_experts, self.rows)
        return ExpertBatch(xe, counts, "masked"), pending

    def combine_send(self, y: ExpertBatch, handle: torch.Tensor) -> torch.Tensor:
        """Start the combine of the expert outputs y (the masked layout) (op)."""
        torch.ops.nanomoe.comm_combine_send(self.state, self.key, y.x)
        return handle

    def combine_recv(self, pending: torch.Tensor) -> torch.Tensor:
        """Finish it (op) -> [T, H] in x's dtype."""
        return torch.ops.nanomoe.comm_combine_recv(self.state, self.key, pending)


def _live(key: int) -> OpComm:
    op = _LIVE.get(key)
    if op is None:
        raise RuntimeError(f"no live OpComm with key {key} (the wrapper was freed)")
    return op


@torch.library.custom_op("nanomoe::comm_dispatch_send", mutates_args=("state",))
def _dispatch_send(state: torch.Tensor, key: int, x: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> None:
    op = _live(key)
    op._dispatching.append(op.comm.dispatch_send(x, Routing(topk_ids, topk_weights), op.placement))
    state.add_(1)


@_dispatch_send.register_fake
def _(state: torch.Tensor, key: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    return None


@torch.library.custom_op("nanomoe::comm_dispatch_recv", mutates_args=("state",))
def _dispatch_recv(state: torch.Tensor, key: int, x: torch.Tensor, local_experts: int,
                   rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = _live(key)
    if not op._dispatching:
        raise RuntimeError(f"rank {op.rank}: dispatch_recv on an OpComm with no dispatch in flight")
    batch, handle = op.comm.dispatch_recv(op._dispatching.popleft())
    want = (local_experts, rows, x.shape[1])
    if batch.layout != "masked" or tuple(batch.x.shape) != want or batch.x.dtype != x.dtype:
        raise RuntimeError(f"rank {op.rank}: {op.comm.name} delivered a {batch.layout} batch {tuple(batch.x.shape)} "
                           f"{batch.x.dtype}, not the masked {want} {x.dtype} an OpComm traces")
    op._received.append((batch, handle))
    state.add_(1)
    return batch.x, batch.counts.to(torch.int64)


@_dispatch_recv.register_fake
def _(state: torch.Tensor, key: int, x: torch.Tensor, local_experts: int,
      rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty((local_experts, rows, x.shape[1])), x.new_empty((local_experts,), dtype=torch.int64)


@torch.library.custom_op("nanomoe::comm_dispatch_recv_rows", mutates_args=("state",))
def _dispatch_recv_rows(state: torch.Tensor, key: int, x: torch.Tensor,
                        local_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = _live(key)
    if not op._dispatching:
        raise RuntimeError(f"rank {op.rank}: dispatch_recv on an OpComm with no dispatch in flight")
    batch, handle = op.comm.dispatch_recv(op._dispatching.popleft())
    if batch.layout == "masked" or batch.x.dtype != x.dtype or batch.num_experts != local_experts:
        raise RuntimeError(f"rank {op.rank}: {op.comm.name} delivered a {batch.layout} batch {tuple(batch.x.shape)} "
                           f"{batch.x.dtype} for {batch.num_experts} experts, not the contiguous or gathered "
                           f"{x.dtype} batch for {local_experts} an OpComm without fixed rows traces")
    op._received.append((batch, handle))
    state.add_(1)
    index = batch.index if batch.index is not None else torch.arange(batch.x.shape[0], device=x.device)
    # fresh tensors: an op's outputs may not alias its inputs or each other, and a comm's receive rows are
    # often a strided view of its buffer (the graph assumes the fake's contiguous strides)
    return (batch.x.clone(memory_format=torch.contiguous_format), index.to(torch.int64, copy=True),
            batch.counts.to(torch.int64, copy=True))


@_dispatch_recv_rows.register_fake
def _(state: torch.Tensor, key: int, x: torch.Tensor,
      local_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ctx = torch.library.get_ctx()
    R, M = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (x.new_empty((R, x.shape[1])), x.new_empty((M,), dtype=torch.int64),
            x.new_empty((local_experts,), dtype=torch.int64))


@torch.library.custom_op("nanomoe::comm_combine_send", mutates_args=("state",))
def _combine_send(state: torch.Tensor, key: int, y: torch.Tensor) -> None:
    op = _live(key)
    if not op._received:
        raise RuntimeError(f"rank {op.rank}: combine_send on an OpComm with no received dispatch")
    batch, handle = op._received.popleft()
    op._combining.append(op.comm.combine_send(batch.with_x(y), handle))
    state.add_(1)


@_combine_send.register_fake
def _(state: torch.Tensor, key: int, y: torch.Tensor) -> None:
    return None


@torch.library.custom_op("nanomoe::comm_combine_recv", mutates_args=("state",))
def _combine_recv(state: torch.Tensor, key: int, x: torch.Tensor) -> torch.Tensor:
    op = _live(key)
    if not op._combining:
        raise RuntimeError(f"rank {op.rank}: combine_recv on an OpComm with no combine in flight")
    out = op.comm.combine_recv(op._combining.popleft())
    state.add_(1)
    return out


@_combine_recv.register_fake
def _(state: torch.Tensor, key: int, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
