"""Where the host time of eager `nvlink` dispatch/combine calls goes (cProfile of rank 0), on 2 GPUs.

    python bench/gpu/nvlink_host_profile.py [--tokens 128] [--rounds 50]

Rank 0 prints the functions with the most cumulative and own time over the rounds (GPU synchronised once
at the end, so host-side waits on the GPU are only the comm's own).
"""

from __future__ import annotations

import argparse
import cProfile
import io
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


def _round(x, routing, comm, placement) -> torch.Tensor:
    b, h = dispatch(x, routing, comm, placement)
    return combine(b.materialize(), h, comm)  # a gathered batch (prefill) in batch-row order, as experts return


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: warm up, then profile args.rounds eager rounds per token count."""
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=W, timeout=timedelta(seconds=120), device_id=dev)
    E, k, H = 256, 8, 7168
    for T in args.tokens:
        mode = "decode" if T <= 256 else "prefill"
        gen = torch.Generator().manual_seed(rank)
        ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(dev, torch.int32)
        routing = Routing(ids, torch.rand(T, k, generator=gen).to(dev))
        x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
        placement = Placement.identity(E, W).to(dev)
        comm = NvlinkComm(T, H, k, E, torch.bfloat16, mode, timeout_s=60)
        for _ in range(5):
            _round(x, routing, comm, placement)
        torch.cuda.synchronize()
        dist.barrier()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.rounds):
            _round(x, routing, comm, placement)
        prof.disable()
        torch.cuda.synchronize()
        if rank == 0:
            for key in ("cumulative", "tottime"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(28)
                print(f"=== T={T} {mode}, {args.rounds} rounds, sorted by {key}\n{s.getvalue()[-6000:]}")
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Parse flags and spawn two ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=50)
    spawn_ranks(run_rank, 2, None, p.parse_args())


if __name__ == "__main__":
    main()
