"""The `nvlink` comm's synchronising kernels: count rows and arrival flags between the GPUs of one host, and
the batch layout that the received count rows give.

Dimension legend: W ranks, P physical slots, P_local = P // W slots per rank, C1 = P_local + 1 entries of
one source's count row.

signal_wait is a barrier over a symmetric flag row [W] int64: program d raises this rank's flag at rank d
(system-scope release: every write this rank made before, in earlier kernels or in this program, is
visible at d first) and waits until d has raised its flag here (acquire). Before the dispatch barrier,
program d also publishes this rank's count row for d into d's count buffer (rows per slot of d from the
slot counters, then this rank's token count) and zeroes those counters for the next call. Flags carry the
call's epoch, so nothing is reset. Every wait gives up after `timeout_ns` (%globaltimer) and writes
(stage, peer) into a host-mapped error word: a peer that never arrives ends the wait instead of hanging
the GPU. Atomics with memory scopes and %globaltimer: GPUs only (tests/test_kernels_compile.py compiles
it for sm_90 on the CPU; the GPU tests run it).

count_layout turns the received count rows into the gathered batch's layout in one program (rows per
expert, each source's first row of each expert, and M, stored straight into a pinned host word so the
host reads it after one event, with no copy launched). Plain loads and stores: it runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.ep_nvlink import _report, check_arg
from nanomoe_kernels.launch import Launcher


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _signal_wait_kernel(flag_ptr, flag_delta, epoch_ptr, err_addr, ctr_ptr, cnt_ptr, cnt_delta, rank, T, P_local,
                        timeout_ns, STAGE: tl.constexpr, COUNTS: tl.constexpr, PLB: tl.constexpr):
    d = tl.program_id(0)
    e = tl.load(epoch_ptr)
    if COUNTS:
        i = tl.arange(0, PLB)
        m = i < P_local
        n = tl.load(ctr_ptr + d * P_local + i, mask=m, other=0)
        dst = cnt_ptr + tl.load(cnt_delta + d) + rank * (P_local + 1)
        tl.store(dst + i, n.to(tl.int64), mask=m)
        tl.store(dst + P_local + i, tl.zeros([PLB], dtype=tl.int64) + T, mask=i == 0)
        tl.store(ctr_ptr + d * P_local + i, tl.zeros([PLB], dtype=tl.int32), mask=m)
        tl.debug_barrier()  # every thread's stores before the one release below
    tl.atomic_xchg(flag_ptr + tl.load(flag_delta + d) + rank, e, sem="release", scope="sys")
    got = tl.atomic_add(flag_ptr + d, 0, sem="acquire", scope="sys")
    t0 = _now()
    waited = _now() - t0
    while (got < e) & (waited < timeout_ns):
        got = tl.atomic_add(flag_ptr + d, 0, sem="acquire", scope="sys")
        waited = _now() - t0
    if got < e:
        _report(err_addr, STAGE, d)


@triton.jit
def _layout_kernel(cnt_ptr, counts_ptr, base_ptr, m_addr, W, P_local, C, WB: tl.constexpr, PLB: tl.constexpr,
                   STORE_M: tl.constexpr):
    # one program: cnt [W, C] (its first P_local columns) -> counts [P_local], base [W, P_local] (experts in
    # order, sources in rank order inside each), and with STORE_M, M = all rows into the host word at m_addr
    s = tl.arange(0, WB)[:, None]
    e = tl.arange(0, PLB)[None, :]
    m = (s < W) & (e < P_local)
    per_src = tl.load(cnt_ptr + s * C + e, mask=m, other=0)  # [WB, PLB]
    counts = tl.sum(per_src, axis=0)  # [PLB]
    first = tl.cumsum(counts, axis=0) - counts  # each expert's first row
    tl.store(base_ptr + s * P_local + e, first[None, :] + tl.cumsum(per_src, axis=0) - per_src, mask=m)
    ee = tl.arange(0, PLB)
    tl.store(counts_ptr + ee, counts, mask=ee < P_local)
    if STORE_M:
        tl.store(m_addr.to(tl.pointer_type(tl.int64)), tl.sum(counts, axis=0))


_SIGNAL_WAIT, _LAYOUT = Launcher(_signal_wait_kernel), Launcher(_layout_kernel)


def count_layout(cnt: torch.Tensor, counts: torch.Tensor, base: torch.Tensor, m_addr: int = 0) -> None:
    """From received count rows cnt [W, C] int64 (per source: rows per local expert in its first P_local
    columns, P_local = counts.shape[0] < C): counts [P_local] int64 rows per local expert, base [W, P_local]
    int64 the first row of source s's rows of expert e in the contiguous batch (experts in order, sources in
    rank order inside each), and, when m_addr is not 0, M (the batch's rows) as int64 at that host address
    (pinned memory)."""
    W, C = cnt.shape
    P_local = counts.shape[0] if counts.dim() == 1 else -1
    check_arg("cnt", cnt, (W, C), torch.int64)
    check_arg("counts", counts, (P_local,), torch.int64)
    check_arg("base", base, (W, P_local), torch.int64)
    if not 0 <= P_local < C:
        raise ValueError(f"counts must have fewer entries than cnt has columns ({C}), got {P_local}")
    _LAYOUT((1,), cnt, counts, base, m_addr, W, P_local, C, WB=max(2, triton.next_power_of_2(W)),
            PLB=max(2, triton.next_power_of_2(P_local)), STORE_M=m_addr != 0, num_warps=4)


def signal_wait(flag: tuple, epoch: torch.Tensor, err_addr: int, rank: int, timeout_ns: int, stage: int,
                counts: tuple | None = None) -> None:
    """Barrier over the symmetric flag row flag = (buffer [W] int64, delta [W] int64): after it, every rank's
    earlier writes into this rank's buffers are visible here. counts = (ctr [P] int32 slot counters,
    (cnt [W, P_local + 1] int64 symmetric buffer, delta), T): publish this rank's count rows first. GPU only."""
    W = flag[0].shape[0]
    check_arg("flag", flag[0], (W,), torch.int64)
    check_arg("epoch", epoch, (1,), torch.int64)
    if counts is None:
        ctr, cnt, T, P_local = flag[0], flag, 0, 1
    else:
        ctr, cnt, T = counts
        P_local = cnt[0].shape[1] - 1
        check_arg("ctr", ctr, (W * P_local,), torch.int32)
        check_arg("cnt buffer", cnt[0], (W, P_local + 1), torch.int64)
    _SIGNAL_WAIT((W,), flag[0], flag[1], epoch, err_addr, ctr, cnt[0], cnt[1], rank, T, P_local, timeout_ns,
                              STAGE=stage, COUNTS=counts is not None, PLB=triton.next_power_of_2(P_local),
                              num_warps=1)
