"""Host cost of the pieces of an eager EP call on this machine: torch ops, Triton launches, NCCL calls, syncs,
and the host time of each step inside the `nvlink` and `torch` comms' dispatch and combine (the torch comm's
decode mode too, at decode sizes, with its graphs (comm/torch_graphs.py) and without).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python bench/gpu/host_costs.py --json $OUT/host_costs.json      # 2 GPUs
        python bench/gpu/host_costs.py --world-size 1 --tokens 128 --comms torch_decode,torch_decode_nograph

Dimension legend: T tokens per rank, H hidden (7168), E experts (256), k (8), W ranks (2).

Everything is host wall time (time.perf_counter), no profiler: (1) per-call cost of small operations, the GPU
kept busy-free (a sync every 100 calls); (2) each comm's steps, timed by wrapping the functions a call goes
through (the wrapper adds ~0.3 us), for eager rounds with a device sync and barrier before each, medians over
rounds, for each rank (`comms.rankN`). Rank 0 prints and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nanomoe_fn import Placement, Routing, combine, dispatch  # noqa: E402
from nanomoe_fn.comm import nvlink as nvlink_mod  # noqa: E402
from nanomoe_fn.comm import torch_dist as torch_mod  # noqa: E402
from nanomoe_fn.comm.launch import spawn_ranks  # noqa: E402


@triton.jit
def _noop_kernel(a, b, c, d, e, f, g, h, n0, n1, n2, n3, n4, n5, n6, n7, K: tl.constexpr, B: tl.constexpr):
    if tl.program_id(0) == 0:
        tl.store(a + tl.arange(0, B), tl.load(b + tl.arange(0, B)) + n0 + K)


def _per_call_us(fn, n: int = 400) -> float:
    torch.cuda.synchronize()
    best = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(n):
            fn()
            if i % 100 == 99:
                torch.cuda.synchronize()
        best.append((time.perf_counter() - t) / n * 1e6)
    torch.cuda.synchronize()
    return round(min(best), 2)


def small_ops(dev: torch.device) -> dict:
    """Per-call host us of small operations."""
    a = torch.zeros(64, device=dev)
    bufs = [torch.zeros(64, device=dev) for _ in range(8)]
    pin = torch.zeros(64).pin_memory()
    ev = torch.cuda.Event()
    res = {"torch_add_": _per_call_us(lambda: a.add_(1)),
           "torch_empty": _per_call_us(lambda: torch.empty(64, device=dev)),
           "event_record": _per_call_us(lambda: ev.record())}

    def rec_sync():
        ev.record()
        ev.synchronize()

    def d2h_sync():
        pin.copy_(a, non_blocking=True)
        ev.record()
        ev.synchronize()

    res["event_record_sync_idle"] = _per_call_us(rec_sync)
    res["d2h_pinned_event_sync"] = _per_call_us(d2h_sync)
    args = (*bufs, 1, 2, 3, 4, 5, 6, 7, 8)
    res["triton_launch_16_args"] = _per_call_us(lambda: _noop_kernel[(1,)](*args, K=3, B=64))
    compiled = _noop_kernel[(1,)](*args, K=3, B=64)
    try:
        stream = torch.cuda.current_stream(dev).cuda_stream
        full = (*args, 3, 64)

        def fast():
            compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *full)

        fast()
        torch.cuda.synchronize()
        res["triton_compiled_run_16_args"] = _per_call_us(fast)
    except Exception as err:  # noqa: BLE001 - report what this Triton offers
        res["triton_compiled_run_16_args"] = f"failed: {type(err).__name__}: {err}"
    W = dist.get_world_size()
    cin = torch.zeros(W * 4, dtype=torch.int64, device=dev)
    cout = torch.empty_like(cin)
    res["nccl_a2a_tiny_even"] = _per_call_us(lambda: dist.all_to_all_single(cout, cin), 200)
    res["nccl_a2a_tiny_splits"] = _per_call_us(lambda: dist.all_to_all_single(cout, cin, [4] * W, [4] * W), 200)
    res["nccl_a2a_tiny_async_wait"] = _per_call_us(
        lambda: dist.all_to_all_single(cout, cin, [4] * W, [4] * W, async_op=True).wait(), 200)
    pg, opts = dist.distributed_c10d._get_default_group(), dist.AllToAllOptions()
    res["nccl_pg_alltoall_base_tiny"] = _per_call_us(lambda: pg.alltoall_base(cout, cin, [], [], opts).wait(), 200)
    return res


class StepTimer:
    """Wraps named functions (owner, attribute) to record each call's host duration."""

    def __init__(self, targets: list[tuple[object, str, str]]) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self._saved = []
        for owner, attr, label in targets:
            fn = getattr(owner, attr)
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(fn, label))
        self.on = False

    def _wrap(self, fn: object, label: str) -> object:
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if self.on:
                    self.times[label].append((time.perf_counter() - t) * 1e6)
        return timed

    def restore(self) -> None:
        """Put the original functions back."""
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)

    def medians(self) -> dict:
        """Median host us per wrapped function."""
        return {k: round(statistics.median(v), 1) for k, v in self.times.items()}


def comm_steps(comm, name: str, T: int, dev: torch.device, rounds: int = 30) -> dict:
    """Host us of each step of eager rounds (sync + barrier before each round)."""
    W, E, k, H = dist.get_world_size(), 256, 8, 7168
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(dev, torch.int32)
    routing = Routing(ids, torch.rand(T, k, generator=gen).to(dev))
    x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
    placement = Placement.identity(E, W).to(dev)
    targets = [(comm, a, a) for a in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "check")]
    if name == "nvlink":
        targets += [(comm._k, "put_tokens", "k.put_tokens"), (comm._sync, "signal_wait", "k.signal_wait"),
                    (comm._sync, "count_layout", "k.count_layout"), (comm, "_read_rows", "_read_rows"),
                    (comm._k, "expand_tokens", "k.expand_tokens"), (comm._k, "combine_tokens", "k.combine_tokens"),
                    (comm._k, "sum_partials", "k.sum_partials"),
                    (nvlink_mod, "check_dispatch_args", "check_dispatch_args")]
    elif name.startswith("torch_decode"):  # the torch comm's decode mode (comm/torch_blocks.py, torch_graphs.py)
        from nanomoe_kernels import ep_rows

        from nanomoe_fn.comm import torch_blocks, torch_graphs
        targets += [(torch_graphs, n, f"graphs.{n}") for n in ("acquire", "dispatch", "combine_send", "combine_recv")]
        targets += [(comm, a, a) for a in ("_phys", "_a2a", "_join", "error_word_addr")]
        targets += [(torch_blocks, n, f"blocks.{n}") for n in ("dispatch_send", "dispatch_recv", "combine_recv",
                                                               "stamp_handle", "new_origin", "_sizes")]
        targets += [(torch_mod, "check_dispatch_args", "check_dispatch_args"),
                    (torch_mod, "check_combine", "check_combine"), (comm.watchdog, "arm", "watchdog.arm")]
        targets += [(ep_rows, n, f"k.{n}") for n in ("pack_blocks", "unpack_blocks", "partial_rows", "sum_home")]
    else:
        targets += [(comm, a, a) for a in ("_phys", "_a2a", "_start_read", "_finish_read", "_join")]
        targets += [(torch_mod, "check_dispatch_args", "check_dispatch_args"),
                    (torch_mod, "check_combine", "check_combine")]
        from nanomoe_kernels import ep_rows
        targets += [(ep_rows, n, f"k.{n}") for n in ("pack_rows", "unpack_rows", "partial_rows", "sum_home")]
    timer = StepTimer(targets)
    total = []
    try:
        for i in range(rounds + 3):
            torch.cuda.synchronize()
            dist.barrier()
            timer.on = i >= 3
            t = time.perf_counter()
            b, h = dispatch(x, routing, comm, placement)
            t_d = time.perf_counter()
            y = b.materialize() if b.layout == "gathered" else b
            t_m = time.perf_counter()
            combine(y, h, comm)
            t_c = time.perf_counter()
            if i >= 3:
                total.append(((t_d - t) * 1e6, (t_c - t_m) * 1e6))
    finally:
        timer.restore()
    out = timer.medians()
    out["dispatch_total"] = round(statistics.median(a for a, _ in total), 1)
    out["combine_total"] = round(statistics.median(b for _, b in total), 1)
    return out


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: small ops, then each comm's steps."""
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=W, timeout=timedelta(seconds=120), device_id=dev)
    res = {"small_ops_us": small_ops(dev), "comms": {}}
    from nanomoe_fn.comm.nvlink import NvlinkComm
    from nanomoe_fn.comm.torch_dist import TorchComm
    want = set(args.comms.split(","))
    for T in args.tokens:
        mode = "decode" if T <= 256 else "prefill"
        if "nvlink" in want:
            comm = NvlinkComm(T, 7168, 8, 256, torch.bfloat16, mode, timeout_s=60)
            res["comms"][f"nvlink_t{T}"] = comm_steps(comm, "nvlink", T, dev)
        if "torch" in want:
            tc = TorchComm(timeout_s=60)
            res["comms"][f"torch_t{T}"] = comm_steps(tc, "torch", T, dev)
            tc.close()
        if mode == "decode":
            for graphs, label in ((True, "torch_decode"), (False, "torch_decode_nograph")):
                if label in want:
                    tc = TorchComm(timeout_s=60, max_tokens=T, graphs=graphs)
                    res["comms"][f"{label}_t{T}"] = comm_steps(tc, label, T, dev)
                    tc.close()
    every = [None] * W
    dist.all_gather_object(every, res["comms"])  # each rank's host runs at its own speed: keep both
    res["comms"] = {f"rank{r}": c for r, c in enumerate(every)}
    res["cpu"] = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t")
    if rank == 0:
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"bench": "host_costs", "command": " ".join(sys.argv), "torch": torch.__version__,
                           "triton": triton.__version__, **res}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


COMMS = ("nvlink", "torch", "torch_decode", "torch_decode_nograph")


def main() -> None:
    """Parse flags and spawn the ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--json", default=None)
    p.add_argument("--world-size", type=int, default=2, help="ranks, one GPU each (1: the host side alone)")
    p.add_argument("--comms", default=",".join(COMMS), help=f"comma-separated, of {','.join(COMMS)}")
    args = p.parse_args()
    unknown = set(args.comms.split(",")) - set(COMMS)
    if unknown or args.world_size < 1:
        p.error(f"--comms: unknown {sorted(unknown)}" if unknown else "--world-size must be >= 1")
    spawn_ranks(run_rank, args.world_size, None, args)


if __name__ == "__main__":
    main()
