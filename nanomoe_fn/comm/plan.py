"""Shared dispatch/combine arithmetic: sort (token, k) pairs by physical slot, and undo it.

Dimension legend: T tokens, k experts per token, H hidden, P physical slots, N = T * k pairs.
All vectorised; no loop over tokens and no host sync. Also the host-side bookkeeping that ties a
handle to the comm and dispatch call that made it (stamp_handle / check_combine).
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import torch

from nanomoe_fn.batch import ExpertBatch, Handle, HandleOrigin, Routing
from nanomoe_fn.checks import FLOAT_DTYPES, INT_DTYPES, check_expert_ids, check_tensor
from nanomoe_fn.eplb.placement import Placement


def check_dispatch_args(x: torch.Tensor, routing: Routing, placement: Placement, values: bool = True) -> None:
    """Shapes, dtypes, devices and (with `values`) id ranges of dispatch's inputs."""
    check_tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    ids = check_tensor("routing.topk_ids", routing.topk_ids, dim=2, dtypes=INT_DTYPES, device=x.device)
    w = check_tensor("routing.topk_weights", routing.topk_weights, dim=2, device=x.device)
    if ids.shape[0] != x.shape[0] or tuple(w.shape) != tuple(ids.shape):
        raise ValueError(f"routing must be [T={x.shape[0]}, k] ids and weights, got topk_ids "
                         f"{tuple(ids.shape)} and topk_weights {tuple(w.shape)}")
    if values:
        check_expert_ids("routing.topk_ids", ids, placement.num_logical)


def oversized_error(rank: int, comm_name: str, tokens: int, max_tokens: int, advice: str = "") -> ValueError:
    """The error a fixed-size comm's combine raises on a rank whose dispatch was given more than max_tokens tokens
    (it sent none of them but took part in every exchange, so its peers finish with the right outputs)."""
    tail = f", or {advice}" if advice else ""
    return ValueError(f"rank {rank}: x had {tokens} tokens, more than this {comm_name} comm's max_tokens={max_tokens}; "
                      f"none of them was sent (this rank took part in the exchanges with no rows, so its peers' "
                      f"outputs are right): raise max_tokens on every rank{tail}")


def sort_pairs(phys_ids: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the flattened pairs by slot. Returns (send_order [N] int64, counts [P] int64)."""
    flat = phys_ids.flatten().long()
    send_order = torch.argsort(flat, stable=True)
    # index_add_ rather than bincount: bincount sizes its output from the data (a host sync on GPUs)
    counts = torch.zeros(num_physical, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return send_order, counts


def gather_rows(x: torch.Tensor, send_order: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows to send [N, H]: the token of each pair, in send order."""
    return x.index_select(0, send_order // top_k)


# rows the Triton kernels take (GPUs); other dtypes and devices use the torch path
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# float32 working set of one combine chunk: [tokens, k, H] rows widened for the weighted sum
REDUCE_CHUNK_BYTES = 256 << 20


def invert_order(order: torch.Tensor) -> torch.Tensor:
    """inv [N] with inv[order[i]] = i: where each pair sits in send order."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inv


def reduce_pairs(y: torch.Tensor, handle: Handle, pair_rows: torch.Tensor | None = None,
                 chunk_bytes: int = REDUCE_CHUNK_BYTES) -> torch.Tensor:
    """Sum each token's k expert rows with its top-k weights -> [T, H] in y's dtype.

    y [R, H]: expert output rows. pair_rows [N = T * k]: the row of y holding pair t * k + j
    (default: y is in send order, so the inverse of handle.send_order). See weighted_rows.
    """
    T, k = handle.topk_weights.shape
    if pair_rows is None:
        pair_rows = invert_order(handle.send_order)
    return weighted_rows(y, pair_rows.view(T, k), handle.topk_weights, chunk_bytes=chunk_bytes)


def weighted_rows(y: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None,
                  chunk_bytes: int = REDUCE_CHUNK_BYTES) -> torch.Tensor:
    """out [T, H] in y's dtype, out[t] = sum_j weights[t, j] * y[rows[t, j]] over the j where mask (default
    all), in float32. y [R, H], rows [T, k], weights [T, k]. The sum runs over token chunks: each gathers
    its T_c * k rows in y's dtype, widens them and takes one [1, k] x [k, H] product per token, so the float32
    temporaries stay under chunk_bytes (one [T * k, H] float32 buffer would be 3.7 GB at 16k tokens of
    DeepSeek-V3). Rows outside the mask are read from row 0 and zeroed (never multiplied: inf * 0 is NaN).
    On a GPU (eager, bf16/fp16/fp32 rows) one Triton kernel does the same sums (kernels/ep_rows.partial_rows;
    rows outside the mask skipped).
    """
    T, k = rows.shape
    H = y.shape[-1]
    if y.is_cuda and y.dtype in KERNEL_DTYPES and T and not torch.compiler.is_compiling():
        from nanomoe_kernels import ep_rows  # Triton: imported only on GPUs

        # one kernel that reads each row once (the eager torch path below gathers, widens and runs a batched
        # gemv: ~8x the bytes, 1.3 ms against ~0.15 ms at 4096 tokens of DeepSeek-V3 on an H200)
        idx = (rows if mask is None else torch.where(mask, rows, -1)).to(torch.int32).contiguous()
        out = y.new_empty((T, H))
        ep_rows.partial_rows(y.contiguous(), idx, weights.to(torch.float32).contiguous(), out)
        return out
    w = weights.float().unsqueeze(1)  # [T, 1, k]
    out = y.new_empty((T, H))
    step = max(1, chunk_bytes // max(1, 4 * k * H))  # tokens per chunk: a host int, no sync
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        idx = rows[t0:t1] if mask is None else torch.where(mask[t0:t1], rows[t0:t1], 0)
        part = y.index_select(0, idx.flatten()).view(t1 - t0, k, H).float()
        if mask is not None:
            part = torch.where(mask[t0:t1].unsqueeze(-1), part, 0.0)
        out[t0:t1] = torch.bmm(w[t0:t1], part).squeeze(1)
    return out


# Handle bookkeeping (host only). Each comm instance gets a process-wide serial number and counts its
# dispatches; a handle records both, and combine accepts it once: while its dispatch is still open
# (several may be open at a time: overlapped micro-batches). Inside torch.compile nothing is recorded
# or read (a per-call counter would force a recompile per call); the shape checks still run there.
_COMM_SERIAL = itertools.count(1)
MAX_OPEN_DISPATCHES = 256  # dispatches never combined are forgotten beyond this (memory stays flat)


class _HandleBook:
    """One comm's record: its serial number, its last dispatch call number, the calls not yet combined."""

    __slots__ = ("comm_id", "calls", "open")

    def __init__(self) -> None:
        self.comm_id = next(_COMM_SERIAL)
        self.calls = 0
        self.open: set[int] = set()


def _book(comm: Any) -> _HandleBook:
    book = comm.__dict__.get("_handle_book")
    if book is None:
        book = comm._handle_book = _HandleBook()
    return book


def stamp_handle(comm: Any, batch: ExpertBatch, handle: Handle) -> Handle:
    """handle with its origin: this comm, a new dispatch call number, and the batch it goes with."""
    T, k = handle.topk_weights.shape
    return replace(handle, origin=new_origin(comm, batch, T, k))


def new_origin(comm: Any, batch: ExpertBatch, tokens: int, top_k: int) -> HandleOrigin:
    """The origin of a new dispatch on this comm (a new call number) that delivered `batch` for `tokens` tokens
    of `top_k` pairs: what stamp_handle puts in a handle (or a caller passes to Handle itself)."""
    comm_id = call = 0
    if not torch.compiler.is_compiling():
        book = _book(comm)
        book.calls += 1
        comm_id, call = book.comm_id, book.calls
        book.open.add(call)
        if len(book.open) > MAX_OPEN_DISPATCHES:
            book.open.discard(min(book.open))
    rows = (batch.num_rows,) if batch.layout == "gathered" else tuple(batch.x.shape[:-1])
    return HandleOrigin(comm_id, call, comm.name, batch.layout, rows, batch.x.shape[-1], batch.x.dtype, tokens,
                        top_k)


def check_pending(ok: bool, comm: Any, pending: Any) -> None:
    """dispatch_recv's argument must be what this comm's dispatch_send returned."""
    if not ok:
        raise ValueError(f"pending must be what this {comm.name} comm's dispatch_send returned, "
                         f"got {type(pending).__name__}")


def check_combine(comm: Any, y: Any, handle: Any) -> None:
    """Before any exchange (so no peer waits on a rank that refuses): handle is this comm's own,
    from a dispatch not yet combined, and y is the batch that dispatch delivered (layout, rows, H,
    dtype; a gathered batch's experts give the contiguous batch [M, H]). ValueError naming `handle` or `y`
    otherwise (TypeError for a y that is no ExpertBatch)."""
    own = f"this {comm.name} comm's dispatch"
    if not isinstance(y, ExpertBatch):
        raise TypeError(f"y must be an ExpertBatch (expert_ffn's output for the batch {own} delivered), "
                        f"got {type(y).__name__}")
    if not isinstance(handle, Handle):
        raise ValueError(f"handle must be the Handle that {own} returned, got {type(handle).__name__}")
    o = handle.origin
    if o is None:
        raise ValueError(f"handle has no origin (built by hand?): pass the Handle that {own} returned")
    compiling = torch.compiler.is_compiling()
    book = None if compiling else _book(comm)
    if o.comm_name != comm.name or (book is not None and o.comm_id and o.comm_id != book.comm_id):
        raise ValueError(f"handle comes from another comm ({o.describe()}): pass the handle that {own} returned")
    if book is not None and o.call and o.call not in book.open:
        raise ValueError(f"handle is stale: {o.describe()} was already combined (each handle combines once; "
                         f"this comm's latest is dispatch #{book.calls}; only its last {MAX_OPEN_DISPATCHES} "
                         f"uncombined dispatches are kept)")
    if tuple(handle.topk_weights.shape) != (o.tokens, o.top_k):
        raise ValueError(f"handle.topk_weights must be [T={o.tokens}, k={o.top_k}] as dispatched, "
                         f"got {tuple(handle.topk_weights.shape)}")
    want = o.rows + (o.hidden,)
    layout = "contiguous" if o.layout == "gathered" else o.layout  # expert_ffn's output for a gathered batch
    if y.layout != layout:
        raise ValueError(f"y must be the {layout} ExpertBatch {list(want)} that the handle's dispatch delivered, "
                         f"got layout {y.layout!r}")
    check_tensor("y.x", y.x)
    if tuple(y.x.shape) != want or y.x.dtype != o.dtype:
        raise ValueError(f"y.x must be {list(want)} in {o.dtype} (the rows the handle's dispatch delivered), got "
                         f"{list(y.x.shape)} in {y.x.dtype}")
    if book is not None:
        book.open.discard(o.call)
