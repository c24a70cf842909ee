"""Where the time of the `nvlink` comm goes: per-kernel device time (torch.profiler) and back-to-back CUDA-graph
replays (no barrier between them, so rank skew does not count), on 2 GPUs at DeepSeek-V3 dims.

    python bench/gpu/nvlink_profile.py [--tokens 128 4096] [--json PATH] [--cprofile ROUNDS]

Rank 0 prints, for each token count: the profiler's per-kernel table (device time per call) of eager
dispatch+combine rounds, the medians of eager dispatch and combine over 30 rounds back to back (CUDA events,
no barrier between rounds), and the mean time of N graph replays of dispatch + combine (decode). With
--cprofile, also the Python functions where ROUNDS eager rounds spend their host time (cProfile, rank 0).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nanomoe_fn import Placement, Routing, combine, dispatch  # noqa: E402
from nanomoe_fn.comm.launch import spawn_ranks  # noqa: E402
from nanomoe_fn.comm.nvlink import NvlinkComm  # noqa: E402


def _graph_mean_us(fn, n: int, profile: bool = False) -> tuple[float, str]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        fn()
    g.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    mean = start.elapsed_time(end) * 1e3 / n
    table = ""
    if profile:  # the same replays under the profiler: per-kernel device time inside the graph
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                g.replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14)
    return mean, table


def round_trip_phases(comm, placement, routing, x):
    """One eager round with CUDA events around dispatch and combine (a gathered batch is materialised
    between them, untimed) -> a callable returning the 4 events."""
    def run():
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        b, h = dispatch(x, routing, comm, placement)
        ev[1].record()
        y = b.materialize()
        ev[2].record()
        combine(y, h, comm)
        ev[3].record()
        return ev
    return run


def _eager_phases(run, n: int) -> dict:
    """n eager rounds back to back after one barrier (ranks in lockstep, host launch cost included):
    medians of dispatch and combine device-timeline spans, us."""
    torch.cuda.synchronize()
    dist.barrier()
    evs = [run() for _ in range(n)]
    torch.cuda.synchronize()
    d = sorted(e[0].elapsed_time(e[1]) * 1e3 for e in evs)
    c = sorted(e[2].elapsed_time(e[3]) * 1e3 for e in evs)
    return {"dispatch": round(d[n // 2], 1), "combine": round(c[n // 2], 1)}


def _host_profile(run, rounds: int) -> str:
    """cProfile of `rounds` eager rounds (one GPU sync at the end): the top functions by cumulative time."""
    torch.cuda.synchronize()
    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(rounds):
        run()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(28)
    return text.getvalue()


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: profile eager rounds, then time graph replays."""
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=W, timeout=timedelta(seconds=120), device_id=dev)
    E, k, H = 256, 8, 7168
    out = {}
    for T in args.tokens:
        mode = "decode" if T <= 256 else "prefill"
        gen = torch.Generator().manual_seed(rank)
        ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(dev, torch.int32)
        routing = Routing(ids, torch.rand(T, k, generator=gen).to(dev))
        x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
        placement = Placement.identity(E, W).to(dev)
        comm = NvlinkComm(T, H, k, E, torch.bfloat16, mode, timeout_s=60)

        def round_trip(c=comm, p=placement, r=routing, xx=x) -> torch.Tensor:
            b, h = dispatch(xx, r, c, p)
            return combine(b.materialize(), h, c)

        for _ in range(3):
            round_trip()
        torch.cuda.synchronize()
        dist.barrier()
        acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                with torch.profiler.record_function("dispatch"):
                    b, h = dispatch(x, routing, comm, placement)
                y = b.materialize()  # a gathered batch (prefill) in batch-row order, as the experts return
                with torch.profiler.record_function("combine"):
                    combine(y, h, comm)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
        res = {"mode": mode, "profile": table,  # host side too: where eager calls spend their time
               "cpu_profile": prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)}
        res["eager_back_to_back_us"] = _eager_phases(round_trip_phases(comm, placement, routing, x), 30)
        if args.cprofile:
            res["host_cprofile"] = _host_profile(round_trip, args.cprofile)
        if mode == "decode":
            b, h = dispatch(x, routing, comm, placement)
            combine(b.materialize(), h, comm)
            res["graph_round_us"], res["graph_profile"] = _graph_mean_us(round_trip, 50, profile=True)
        out[T] = res
        dist.barrier()
    if rank == 0:
        for T, res in out.items():
            graph = res.get("graph_round_us", float("nan"))
            print(f"=== T={T} {res['mode']}: graph round {graph:.1f} us (mean of 50); "
                  f"eager back to back (median us): {res['eager_back_to_back_us']}")
            print(res["profile"])
            if res.get("host_cprofile"):
                print(f"--- T={T}: host time of eager rounds (cProfile)\n{res['host_cprofile'][-6000:]}")
            if res.get("graph_profile"):
                print(f"--- T={T}: the graph replays under the profiler (per-kernel totals over 50 replays)")
                print(res["graph_profile"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({str(T): {k: v for k, v in r.items()} for T, r in out.items()}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Parse flags and spawn two ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    p.add_argument("--json", default=None)
    p.add_argument("--cprofile", type=int, default=0, metavar="ROUNDS", help="also cProfile ROUNDS eager rounds")
    args = p.parse_args()
    spawn_ranks(run_rank, 2, None, args)


if __name__ == "__main__":
    main()
