"""The `torch` comm's decode mode, `TorchComm(max_tokens=T_max)`: fixed blocks, no host read, graph-capturable.

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, H hidden, W ranks, P slots,
P_local = P // W, BS = T_max + 1 rows per block, L row length (token_rows.block_layout), cap = W * T_max rows
per expert in the masked batch.

Every rank sends every rank one block of BS rows in one all_to_all_single with equal splits: a header row
whose first P_local + 2 int64 words are the count table row for that destination (pairs per local expert
there, rows, ids outside [0, P) found on the sender), then the token rows (comm/token_rows.py: a token
crosses to a rank once, its slots, weights and pair numbers packed in), then padding nobody reads. A token
sends at most one row to a rank, so T_max rows per block never overflow. The receiver needs nothing from the
host: unpack reads the headers on the GPU and copies each row to its pairs' places in the masked batch
[P_local, cap, H] (DeepEP low-latency's layout; inside expert e the rows of lower sources first) and writes
the per-expert counts. Combine: per received row the weighted sum of its pairs (float32), blocks of partial
rows back with equal splits, summed at home.

Every rank builds its comm with the same max_tokens (checked once, at construction): the splits are equal.
A rank given more than T_max tokens sends none of them but takes part in both exchanges (its peers' outputs
stay right and none waits); its combine then raises ValueError (refuse_oversized).
On GPUs a dispatch is two kernel launches and one NCCL call on the current stream (no count exchange, no
host read), so a decode layer over it can be captured in a CUDA graph; the exact-split mode (max_tokens None,
comm/torch_dist.py) exchanges counts and reads them on the host first, and suits any batch size. Bytes: W * BS
rows each way whatever the routing: at decode sizes with top-8 of 256 nearly every token goes to every rank
at 2 ranks (254 of 256 rows at 128 tokens); with more ranks more of each block is padding.

Ids outside [0, P): pack counts them into the headers; every rank's unpack sees them there. On GPUs it sets
the comm's error word (pinned host memory, no sync), so the next call on the comm raises ValueError on every
rank (as for the nvlink comm; the rows of that call skipped the bad pairs). On CPUs (gloo, torch ops) every
rank raises at once, after the exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Handle, Routing, TokenRowPlan
from nanomoe_fn.comm import token_rows, torch_graphs
from nanomoe_fn.comm.plan import check_pending, new_origin, oversized_error, stamp_handle
from nanomoe_fn.eplb.placement import Placement

DEFAULT_MAX_BUFFER_BYTES = 2 << 30  # 2 GiB: decode at DeepSeek-V3 dims (T_max 256, 2 ranks) needs ~1 GB
DISPATCH, COMBINE = torch_graphs.DISPATCH, torch_graphs.COMBINE


@dataclass
class BlockPending:
    """What dispatch_send hands to dispatch_recv in the decode mode."""

    recv: torch.Tensor  # [W * BS, L]
    send: torch.Tensor  # [W * BS, L]: the blocks sent, the count table in their header rows
    pos: torch.Tensor  # [T, W]
    topk_weights: torch.Tensor
    hidden: int
    hm: int
    inflight: Any  # the CPU path's exchange (None on GPUs: it runs on the current stream)
    graphed: torch_graphs.BlockSet | None = None  # the static set a replayed dispatch holds (GPUs)


def check_same_max_tokens(comm: Any) -> None:
    """Every rank must build its decode-mode comm with the same max_tokens (the blocks are equal splits): one
    all_gather_object at construction, ValueError on every rank naming each rank's value otherwise."""
    if comm.world_size == 1:
        return
    every: list = [None] * comm.world_size
    dist.all_gather_object(every, comm.max_tokens, group=comm.group)
    if len(set(every)) > 1:
        raise ValueError(f"rank {comm.rank}: TorchComm(max_tokens=...) must be the same on every rank (its blocks "
                         f"are equal splits), got {every} (by rank)")


def buffer_bytes(max_tokens: int, world_size: int, hidden: int, dtype: torch.dtype, top_k: int,
                 local_experts: int) -> int:
    """Bytes of one dispatch's buffers: the masked batch [P_local, W * T_max, H] and the blocks [W * BS, L]
    sent and received."""
    _, L = token_rows.block_layout(hidden, dtype, top_k, local_experts)
    W, size = world_size, dtype.itemsize
    return local_experts * W * max_tokens * hidden * size + 2 * W * (max_tokens + 1) * L * size


def _sizes(comm: Any, hidden: int, dtype: torch.dtype, top_k: int, local_experts: int) -> tuple[int, int]:
    """(HM, L) of this comm's blocks, the buffer bound checked once per shape (host time is a decode
    dispatch's time)."""
    key = ("blocks", hidden, dtype, top_k, local_experts)
    got = comm._block_sizes.get(key)
    if got is None:
        need = buffer_bytes(comm.max_tokens, comm.world_size, hidden, dtype, top_k, local_experts)
        if need > comm.max_buffer_bytes:
            raise ValueError(f"the torch comm's decode mode with max_tokens={comm.max_tokens} needs "
                             f"{need / 2**30:.2f} GiB per dispatch (masked batch [P_local={local_experts}, W * "
                             f"max_tokens={comm.world_size * comm.max_tokens}, H={hidden}] + blocks), more than "
                             f"max_buffer_bytes={comm.max_buffer_bytes}: lower max_tokens or use max_tokens=None "
                             f"(exact splits) for prefill-sized batches")
        got = comm._block_sizes[key] = token_rows.block_layout(hidden, dtype, top_k, local_experts)
    return got


def dispatch_send(comm: Any, x: torch.Tensor, routing: Routing, placement: Placement) -> BlockPending:
    """Pack the token rows into fixed blocks and start the one exchange (no host read)."""
    phys = comm._phys(x, routing, placement, values=not placement.is_identity, flat=False)  # [T, k]
    (T, k), H, W, P_local = routing.topk_ids.shape, x.shape[1], comm.world_size, placement.local_experts
    hm, L = _sizes(comm, H, x.dtype, k, P_local)
    w = routing.topk_weights
    if T > comm.max_tokens:  # refused by combine_recv (refuse_oversized): no rows sent, no peer waits
        x, phys, w, T = x[:0], phys[:0], w[:0], 0
    else:
        s = torch_graphs.acquire(comm, x, phys, P_local, hm, L)
        if s is not None:
            v = torch_graphs.dispatch(comm, s, x, phys, w)
            return BlockPending(s.recv, s.send, v.pos, w, H, hm, None, s)
    BS, kern = comm.max_tokens + 1, comm._kernels(x)
    w = w.to(torch.float32).contiguous()
    if kern is not None:  # x, ids and weights were checked by _phys; the kernels' own checks are skipped
        send = x.new_zeros((W * BS, L))  # the headers must start at zero (one fill; fewer host calls than a view)
        pos = torch.empty((T, W), dtype=torch.int64, device=x.device)
        kern.pack_blocks(x.contiguous(), phys, w, pos, send, P_local, hm, checked=True)
        recv = torch.empty_like(send)
        comm._a2a(recv, send, None, None, DISPATCH, async_op=False)  # on the current stream: no host wait
        inflight = None
    else:
        pos, send = token_rows.pack_blocks(x, phys, w, P_local, W, hm, L, BS)
        recv = torch.empty_like(send)
        inflight = comm._a2a(recv, send, None, None, DISPATCH)
    return BlockPending(recv, send, pos, routing.topk_weights, H, hm, inflight)


def dispatch_recv(comm: Any, p: Any, local_experts: int) -> tuple[ExpertBatch, Handle]:
    """Copy each received row to its pairs' places: the masked batch [P_local, W * T_max, H] and its counts."""
    check_pending(isinstance(p, BlockPending), comm, p)
    comm.check()
    W, P_local, dev, k = comm.world_size, local_experts, p.recv.device, p.topk_weights.shape[1]
    BS, cap = comm.max_tokens + 1, comm.world_size * comm.max_tokens
    kern = comm._kernels(p.recv)
    if p.graphed is not None:  # unpacked by the replay
        v = torch_graphs.views(comm, p.graphed, p.pos.shape[0])
        batch, splits = v.batch, (BS,) * W
        origin = new_origin(comm, batch, p.pos.shape[0], k)  # built in place: no dataclasses.replace (host time)
        handle = Handle(None, p.topk_weights, None, splits, splits, token_rows=v.plan, origin=origin)
        p.graphed.owner = handle.origin.call
        return batch, handle
    if kern is not None:
        counts = torch.empty(P_local, dtype=torch.int64, device=dev)
        xe = p.recv.new_empty((P_local, cap, p.hidden))
        pairs = torch.empty((2, W * BS, k), dtype=torch.int32, device=dev)  # rows, then weights as float32
        pair_rows, pair_weights = pairs[0], pairs[1].view(torch.float32)
        kern.unpack_blocks(p.recv, counts, xe, pair_rows, pair_weights, comm.error_word_addr(), comm.rank, W, p.hm,
                           checked=True)
        comm.watchdog.arm(DISPATCH, device=dev)  # skipped while a CUDA graph is captured
    else:
        comm._join(p.inflight, dev)
        xe, counts, pair_rows, pair_weights, bad = token_rows.unpack_blocks(p.recv, P_local, comm.rank, W, p.hm, k,
                                                                            cap, p.hidden)
        if bad.any():
            ranks = [r for r in range(W) if bad[r]]
            raise ValueError(f"rank {comm.rank}: routing.topk_ids holds expert ids outside [0, {W * P_local}) on "
                             f"rank(s) {ranks} ({int(bad.sum())} ids; found by dispatch)")
    batch = ExpertBatch(xe, counts, "masked")
    plan = TokenRowPlan(p.pos, p.send, pair_rows, pair_weights, BS)
    handle = Handle(None, p.topk_weights, None, (BS,) * W, (BS,) * W, token_rows=plan)
    return batch, stamp_handle(comm, batch, handle)


def refuse_oversized(comm: Any, handle: Handle) -> None:
    """ValueError when handle's dispatch on this fixed-size comm (decode mode or torch_fixed) was given more than
    max_tokens tokens. Such a dispatch sends no rows but takes part in every exchange, so its peers' calls complete
    with the right outputs and none waits; this rank's combine raises here, after its exchange."""
    o = handle.origin
    if comm.max_tokens is None or o is None or o.tokens <= comm.max_tokens:
        return
    other = ("build TorchComm(max_tokens=None) for exact splits at any size" if comm.name == "torch" else
             "use the `torch` comm for larger batches")
    raise oversized_error(comm.rank, comm.name, o.tokens, comm.max_tokens, other)


def combine_recv(comm: Any, inflight: Any, home: torch.Tensor | None, handle: Handle) -> torch.Tensor:
    """The partial rows come home in blocks [W * BS, H]: each token's rows summed (float32) -> [T, H]."""
    plan = handle.token_rows
    if isinstance(inflight, torch_graphs.BlockSet):
        return torch_graphs.combine_recv(comm, inflight, plan.pos.shape[0])
    comm._join(inflight, home.device)
    refuse_oversized(comm, handle)
    kern = comm._kernels(home)
    if kern is None:
        return token_rows.sum_home_blocks(home, plan.pos, plan.block_rows)
    out = home.new_empty((plan.pos.shape[0], home.shape[1]))
    kern.sum_home(home, None, plan.pos, out, block_rows=plan.block_rows, checked=True)
    return out
