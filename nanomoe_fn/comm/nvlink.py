"""`nvlink` comm: dispatch/combine for the GPUs of one host, peers writing each other's memory directly.

Dimension legend: T tokens on this rank (T <= T_max), k experts per token, H hidden, W ranks, P physical
slots, P_local = P // W, L = P + W, cap = W * T_max, U = W * T_max received-token rows, Q expert rows.

Each rank allocates the same buffers in torch symmetric memory (CUDA backend, NVLink multicast never
used) and maps its peers' copies. One dispatch:
  1. exchange_counts: every rank's count row (rows per slot, tokens per destination) is all-gathered
     through the peers' buffers (each entry tagged with a device-side epoch: no flags to reset);
  2. put_tokens: each token is written ONCE into each rank that owns one of its slots, with a k-entry
     table of the exact rows its pairs take there (nvlink_plan.py computes them from the counts);
  3. signal_wait, then expand_tokens: each rank copies its received tokens into the expert layout.
Combine: each rank sums the weighted expert rows of every received token (float32) and writes one
partial row back to the token's rank; that rank adds its W partials (signal_wait between).

mode "decode": masked batch [P_local, cap, H] (DeepGEMM's masked layout), no host sync at all, so the
whole layer can be captured in a CUDA graph. mode "prefill": contiguous batch [M, H]; dispatch_recv
reads M on the host once (the batch's shape depends on it).

One dispatch in flight per instance: dispatch, its combine, then the next dispatch (overlapped
micro-batches each take their own NvlinkComm). Every wait runs on the GPU with a deadline: a peer that
never arrives ends the wait after `timeout_s` and leaves (stage, rank) in a host-mapped error word;
the next call on this comm (or `check()`) raises TimeoutError naming this rank, the stage and the
missing peer. The comm is unusable after that (its peers' state is unknown).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanomoe_fn.batch import ExpertBatch
from nanomoe_fn.comm.nvlink_plan import local_plan, pair_rows, received_counts
from nanomoe_fn.comm.plan import check_dispatch_args
from nanomoe_fn.placement import Placement
from nanomoe_fn.route import Routing

MODES = {"decode": "masked", "prefill": "contiguous"}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STAGES = {1: "dispatch/counts", 2: "dispatch/payload", 3: "combine/payload"}


@dataclass(frozen=True, eq=False)
class NvlinkHandle:
    """What combine needs: has [T, W] int32 (ranks holding each token's pairs), n_all [W, L] int64 (every
    rank's count row: tokens received from each source among them), and which comm and call made it."""

    has: torch.Tensor
    n_all: torch.Tensor
    comm_id: int
    call: int


class NvlinkComm:
    """Expert-parallel dispatch/combine over peer-mapped GPU memory (one host, any number of GPUs)."""

    name = "nvlink"

    def __init__(self, max_tokens: int, hidden: int, top_k: int, num_slots: int,
                 dtype: torch.dtype = torch.bfloat16, mode: str = "decode", group: Any = None,
                 timeout_s: float = 60.0) -> None:
        ok, why = self.supports(max_tokens=max_tokens, hidden=hidden, top_k=top_k, num_slots=num_slots, dtype=dtype,
                                mode=mode, group=group, timeout_s=timeout_s)
        if not ok:
            raise ValueError(f"comm backend 'nvlink' is unavailable: {why}")
        import torch.distributed._symmetric_memory as symm_mem

        from kernels import ep_nvlink, ep_nvlink_plan  # Triton: imported only when the comm is built

        self._k, self._plan = ep_nvlink, ep_nvlink_plan
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        W = self.world_size
        if num_slots % W:
            raise ValueError(f"num_slots ({num_slots}) must be divisible by the world size ({W})")
        self.max_tokens, self.hidden, self.top_k, self.num_slots = max_tokens, hidden, top_k, num_slots
        self.dtype, self.mode, self.layout = dtype, mode, MODES[mode]
        self.timeout_s, self._timeout_ns = float(timeout_s), int(timeout_s * 1e9)
        self.device = torch.device("cuda", torch.cuda.current_device())
        Tm, L = max_tokens, num_slots + W
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # peer mappings only, never multicast
        shapes = {"tok": ((W * Tm, hidden), dtype), "meta": ((W * Tm, top_k), torch.int32),
                  "w": ((W * Tm, top_k), torch.float32), "src": ((W * Tm,), torch.int32),
                  "cnt": ((W, L), torch.int64), "flag": ((2, W), torch.int64), "comb": ((W, Tm, hidden), dtype)}
        local = {n: symm_mem.empty(*s, dtype=dt, device=self.device).zero_() for n, (s, dt) in shapes.items()}
        torch.cuda.synchronize(self.device)  # flags and counts are zero before any peer can write them
        self._handles, self._bufs = [], {}
        for n, t in local.items():
            try:
                hdl = symm_mem.rendezvous(t, self.group.group_name)
            except Exception as err:  # noqa: BLE001 - any failure here means no peer mapping
                raise RuntimeError(f"rank {self.rank}: the nvlink comm could not map its peers' buffers (all ranks "
                                   f"must be GPUs of one host with peer access): {err}") from err
            ptrs = [hdl.get_buffer(r, list(t.shape), t.dtype).data_ptr() for r in range(W)]
            if any((p - t.data_ptr()) % t.element_size() for p in ptrs):
                raise RuntimeError(f"rank {self.rank}: peer buffer '{n}' is not aligned to its element size")
            delta = torch.tensor([(p - t.data_ptr()) // t.element_size() for p in ptrs], dtype=torch.int64,
                                 device=self.device)
            self._handles.append(hdl)
            self._bufs[n] = (t, delta)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        # error word [set, stage, peer, 0] in pinned host memory the kernels write directly (UVA), read by
        # the host with no CUDA call and no sync
        self._err = torch.zeros(4, dtype=torch.int32).pin_memory()
        self._err_np = self._err.numpy()
        self._calls, self._open = 0, False
        dist.barrier(group=self.group)

    @staticmethod
    def supports(**options: Any) -> tuple[bool, str]:
        """Needs CUDA, an initialised process group whose ranks are GPUs of one host, and torch symmetric
        memory; dtype bfloat16/float16/float32; mode decode|prefill; positive sizes."""
        mode = options.get("mode", "decode")
        if mode not in MODES:
            return False, f"mode must be one of {sorted(MODES)}, got {mode!r}"
        dtype = options.get("dtype", torch.bfloat16)
        if dtype not in DTYPES:
            return False, f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype}"
        for name in ("max_tokens", "hidden", "top_k", "num_slots"):
            v = options.get(name, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                return False, f"{name} must be a positive int, got {v!r}"
        if not options.get("timeout_s", 60.0) > 0:
            return False, f"timeout_s must be > 0, got {options.get('timeout_s')}"
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

    def check(self) -> None:
        """Raise the TimeoutError a GPU-side wait left in the error word (host read, no sync)."""
        if self._err_np[0] and self._err_np[1] == 4:
            raise ValueError(f"rank {self.rank}: routing.topk_ids holds expert ids outside [0, {self.num_slots}) "
                             f"(found on the GPU by the nvlink decode plan; this comm is unusable now)")
        if self._err_np[0]:
            stage = STAGES.get(int(self._err_np[1]), "?")
            raise TimeoutError(f"rank {self.rank}: EP stage 'nvlink {stage}' timed out after {self.timeout_s:g}s "
                               f"waiting for rank {int(self._err_np[2])} (a peer did not arrive)")

    def _buf(self, name: str) -> torch.Tensor:
        return self._bufs[name][0]

    def dispatch_send(self, x: torch.Tensor, routing: Routing, placement: Placement) -> Any:
        """Exchange counts (on the GPU), then write each token into the ranks that own its slots."""
        self.check()
        fast = self.layout == "masked" and isinstance(x, torch.Tensor) and x.dim() == 2 and \
            x.shape[0] <= self._plan.MAX_TOKENS  # decode: the plan in one launch
        # the fast path checks expert ids inside its plan kernel (one launch fewer than a separate check)
        check_dispatch_args(x, routing, placement, values=not fast)
        T, H = x.shape
        if placement.world_size != self.world_size or placement.num_physical != self.num_slots:
            raise ValueError(f"placement must have world_size {self.world_size} and {self.num_slots} physical slots "
                             f"(this comm's), got {placement.world_size} and {placement.num_physical}")
        if H != self.hidden or x.dtype != self.dtype or x.device != self.device:
            raise ValueError(f"x must be [T, {self.hidden}] {self.dtype} on {self.device} (this comm's buffers), got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        if T > self.max_tokens or routing.topk_ids.shape[1] != self.top_k:
            raise ValueError(f"x must have at most max_tokens={self.max_tokens} tokens and routing top_k="
                             f"{self.top_k}, got {T} tokens and top_k {routing.topk_ids.shape[1]}")
        if self._open:
            raise ValueError("this nvlink comm already has a dispatch in flight: combine it first (overlapped "
                             "micro-batches each need their own NvlinkComm)")
        W, P, Tm = self.world_size, self.num_slots, self.max_tokens
        ids = routing.topk_ids
        phys = (ids if placement.is_identity else placement.physical_ids(ids, self.rank)).contiguous()
        weights = routing.topk_weights.to(torch.float32).contiguous()
        n_all = torch.empty((W, P + W), dtype=torch.int64, device=self.device)
        err, x = self._err.data_ptr(), x.contiguous()
        if fast:
            row, has, tok_idx, within, dest = self._plan.plan_decode(phys, P, W, self.epoch, err)
            self._k.exchange_counts(row, self._bufs["cnt"], n_all, self.epoch, err, self.rank, self._timeout_ns, 1)
            self._k.put_tokens(x, has, tok_idx, dest, weights, self._bufs, self.rank, Tm,
                               masked=(phys, within, n_all, P // W, W * Tm))
        else:
            plan = local_plan(phys.long(), P, W)
            has = plan.has
            self.epoch.add_(1)
            self._k.exchange_counts(plan.row, self._bufs["cnt"], n_all, self.epoch, err, self.rank,
                                    self._timeout_ns, 1)
            pos = pair_rows(plan, n_all, self.rank, P, W, self.layout, W * Tm)
            self._k.put_tokens(x, has, plan.tok_idx, plan.dest, weights, self._bufs, self.rank, Tm, pos=pos)
        self._open, self._calls = True, self._calls + 1
        return has, n_all

    def dispatch_recv(self, pending: Any) -> tuple[ExpertBatch, NvlinkHandle]:
        """Wait for every peer's tokens, then copy them into this rank's expert layout."""
        has, n_all = pending
        W, P, Tm, H = self.world_size, self.num_slots, self.max_tokens, self.hidden
        flag = self._buf("flag")
        self._k.signal_wait((flag[0], self._bufs["flag"][1]), self.epoch, self._err.data_ptr(), self.rank,
                            self._timeout_ns, 2)
        if self.layout == "masked":
            xe = torch.empty((P // W, W * Tm, H), dtype=self.dtype, device=self.device)  # padding rows unread
            counts = torch.empty(P // W, dtype=torch.int64, device=self.device)
            self._k.expand_tokens(self._buf("tok"), self._buf("meta"), n_all, xe.view(-1, H), self.rank, Tm, counts)
        else:
            counts = received_counts(n_all, self.rank, P, W)[0]
            M = int(counts.sum())  # host read: the contiguous batch's shape (prefill only)
            self.check()
            xe = torch.empty((M, H), dtype=self.dtype, device=self.device)
            self._k.expand_tokens(self._buf("tok"), self._buf("meta"), n_all, xe, self.rank, Tm)
        return ExpertBatch(xe, counts, self.layout), NvlinkHandle(has, n_all, id(self), self._calls)

    def combine_send(self, y: ExpertBatch, handle: NvlinkHandle) -> Any:
        """Sum each received token's weighted expert rows here and write the partial sum to its rank."""
        self.check()
        if not isinstance(handle, NvlinkHandle) or handle.comm_id != id(self):
            raise ValueError("handle must come from this NvlinkComm's dispatch_recv")
        if handle.call != self._calls or not self._open:
            raise ValueError("handle is stale: it belongs to an earlier dispatch of this comm")
        if y.layout != self.layout or y.x.dtype != self.dtype or y.x.shape[-1] != self.hidden:
            raise ValueError(f"y must be the {self.layout} {self.dtype} batch this comm dispatched, got layout "
                             f"{y.layout!r} {y.x.dtype} {tuple(y.x.shape)}")
        yf = y.x.reshape(-1, self.hidden).contiguous()
        self._k.combine_tokens(yf, self._buf("meta"), self._buf("w"), self._buf("src"), handle.n_all,
                               self._bufs["comb"], self.rank, self.max_tokens)
        return handle

    def combine_recv(self, pending: Any) -> torch.Tensor:
        """Wait for every peer's partial sums and add them: [T, H] in x's dtype."""
        handle = pending
        flag = self._buf("flag")
        self._k.signal_wait((flag[1], self._bufs["flag"][1]), self.epoch, self._err.data_ptr(), self.rank,
                            self._timeout_ns, 3)
        out = torch.empty((handle.has.shape[0], self.hidden), dtype=self.dtype, device=self.device)
        self._k.sum_partials(self._buf("comb"), handle.has, out)
        self._open = False
        return out
