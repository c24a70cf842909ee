"""The torch comm's decode mode on GPUs, replayed from CUDA graphs: one graph per token count for dispatch, one
for combine's exchange. Opt-in: `TorchComm(max_tokens=..., graphs=True)` (see the teardown rule below).

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, H hidden, W ranks, P_local slots per
rank, BS = T_max + 1 rows per block, L row length (token_rows.block_layout), cap = W * T_max.

Why: an eager decode-mode dispatch is a fill, two kernel launches, torch's NCCL call and a few allocations, and on
the GPU hosts we measured those host calls take 250-600 us against ~50 us of GPU work (the NCCL call alone 70-130
us). Here that work is captured once per T into a CUDA graph over static buffers; a call then copies x, the slot
ids and the weights into the static inputs (three copies) and replays the graph: pack, the all_to_all_single and
unpack run on the current stream as before. Combine launches its partial-sum kernel into the static send rows,
replays the exchange and sums at home into a new [T, H] tensor.

The static set (one per comm and shape: H, dtype, k, ids dtype, P_local, device) is owned by one dispatch at a
time, from dispatch_send until that dispatch's combine_recv:
- a dispatch while the set is owned (overlapped micro-batches on one comm) takes the eager path, fresh buffers;
- the batch's x and the handle's tables are the set's buffers: the next dispatch on this comm overwrites them
  (expert_ffn and combine read them before that, as with the nvlink comm);
- the release records an event; a dispatch on another stream waits for it before it overwrites the set.
The first call with a given T runs its kernels and NCCL call eagerly on the set (that compiles the kernels for
these buffers and warms the communicator); the second captures (on a side stream, thread-local capture mode, no
device sync) and replays; a failed capture turns the graphs off for the comm with a warning (nothing ran: the
call then runs eagerly, so the peers see the same exchanges). The eager path is taken
while the caller captures a CUDA graph itself (its kernels go into the caller's graph), under torch.compile
tracing, on CPUs, and with `TorchComm(graphs=False)`. Both paths launch the same kernels on the same rows:
their outputs are bitwise equal (tests/gpu/test_torch_graphs_gpu.py). A replayed graph is watched like the
eager calls (one watchdog entry per dispatch and per combine, armed after the replay).

Teardown: NCCL (2.26 on) destroys a communicator only after every CUDA graph that captured its collectives is
destroyed, so `destroy_process_group()` waits forever while such a graph lives (most likely what hung the first
GPU test of this module, which kept a reference to a set past destroy_process_group; not yet confirmed on two
GPUs). `TorchComm.close()` destroys the
comm's graphs (`drop`, which resets them even where a set is still referenced); call it before
destroy_process_group. That rule is why graphs are opt-in. A comm with graphs that was never closed has them
destroyed at interpreter exit (an atexit hook, which runs before torch tears the process groups down).
"""

from __future__ import annotations

import atexit
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from nanomoe_fn.batch import ExpertBatch, TokenRowPlan

DISPATCH, COMBINE = "dispatch/payload", "combine/payload"
PENDING = -1  # owner value between dispatch_send and dispatch_recv (the call number is known only then)


@dataclass(frozen=True, eq=False)
class TokenViews:
    """A static set's views for T tokens (slicing costs host time, which is a decode call's time)."""

    x: torch.Tensor  # [T, H]
    ids: torch.Tensor  # [T, k]
    w: torch.Tensor  # [T, k]
    pos: torch.Tensor  # [T, W]
    batch: ExpertBatch  # the masked batch (the set's xe and counts)
    plan: TokenRowPlan


@dataclass(eq=False)
class BlockSet:
    """The static buffers of one shape and the graphs captured over them (see the module docstring)."""

    x: torch.Tensor  # [T_max, H]
    ids: torch.Tensor  # [T_max, k] the physical slots, the dtype the routing gave
    w: torch.Tensor  # [T_max, k] float32
    send: torch.Tensor  # [W * BS, L]
    recv: torch.Tensor  # [W * BS, L]
    pos: torch.Tensor  # [T_max, W] int64
    xe: torch.Tensor  # [P_local, cap, H]
    counts: torch.Tensor  # [P_local] int64
    pairs: torch.Tensor  # [2, W * BS, k] int32: rows, then weights as float32
    part: torch.Tensor  # [W * BS, H]: partial rows sent home
    home: torch.Tensor  # [W * BS, H]: partial rows received
    hm: int
    seen: set[int] = field(default_factory=set)  # token counts run once eagerly (warm-up)
    dispatch_graphs: dict[int, Any] = field(default_factory=dict)  # T -> CUDAGraph
    combine_graph: Any = None
    owner: int = 0  # 0 free, PENDING, else the owning dispatch's call number
    released: Any = None  # CUDA event recorded at the last release
    released_on: int = 0  # the raw CUDA stream it was recorded on
    views: dict[int, TokenViews] = field(default_factory=dict)  # built once per token count

    @property
    def pair_rows(self) -> torch.Tensor:
        return self.pairs[0]

    @property
    def pair_weights(self) -> torch.Tensor:
        return self.pairs[1].view(torch.float32)


def usable(comm: Any, x: torch.Tensor) -> bool:
    """Whether a decode-mode call on x may use the graphs: GPU kernels, graphs on, nobody capturing or tracing."""
    return (comm.graphs and comm._kernels(x) is not None and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _new_set(comm: Any, x: torch.Tensor, ids: torch.Tensor, k: int, P_local: int, hm: int, L: int) -> BlockSet:
    T_max, W, H, dev = comm.max_tokens, comm.world_size, x.shape[1], x.device
    R, cap = W * (T_max + 1), W * T_max
    empty = lambda *shape, dtype=x.dtype: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
    return BlockSet(empty(T_max, H), empty(T_max, k, dtype=ids.dtype), empty(T_max, k, dtype=torch.float32),
                    empty(R, L), empty(R, L), empty(T_max, W, dtype=torch.int64), empty(P_local, cap, H),
                    empty(P_local, dtype=torch.int64), empty(2, R, k, dtype=torch.int32), empty(R, H), empty(R, H),
                    hm)


def acquire(comm: Any, x: torch.Tensor, ids: torch.Tensor, P_local: int, hm: int, L: int) -> BlockSet | None:
    """The shape's static set for this dispatch, or None: eager path (set owned, graphs not usable). ids [T, k]
    the physical slots."""
    if not usable(comm, x):
        return None
    key = (x.shape[1], x.dtype, ids.shape[1], ids.dtype, P_local, x.device)
    s = comm._graph_sets.get(key)
    if s is None:
        s = comm._graph_sets[key] = _new_set(comm, x, ids, ids.shape[1], P_local, hm, L)
    if s.owner:
        return None
    # the raw stream (an int): a torch Stream object per call costs host time, which is a decode call's time
    if s.released is not None and s.released_on != torch._C._cuda_getCurrentRawStream(x.device.index):
        torch.cuda.current_stream(x.device).wait_event(s.released)
    s.owner = PENDING
    return s


def drop(comm: Any) -> None:
    """Destroy the comm's graphs and static sets (TorchComm.close; see the module docstring's teardown)."""
    for s in comm._graph_sets.values():
        for graph in (*s.dispatch_graphs.values(), s.combine_graph):
            if graph is not None:
                graph.reset()
        s.dispatch_graphs.clear()
        s.combine_graph = None
    comm._graph_sets.clear()
    if comm._graph_exit is not None:
        atexit.unregister(comm._graph_exit)
        comm._graph_exit = None


def _drop_at_exit(ref: Any) -> None:
    comm = ref()
    if comm is not None:
        drop(comm)


def _capture(comm: Any, body: Any, device: torch.device) -> Any:
    """body() captured into a new CUDA graph on the comm's side stream (the comm's memory pool); None (graphs off
    for this comm from now on, a warning) if the capture fails: a capture records work and runs none, so the
    caller runs body() itself and its peers see the same exchanges."""
    if comm._graph_stream is None:
        comm._graph_stream, comm._graph_pool = torch.cuda.Stream(device), torch.cuda.graph_pool_handle()
    if comm._graph_exit is None:  # a partial per comm: atexit.unregister matches it alone
        comm._graph_exit = functools.partial(_drop_at_exit, weakref.ref(comm))
        atexit.register(comm._graph_exit)
    side, cur = comm._graph_stream, torch.cuda.current_stream(device)
    side.wait_stream(cur)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(pool=comm._graph_pool, capture_error_mode="thread_local")
            try:
                body()
            finally:
                graph.capture_end()
    except (RuntimeError, TimeoutError) as err:  # TimeoutError: _a2a's wrapping of a failed NCCL call
        warnings.warn(f"rank {comm.rank}: the torch comm's decode-mode CUDA graph could not be captured "
                      f"({str(err).splitlines()[0]}); this comm runs its calls eagerly from now on", stacklevel=4)
        comm.graphs = False
        return None
    cur.wait_stream(side)
    return graph


def dispatch(comm: Any, s: BlockSet, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> TokenViews:
    """Copy the inputs into s and run pack, the exchange and unpack on s: replayed from the graph of this T, or
    eagerly the first time (compiles the kernels for these buffers, warms the communicator; the second call
    captures). s.xe, s.counts, s.pairs and s.pos[:T] are then this dispatch's; returns s's views for T.
    x [T, H], ids [T, k], w [T, k]."""
    T = ids.shape[0]
    v = views(comm, s, T)
    v.x.copy_(x)
    v.ids.copy_(ids)
    v.w.copy_(w)
    graph = s.dispatch_graphs.get(T)
    if graph is None:
        kern, W, P_local = comm._kernels(x), comm.world_size, s.xe.shape[0]

        def body() -> None:
            s.send.view(W, -1, s.send.shape[1])[:, 0].zero_()  # the header rows (pack counts into them)
            kern.pack_blocks(v.x, v.ids, v.w, v.pos, s.send, P_local, s.hm, checked=True)
            comm._a2a(s.recv, s.send, None, None, DISPATCH, async_op=False)
            kern.unpack_blocks(s.recv, s.counts, s.xe, s.pair_rows, s.pair_weights, comm.error_word_addr(),
                               comm.rank, W, s.hm, checked=True)

        if T in s.seen and comm.graphs:
            graph = s.dispatch_graphs[T] = _capture(comm, body, x.device)
        s.seen.add(T)
        if graph is None:
            body()
    if graph is not None:
        graph.replay()
    comm.watchdog.arm(DISPATCH, device=x.device)
    return v


def views(comm: Any, s: BlockSet, T: int) -> TokenViews:
    """s's views for a dispatch of T tokens: its inputs, pos, the masked batch and the token-row plan."""
    got = s.views.get(T)
    if got is None:
        pos = s.pos[:T]
        plan = TokenRowPlan(pos, s.send, s.pair_rows, s.pair_weights, comm.max_tokens + 1)
        got = s.views[T] = TokenViews(s.x[:T], s.ids[:T], s.w[:T], pos, ExpertBatch(s.xe, s.counts, "masked"), plan)
    return got


def owned_by(comm: Any, call: int) -> BlockSet | None:
    """The static set the dispatch with this call number holds, if any."""
    if call:
        for s in comm._graph_sets.values():
            if s.owner == call:
                return s
    return None


def combine_send(comm: Any, s: BlockSet, yx: torch.Tensor) -> BlockSet:
    """Partial rows into s.part (yx [P_local * cap, H], the experts' output flat) and replay the exchange (captured
    by the set's first combine)."""
    comm._kernels(yx).partial_rows(yx, s.pair_rows, s.pair_weights, s.part, checked=True)
    exchange = lambda: comm._a2a(s.home, s.part, None, None, COMBINE, async_op=False)  # noqa: E731
    if s.combine_graph is None and comm.graphs:
        s.combine_graph = _capture(comm, exchange, yx.device)
    if s.combine_graph is None:
        exchange()
    else:
        s.combine_graph.replay()
    comm.watchdog.arm(COMBINE, device=yx.device)
    return s


def combine_recv(comm: Any, s: BlockSet, T: int) -> torch.Tensor:
    """Sum each token's partial rows -> a new [T, H]; then the set is free again."""
    out = s.home.new_empty((T, s.home.shape[1]))
    comm._kernels(out).sum_home(s.home, None, views(comm, s, T).pos, out, block_rows=comm.max_tokens + 1,
                                checked=True)
    if s.released is None:
        s.released = torch.cuda.Event()
    s.released.record(torch.cuda.current_stream(out.device))
    s.released_on, s.owner = torch._C._cuda_getCurrentRawStream(out.device.index), 0
    return out
