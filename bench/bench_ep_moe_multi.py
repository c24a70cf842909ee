"""Multi-rank EP MoE benchmark over torch.distributed, seed-compatible CLI.

    python bench/bench_ep_moe_multi.py --world-size 2 --backend gloo --mode both \
        --batch-size 8 --hidden-dim 256 --warmup 5 --iters 20

Spawns --world-size processes (or runs as one rank under torchrun, which sets RANK/WORLD_SIZE).
Experts are sharded evenly over the ranks; every rank holds --batch-size tokens. Before timing,
each rank checks its EP output against the same layer run on one rank with all experts (and
`--mode both` checks the modes agree). Reported time per mode: the median over iterations of the
slowest rank's time.
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

from bench.common import (  # noqa: E402
    MODES,
    add_seed_flags,
    check_seed_flags,
    cuda_profiler,
    measure_ceilings,
    nvtx_range,
    pick_dtype,
    pick_modes,
    roofline,
    sig,
    spawn_ranks,
    time_fn,
    write_record,
)
from bench.workload import agree, config_from_args, floors, make_inputs  # noqa: E402
from nanomoe_fn import Placement, TorchComm, TorchFixedComm, moe_layer, shard_moe_params  # noqa: E402


def run_rank(rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One EP rank: init the process group, check, time, and (rank 0) report."""
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        # ranks share the machine's cores: one rank must not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(args.backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout))
    try:
        _bench(rank, world_size, args, device)
    finally:
        dist.destroy_process_group()


def _bench(rank: int, world_size: int, args: argparse.Namespace, device: torch.device) -> None:
    dtype = pick_dtype(args.dtype, device)
    cfg = config_from_args(args)
    if cfg.num_experts % world_size:
        raise SystemExit(f"--world-size ({world_size}) must divide --num-experts ({cfg.num_experts})")
    params, x = make_inputs(cfg, args, dtype, device, rank)
    placement = Placement.identity(cfg.num_experts, world_size)
    local = shard_moe_params(params, placement, rank)
    if args.comm == "torch_fixed":  # sized for the largest batch: can never overflow
        comm = TorchFixedComm(max(1, args.max_num_tokens or args.batch_size), timeout_s=args.timeout)
    else:
        comm = TorchComm(timeout_s=args.timeout)
    modes = pick_modes(args.mode, cfg, device)

    def layer(m: str) -> torch.Tensor:
        return moe_layer(local, x, cfg, comm, placement, MODES[m], capacity=args.tokens_per_expert)

    single = moe_layer(params, x, cfg, backend="bmm")  # all experts on this rank: the EP-free answer
    outs = {m: layer(m) for m in modes}
    for m in modes:
        agree(outs[m], single, dtype)

    bytes_moved, flops = floors(params, x, cfg)
    rows = []
    for m in modes:
        def step(m: str = m) -> torch.Tensor:
            with nvtx_range(f"ep_moe[{m}]"):
                return layer(m)

        with cuda_profiler(args.cuda_profiler):
            times = torch.tensor(time_fn(step, device, args.warmup, args.iters, barrier=dist.barrier),
                                 dtype=torch.float64)
        # the layer is as slow as its slowest rank
        slowest = times.to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        per_iter = slowest.cpu().tolist()
        med, mean = statistics.median(per_iter), statistics.fmean(per_iter)
        if rank == 0:
            print(f"{m}: {mean * 1e3:.3f} ms/iter (median {med * 1e3:.3f} ms)  [world_size={world_size}, "
                  f"backend={args.backend}, tokens/rank={args.batch_size}]")
        row = {"case": {"phase": "decode" if args.batch_size <= 256 else "prefill",
                        "tokens": args.batch_size, "experts": cfg.num_experts, "top_k": cfg.top_k,
                        "hidden": cfg.hidden, "expert_type": cfg.expert_type,
                        "dtype": str(dtype).replace("torch.", ""), "comm": args.comm, "backend": args.backend},
               "variant": m, "median_us": round(med * 1e6, 2), "mean_us": round(mean * 1e6, 2),
               "gbps": sig(bytes_moved / med / 1e9), "tflops": sig(flops / med / 1e12)}
        rows.append(row)
    # ceilings after the timed loops: the big matmul's thread pool otherwise slows small CPU work
    ceilings = measure_ceilings(device, dtype) if args.json and rank == 0 else None
    for row in rows if ceilings else []:
        row["roofline"] = sig(roofline(row["median_us"] * 1e-6, bytes_moved, flops, ceilings))
    if rank == 0 and args.json:
        write_record(args.json, "ep_moe_multi", device, world_size, ceilings, rows)


def main(argv: list[str] | None = None) -> None:
    """Parse flags; spawn ranks (or be one under torchrun)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_flags(parser)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--master-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--comm", default="torch", choices=["torch", "torch_fixed"],
                        help="torch: exact splits (one count exchange, a host sync); torch_fixed: fixed-size "
                             "blocks sized for --max-num-tokens (default --batch-size) tokens per rank, "
                             "no host sync; it delivers the masked layout itself (no --tokens-per-expert)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for its peers")
    args = parser.parse_args(argv)
    check_seed_flags(args)
    if args.device not in (None, "cuda" if args.backend == "nccl" else "cpu"):
        raise SystemExit("--device: the multi-rank bench places ranks itself (cuda:<rank> for nccl, cpu for gloo)")
    if args.comm == "torch_fixed" and args.tokens_per_expert is not None:
        raise SystemExit("--tokens-per-expert does not apply to --comm torch_fixed: it delivers the masked "
                         "[E_local, W * max-num-tokens, H] layout itself")
    if args.backend == "nccl" and torch.cuda.device_count() < (args.world_size if "RANK" not in os.environ else 1):
        raise SystemExit(f"--backend nccl needs {args.world_size} CUDA devices, this machine has "
                         f"{torch.cuda.device_count()}; use --backend gloo on CPU")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    if args.world_size < 1:
        raise SystemExit(f"--world-size must be >= 1, got {args.world_size}")
    spawn_ranks(run_rank, args.world_size, args.master_port, args)


if __name__ == "__main__":
    main()
