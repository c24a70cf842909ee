"""Dispatch / combine latency and bandwidth per comm backend, next to a plain all_to_all_single.

    python bench/bench_dispatch.py --world-size 2 --backend gloo --quick          # CPU
    python bench/bench_dispatch.py --world-size 4 --backend nccl --json bench/results/dispatch_h200.json

Cases: DeepSeek-V3 decode (128 tokens/rank) and prefill (4096 tokens/rank) at hidden 7168, top-8
of 256 experts, and the five rows of the public dispatch/combine table (ANCHORS.md). Routing is
uniform random top-k. GB/s per rank = bytes this rank receives in dispatch (one row per (token, k)
pair, the torch backends' payload) over the dispatch time; the a2a baseline moves the same rows.
Each rank checks that dispatch then combine with an identity expert returns sum_k(w) * x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import DTYPES, sig, spawn_ranks, time_fn, write_record  # noqa: E402
from nanomoe_fn import Placement, Routing, TorchComm, TorchFixedComm, combine, dispatch  # noqa: E402

# (phase, experts, top_k, hidden, tokens per rank)
CASES = [("decode", 256, 8, 7168, 128), ("prefill", 256, 8, 7168, 4096),
         ("decode", 8, 2, 6144, 16), ("decode", 64, 6, 2048, 32), ("decode", 128, 4, 2880, 128),
         ("decode", 128, 8, 4096, 256), ("decode", 256, 8, 7168, 256)]
QUICK = [("decode", 256, 8, 512, 32), ("prefill", 256, 8, 512, 512), ("decode", 64, 6, 256, 32)]


def _routing(T: int, E: int, k: int, device: torch.device, seed: int) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    return Routing(ids.to(device, torch.int32), torch.rand(T, k, generator=gen).to(device))


def _one_case(case: tuple, rank: int, W: int, device: torch.device, args: argparse.Namespace) -> list[dict]:
    phase, E, k, H, T = case
    dtype = DTYPES[args.dtype]
    placement = Placement.identity(E, W)
    routing = _routing(T, E, k, device, args.seed + rank)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).to(device, dtype)
    expected = (x.double() * routing.topk_weights.double().sum(1, keepdim=True)).to(dtype)
    rows = []
    comms = {"torch": TorchComm(timeout_s=args.timeout),
             "torch_fixed": TorchFixedComm(max(T, 1), timeout_s=args.timeout)}
    for name, comm in comms.items():
        batch, handle = dispatch(x, routing, comm, placement)
        out = combine(batch, handle, comm)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
        received = int(batch.counts.sum()) * H * x.element_size()
        t_d = time_fn(lambda c=comm: dispatch(x, routing, c, placement), device, args.warmup, args.iters,
                      barrier=dist.barrier)
        t_c = time_fn(lambda c=comm, b=batch, h=handle: combine(b, h, c), device, args.warmup, args.iters,
                      barrier=dist.barrier)
        rows.append((name, statistics.median(t_d), statistics.median(t_c), received))
    # baseline: one all_to_all_single of the same pair rows, splits known in advance
    phys = routing.topk_ids.long().flatten() // placement.local_experts
    send_splits = torch.bincount(phys, minlength=W)
    recv_splits = torch.empty_like(send_splits)
    dist.all_to_all_single(recv_splits, send_splits)
    send = x.repeat_interleave(k, 0)[torch.argsort(phys, stable=True)]
    recv = send.new_empty((int(recv_splits.sum()), H))
    ss, rs = send_splits.tolist(), recv_splits.tolist()
    t_a = time_fn(lambda: dist.all_to_all_single(recv, send, rs, ss), device, args.warmup, args.iters,
                  barrier=dist.barrier)
    rows.append(("nccl_a2a" if args.backend == "nccl" else "gloo_a2a", statistics.median(t_a), None,
                 recv.numel() * recv.element_size()))
    out = []
    for name, td, tc, nbytes in rows:
        # the slowest rank sets the pace
        t = torch.tensor([td, tc or 0.0, nbytes], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        td, tc_max, nbytes = t.tolist()
        row = {"case": {"phase": phase, "tokens": T, "experts": E, "top_k": k, "hidden": H, "dtype": args.dtype},
               "variant": name, "median_us": round(td * 1e6, 2), "dispatch_us": round(td * 1e6, 2),
               "gbps": sig(nbytes / td / 1e9)}
        if tc is not None:
            row["combine_us"] = round(tc_max * 1e6, 2)
        out.append(row)
    return out


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: every case, then rank 0 prints and writes the JSON."""
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    dist.init_process_group(args.backend, rank=rank, world_size=W, timeout=timedelta(seconds=args.timeout))
    try:
        rows = [r for case in (QUICK if args.quick else CASES) for r in _one_case(case, rank, W, device, args)]
        if rank == 0:
            for r in rows:
                c = r["case"]
                print(f"{c['phase']:7s} E={c['experts']:3d} k={c['top_k']} H={c['hidden']:5d} T={c['tokens']:5d} "
                      f"{r['variant']:11s} dispatch {r['dispatch_us']:9.1f} us  combine "
                      f"{r.get('combine_us', float('nan')):9.1f} us  {r['gbps']:7.2f} GB/s/rank")
            if args.json:
                write_record(args.json, "dispatch", device, W, {}, rows)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and spawn the ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help="small cases that fit a CPU")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"--backend nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    spawn_ranks(run_rank, args.world_size, args.master_port, args)


if __name__ == "__main__":
    main()
