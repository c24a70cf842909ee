"""`nvlink` comm: dispatch/combine for the GPUs of one host, peers writing each other's memory directly.

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, H hidden, W ranks, P physical
slots, P_local = P // W, cap = W * T_max rows per expert (masked layout), U = W * T_max received-token
rows (source s owns rows s * T_max + t), M rows of the gathered batch (pairs this rank's experts take).

Each rank allocates the same buffers in torch symmetric memory (CUDA backend, NVLink multicast never
used) and maps its peers' copies. One dispatch is three kernels (kernels/ep_nvlink*.py):
  1. put_tokens: each token is written ONCE into each peer that owns one of its slots (DeepEP's normal
     mode accounting), with a k-entry code table: per pair, its local expert there and its index among
     this rank's pairs of that slot (an atomic counter per slot); codes -1 for pairs elsewhere;
  2. signal_wait: each rank publishes its count row to every peer (rows per slot there, its token count),
     then the flags: after it every peer's tokens, codes and counts are here;
  3. expand_tokens: a pair's row in the expert layout is its expert's first row + the rows of that expert
     from lower ranks + its index; decode copies each token there (its own straight from x), prefill
     only writes the row -> token index of a gathered batch (after count_layout, one program, has turned the
     count rows into each source's first row per expert and M).
Combine: each rank sums the weighted expert rows of every received token (float32) and writes one
partial row back to the token's rank; that rank adds its W partials (signal_wait between). No count
exchange has to finish before the tokens move, so the whole dispatch is one round trip.

mode "decode": masked batch [P_local, cap, H] (DeepGEMM's masked layout), no host sync at all, so the
whole layer can be captured in a CUDA graph. mode "prefill": a gathered batch (batch.py): x is this
comm's receive buffer [U, H] (every token once, this rank's own copied there by put), index [M] names
the token row of each expert row, so no token is copied k times (the triton expert backend loads its
rows through the index; the others materialise them). dispatch_recv reads M on the host once, while the
index is being written. Inside one expert, the rows of one source come in the order its programs ran
(not token order). The batch's x is overwritten by the next dispatch on this comm: run the experts on it
before that (combine comes first anyway).

dispatch_dtype=torch.float8_e4m3fn (FP8 dispatch; hidden a multiple of 128): put_tokens quantises each
token per 128 channels (fp8_quant's scheme, bit for bit) straight into packed rows of the receive buffers,
H fp8 bytes then H / 128 float32 scales (kernels/fp8_pack.py: 7392 bytes for H 7168, 0.52x a bf16 row);
this rank's own rows go there too, and expand copies packed rows. The batch is FP8 (batch.py): x the fp8
view [.., H] and x_scale the float32 view [.., H / 128] of the packed rows (strided, zero-copy; row stride
RB bytes), for the FP8 expert backends. Combine stays in dtype (their outputs' dtype).

One dispatch in flight per instance: dispatch, its combine, then the next dispatch (overlapped
micro-batches each take their own NvlinkComm). x must stay unchanged until dispatch_recv returns (this
rank's own tokens are copied from it there). Every wait runs on the GPU with a deadline: a peer that
never arrives ends the wait after `timeout_s` and leaves (stage, rank) in a host-mapped error word;
the next call on this comm (or `check()`) raises TimeoutError naming this rank, the stage and the
missing peer. The comm is unusable after that (its peers' state is unknown). A rank given more than max_tokens
tokens sends none of them but takes part in both exchanges with zero rows (so its peers finish, with the right
outputs), and its combine_recv raises ValueError after its exchange; the comm stays usable on every rank.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch, Routing
from nanomoe_fn.comm.nvlink_buffers import FP8, MODES, buffer_shapes, map_symmetric, option_reason
from nanomoe_fn.comm.plan import check_dispatch_args, oversized_error
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.opaque import opaque_to_compile

STAGES = {2: "dispatch/payload", 3: "combine/payload"}


@dataclass(frozen=True, eq=False)
class NvlinkHandle:
    """What combine needs: has [T, W] int32 (ranks holding each token's pairs), which comm and call made it,
    and the rows of the expert outputs combine expects (P_local * cap masked, M gathered); the received
    tokens' expert rows stay in the comm's own tables until the next dispatch."""

    has: torch.Tensor
    comm_id: int
    call: int
    rows: int
    tokens: int   # the tokens dispatch was given (more than max_tokens: none were sent, combine raises)


class NvlinkComm:
    """Expert-parallel dispatch/combine over peer-mapped GPU memory (one host, any number of GPUs).

    dtype: of x, of combine's output and of its partial sums. dispatch_dtype: None (rows move in dtype) or
    torch.float8_e4m3fn (packed FP8 rows, an FP8 batch for the FP8 expert backends: module docstring).
    """

    name = "nvlink"

    def __init__(self, max_tokens: int, hidden: int, top_k: int, num_slots: int,
                 dtype: torch.dtype = torch.bfloat16, mode: str = "decode", group: Any = None,
                 timeout_s: float = 60.0, dispatch_dtype: torch.dtype | None = None) -> None:
        ok, why = self.supports(max_tokens=max_tokens, hidden=hidden, top_k=top_k, num_slots=num_slots, dtype=dtype,
                                mode=mode, group=group, timeout_s=timeout_s, dispatch_dtype=dispatch_dtype)
        if not ok:
            raise ValueError(f"comm backend 'nvlink' is unavailable: {why}")
        from nanomoe_kernels import ep_nvlink, ep_nvlink_sync  # Triton: imported only when the comm is built
        from nanomoe_kernels.fp8_pack import packed_row_bytes, unpack_fp8_rows

        self._k, self._sync = ep_nvlink, ep_nvlink_sync
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        W = self.world_size
        if num_slots % W:
            raise ValueError(f"num_slots ({num_slots}) must be divisible by the world size ({W})")
        if (num_slots // W) * max_tokens >= 2**31:
            raise ValueError(f"(num_slots / world size) * max_tokens must be < 2**31 (int32 pair codes), got "
                             f"{num_slots // W} * {max_tokens}")
        self.max_tokens, self.hidden, self.top_k, self.num_slots = max_tokens, hidden, top_k, num_slots
        self.dtype, self.mode, self.layout = dtype, mode, MODES[mode]
        self.fp8 = dispatch_dtype == FP8  # packed FP8 rows in "tok" and the masked batch
        self.dispatch_dtype = FP8 if self.fp8 else dtype
        self.row_bytes = packed_row_bytes(hidden) if self.fp8 else hidden * dtype.itemsize  # one token row sent
        self._unpack = unpack_fp8_rows
        self.timeout_s, self._timeout_ns = float(timeout_s), int(timeout_s * 1e9)
        self.device = torch.device("cuda", torch.cuda.current_device())
        Tm, P_local = max_tokens, num_slots // W
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # peer mappings only, never multicast
        # this rank's own tables: pairs counted per slot (zeroed again by each signal), expert rows per
        # received pair (written by expand, read by combine)
        self._ctr = torch.zeros(num_slots, dtype=torch.int32, device=self.device)
        self._rows = torch.full((W * Tm, top_k), -1, dtype=torch.int32, device=self.device)
        self._handles, self._bufs = map_symmetric(buffer_shapes(W, Tm, hidden, top_k, P_local, dtype, self.fp8),
                                                  self.group, self.rank, W, self.device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        ep_nvlink.check_put_buffers(self._ctr, self.epoch, self._bufs, W, Tm, hidden, top_k, dtype, num_slots,
                                    self.fp8)
        # error word [set, stage, peer, 0] in pinned host memory the kernels write directly (UVA), read by
        # the host with no CUDA call and no sync
        self._err = torch.zeros(4, dtype=torch.int32).pin_memory()
        self._err_np = self._err.numpy()
        self._m_host = torch.zeros(1, dtype=torch.int64).pin_memory()  # prefill: M, written there by the GPU
        self._m_np = self._m_host.numpy()
        self._base = torch.empty((W, P_local), dtype=torch.int64, device=self.device)  # prefill layout, per call
        self._m_ready = torch.cuda.Event()
        self._calls, self._open = 0, False
        dist.barrier(group=self.group)

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Needs CUDA, an initialised process group whose ranks are GPUs of one host, and torch symmetric
        memory; dtype bfloat16/float16/float32; mode decode|prefill; positive sizes; dispatch_dtype None (=
        dtype) or float8_e4m3fn (hidden a multiple of 128)."""
        why = option_reason(**options)
        if why:
            return False, why
        if not torch.cuda.is_available():
            return False, "the nvlink comm needs CUDA GPUs (peers write each other's memory); on CPUs use 'torch'"
        if not dist.is_available() or not dist.is_initialized():
            return False, "torch.distributed is not initialised; call init_process_group first"
        try:
            importlib.import_module("torch.distributed._symmetric_memory")
            importlib.import_module("triton")
        except ImportError as err:
            return False, f"needs torch symmetric memory and Triton: {err}"
        return True, ""

    def close(self) -> None:
        """Drop this rank's symmetric buffers (each rank calls it once its last exchange has returned: peers keep
        their mappings alive until they close too). Idempotent; exchanges raise RuntimeError after it."""
        self._handles, self._bufs = None, None

    def check(self) -> None:
        """Raise the TimeoutError a GPU-side wait left in the error word (host read, no sync)."""
        if self._bufs is None:
            raise RuntimeError(f"rank {self.rank}: this NvlinkComm is closed")
        if self._err_np[0] and self._err_np[1] == 4:
            raise ValueError(f"rank {self.rank}: routing.topk_ids holds expert ids outside [0, {self.num_slots}) "
                             f"(found on the GPU by the nvlink dispatch; this comm is unusable now)")
        if self._err_np[0]:
            stage = STAGES.get(int(self._err_np[1]), "?")
            raise TimeoutError(f"rank {self.rank}: EP stage 'nvlink {stage}' timed out after {self.timeout_s:g}s "
                               f"waiting for rank {int(self._err_np[2])} (a peer did not arrive)")

    def _buf(self, name: str) -> torch.Tensor:
        return self._bufs[name][0]

    @opaque_to_compile  # Triton kernels and peer signals: opaque to torch.compile
    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Write each token into the ranks that own its slots (one kernel, no wait)."""
        self.check()
        # expert ids are checked on the GPU by put_tokens (a bad slot: ValueError at the next call); a
        # non-identity placement looks ids up in its tables first, so they are checked before that
        check_dispatch_args(x, routing, placement, values=not placement.is_identity)
        T, H = x.shape
        if placement.world_size != self.world_size or placement.num_physical != self.num_slots:
            raise ValueError(f"placement must have world_size {self.world_size} and {self.num_slots} physical slots "
                             f"(this comm's), got {placement.world_size} and {placement.num_physical}")
        if H != self.hidden or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x must be [T, {self.hidden}] {self.dtype} on {self.device} (this comm's buffers), got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        if routing.topk_ids.shape[1] != self.top_k:
            raise ValueError(f"routing top_k must be this comm's {self.top_k}, got {routing.topk_ids.shape[1]}")
        if self._open:
            raise ValueError("this nvlink comm already has a dispatch in flight: combine it first (overlapped "
                             "micro-batches each need their own NvlinkComm)")
        ids, weights = routing.topk_ids, routing.topk_weights
        if T > self.max_tokens:   # send no rows but join both exchanges, so no peer waits (combine_recv raises)
            x, ids, weights = x[:0], ids[:0], weights[:0]
        phys = ids if placement.is_identity else placement.physical_ids(ids, self.rank)
        phys = (phys if phys.dtype in (torch.int32, torch.int64) else phys.to(torch.int32)).contiguous()
        weights = weights.to(torch.float32).contiguous()
        x = x.contiguous()
        has = torch.empty((x.shape[0], self.world_size), dtype=torch.int32, device=self.device)
        self._k.put_tokens(x, phys, weights, has, self._ctr, self.epoch, self._err.data_ptr(), self._bufs,
                           self.rank, self.max_tokens, self.num_slots, own_rows=self.layout == "gathered" or self.fp8,
                           buffers_checked=True, fp8=self.fp8)
        self._open, self._calls = True, self._calls + 1
        return x, has, T

    @opaque_to_compile  # Triton kernels and peer signals: opaque to torch.compile
    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, NvlinkHandle]:
        """Publish the counts and wait for every peer's tokens, then copy them into this rank's expert layout."""
        x, has, given = pending
        W, P_local, Tm = self.world_size, self.num_slots // self.world_size, self.max_tokens
        flag, cnt = self._bufs["flag"], self._bufs["cnt"]
        self._sync.signal_wait((flag[0][0], flag[1]), self.epoch, self._err.data_ptr(), self.rank,
                               self._timeout_ns, 2, counts=(self._ctr, cnt, x.shape[0]))
        tok = self._buf("tok").view(torch.int16) if self.fp8 else self._buf("tok")  # FP8: packed rows as words
        x = tok if self.fp8 else x  # FP8: this rank's rows are in tok too (put quantised them there)
        if self.layout == "masked":
            row = tok.shape[1]
            xe = torch.empty((P_local, W * Tm, row), dtype=tok.dtype, device=self.device)  # padding rows unread
            counts = torch.empty(P_local, dtype=torch.int64, device=self.device)
            self._k.expand_tokens(x, tok, self._buf("meta"), cnt[0], xe.view(-1, row), self._rows, self.rank, Tm,
                                  counts=counts, own_from_x=not self.fp8)
        else:
            counts = torch.empty(P_local, dtype=torch.int64, device=self.device)
            # rows per expert, each source's first rows, and M straight into pinned memory: the one host read
            self._sync.count_layout(cnt[0], counts, self._base, self._m_host.data_ptr())
            self._m_ready.record()
            m_max = W * Tm * min(self.top_k, P_local)  # the most rows one rank's experts can receive
            index = torch.empty(m_max, dtype=torch.int32, device=self.device)
            # batch row -> token row, written while the host waits for M (no token row is copied)
            self._k.expand_tokens(x, tok, self._buf("meta"), cnt[0], index, self._rows, self.rank, Tm, base=self._base)
            M = self._read_rows(m_max)
            return self._batch(tok, counts, index[:M]), NvlinkHandle(has, id(self), self._calls, M, given)
        return self._batch(xe, counts), NvlinkHandle(has, id(self), self._calls, P_local * W * Tm, given)

    def _batch(self, rows: torch.Tensor, counts: torch.Tensor, index: torch.Tensor | None = None) -> ExpertBatch:
        """The batch over received rows (masked [P_local, cap, ..] or, with index, gathered [U, ..]); FP8: the
        fp8 and scale views of the packed rows (int16 words here)."""
        layout = "gathered" if index is not None else "masked"
        if not self.fp8:
            return ExpertBatch(rows, counts, layout, index)
        q, scale = self._unpack(rows.view(torch.uint8), self.hidden)
        return ExpertBatch(q, counts, layout, index, x_scale=scale)

    def _read_rows(self, m_max: int) -> int:
        """Wait for the copy of M (not for work queued after it) -> M, after checking the error word."""
        self._m_ready.synchronize()
        self.check()  # a peer that never arrived: its counts are garbage
        M = int(self._m_np[0])
        if not 0 <= M <= m_max:
            raise RuntimeError(f"rank {self.rank}: nvlink received {M} rows, outside [0, {m_max}] (corrupt counts)")
        return M

    @opaque_to_compile  # Triton kernels and peer signals: opaque to torch.compile
    def combine_send(self, y: ExpertBatch, handle: NvlinkHandle) -> Any:
        """Sum each received token's weighted expert rows here and write the partial sum to its rank."""
        self.check()
        if not isinstance(handle, NvlinkHandle) or handle.comm_id != id(self):
            raise ValueError("handle must come from this NvlinkComm's dispatch_recv")
        if handle.call != self._calls or not self._open:
            raise ValueError("handle is stale: it belongs to an earlier dispatch of this comm")
        want = "contiguous" if self.layout == "gathered" else self.layout  # expert outputs: batch row order
        dtypes = (self.dtype, torch.bfloat16) if self.fp8 else (self.dtype,)  # FP8 backends output bfloat16
        if y.layout != want or y.x.dtype not in dtypes or y.x.shape[-1] != self.hidden or \
                y.x.numel() != handle.rows * self.hidden:
            raise ValueError(f"y must be the expert outputs of the batch this comm dispatched ({want}, {handle.rows} "
                             f"rows of {self.hidden}, {' or '.join(map(str, dtypes))}), got layout {y.layout!r} "
                             f"{y.x.dtype} {tuple(y.x.shape)}")
        yf = y.x.reshape(-1, self.hidden).contiguous()
        self._k.combine_tokens(yf, self._rows, self._buf("w"), self._buf("cnt"), self._bufs["comb"], self.rank,
                               self.max_tokens)
        return handle

    @opaque_to_compile  # Triton kernels and peer signals: opaque to torch.compile
    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Wait for every peer's partial sums and add them: [T, H] in x's dtype."""
        handle = pending
        flag = self._bufs["flag"]
        self._sync.signal_wait((flag[0][1], flag[1]), self.epoch, self._err.data_ptr(), self.rank,
                               self._timeout_ns, 3)
        out = torch.empty((handle.has.shape[0], self.hidden), dtype=self.dtype, device=self.device)
        self._k.sum_partials(self._buf("comb"), handle.has, out)
        self._open = False
        if handle.tokens > self.max_tokens:
            raise oversized_error(self.rank, "nvlink", handle.tokens, self.max_tokens)
        return out
