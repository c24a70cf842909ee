"""Host overhead of the `torch` / `torch_fixed` comms: per-call host wall time and a torch.profiler trace.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python bench/gpu/torch_comm_profile.py --out $OUT                                   # 2 GPUs, V3 sizes
    python bench/gpu/torch_comm_profile.py --backend gloo --hidden 256 --experts 32 --tokens 16 64 --out /tmp/p

Dimension legend: T tokens per rank, H hidden, E experts (= physical slots, identity placement), k experts
per token, W ranks, P_local = E / W.

For each token count T (default 128 = decode and 4096 = prefill) and comm (`torch`, plus `torch_fixed`
where T <= 256, the decode sizes), every rank: checks one round (combine(dispatch(x)) with an identity
expert == sum_k(w) * x), warms up, then (a) times each of dispatch_send / dispatch_recv / combine_send /
combine_recv with time.perf_counter (host wall time of the call; no sync inside a round, one device
sync + barrier between rounds), and (b) runs 10 rounds under torch.profiler (CPU, and CUDA on GPUs).
Rank 0 writes <out>/torch_comm_profile.json: per case the host medians of every rank (us), the aten
ops called per stage (direct children of the stage's record_function; `compute` = those of them that
do device work; `all` = every aten op under it) and the launched kernels per round, and the
profiler's top 40 rows by self CPU time (name, count, self_cpu_us, cuda_us). Chrome traces of rank 0:
the first case as <out>/torch_comm_trace_rank0.json, the others as
<out>/torch_comm_trace_rank0_<comm>_t<T>.json (named in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from nanomoe_fn import Placement, Routing  # noqa: E402
from nanomoe_fn.comm.launch import spawn_ranks  # noqa: E402
from nanomoe_fn.comm.torch_dist import TorchComm  # noqa: E402
from nanomoe_fn.comm.torch_fixed import TorchFixedComm  # noqa: E402

STAGES = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DECODE_MAX_T = 256  # torch_fixed runs at these token counts and below
# aten ops that only make views, allocate or read on the host (no device work): the rest of a stage's direct
# ops ("compute") each launch at least one kernel on GPUs, the CPU proxy for launches
NO_KERNEL = {f"aten::{n}" for n in ("view", "reshape", "_reshape_alias", "select", "slice", "unsqueeze", "squeeze",
                                    "flatten", "as_strided", "alias", "detach", "resolve_conj", "resolve_neg",
                                    "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "t",
                                    "transpose", "expand", "narrow", "unflatten")}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dist.barrier()


def _round(comm: TorchComm, x: torch.Tensor, routing: Routing, placement: Placement,
           times: list[float] | None = None, label: bool = False) -> torch.Tensor:
    """One dispatch + identity expert + combine; appends the host time of each stage to `times` (s)."""
    steps = (lambda _: comm.dispatch_send(x, routing, placement), comm.dispatch_recv,
             lambda bh: comm.combine_send(bh[0].materialize(), bh[1]), comm.combine_recv)  # gathered -> rows
    value = None
    for name, step in zip(STAGES, steps):
        t0 = time.perf_counter()
        if label:
            with record_function(name):
                value = step(value)
        else:
            value = step(value)
        if times is not None:
            times.append(time.perf_counter() - t0)
    return value


def _event_us(e: object, *names: str) -> float:
    """First of `names` that the profiler's event has (attribute names moved between torch releases)."""
    for n in names:
        if hasattr(e, n):
            return float(getattr(e, n))
    return 0.0


def _op_counts(prof: profile, rounds: int) -> dict:
    """Per stage, per round: aten ops called directly from the comm (children of the stage label), those
    of them that do device work (`compute`, c10d collectives included) and all aten ops below the label;
    plus launched kernels and copies (cudaLaunchKernel, cudaMemcpyAsync, ...) per round (GPUs)."""
    out: dict = {s: {"direct": 0, "compute": 0, "all": 0} for s in STAGES}
    launches = 0
    for e in prof.events():
        if "LaunchKernel" in e.name or e.name in ("cudaMemcpyAsync", "cudaMemsetAsync"):
            launches += 1
        if e.name not in out:
            continue
        out[e.name]["direct"] += sum(c.name.startswith("aten::") for c in e.cpu_children)
        out[e.name]["compute"] += sum(c.name.startswith(("aten::", "c10d::")) and c.name not in NO_KERNEL
                                      for c in e.cpu_children)
        stack, n_all = list(e.cpu_children), 0
        while stack:
            c = stack.pop()
            n_all += c.name.startswith("aten::")
            stack.extend(c.cpu_children)
        out[e.name]["all"] += n_all
    res = {s: {k: v / rounds for k, v in d.items()} for s, d in out.items()}
    res["launches_per_round"] = launches / rounds
    return res


def _top_rows(prof: profile, n: int = 40) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"name": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 2),
             "cuda_us": round(_event_us(e, "device_time_total", "cuda_time_total"), 2)} for e in rows]


def _case(rank: int, W: int, dev: torch.device, args: argparse.Namespace, name: str, T: int,
          trace: str | None) -> dict:
    """Check, warm up, time and profile one (comm, T) case on this rank; rank 0 exports the trace."""
    E, k, H = args.experts, args.top_k, args.hidden
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1234 + rank)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(dev, torch.int32)
    routing = Routing(ids, torch.rand(T, k, generator=gen).to(dev))
    x = torch.randn(T, H, generator=gen).to(dev, dtype)
    placement = Placement.identity(E, W).to(dev)
    comm = TorchComm(timeout_s=60) if name == "torch" else TorchFixedComm(T, timeout_s=60)
    try:
        out = _round(comm, x, routing, placement)  # identity expert: out == sum_k(w) * x
        want = (x.double() * routing.topk_weights.double().sum(1, keepdim=True)).to(dtype)
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        for _ in range(args.warmup):
            _round(comm, x, routing, placement)
        times: list[float] = []
        for _ in range(args.iters):
            _sync(dev)
            _round(comm, x, routing, placement, times)
        _sync(dev)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(args.profile_rounds):
                _round(comm, x, routing, placement, label=True)
                _sync(dev)
        if trace is not None:
            prof.export_chrome_trace(trace)
        med = {s: round(statistics.median(times[i::4]) * 1e6, 2) for i, s in enumerate(STAGES)}
        med["round"] = round(sum(med[s] for s in STAGES), 2)
        return {"comm": name, "tokens": T, "host_median_us": med, "ops": _op_counts(prof, args.profile_rounds),
                "top_self_cpu": _top_rows(prof)}
    finally:
        comm.close()


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: every case, then rank 0 gathers the medians of all ranks and writes the JSON."""
    os.environ.update(NO_MULTICAST)
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=W, timeout=timedelta(seconds=120), device_id=dev)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // W))
        dist.init_process_group("gloo", rank=rank, world_size=W, timeout=timedelta(seconds=120))
    cases = [("torch", T) for T in args.tokens] + [("torch_fixed", T) for T in args.tokens
                                                   if T <= DECODE_MAX_T and "torch_fixed" in args.comms]
    cases = [c for c in cases if c[0] in args.comms]
    results = []
    for i, (name, T) in enumerate(cases):
        trace = None
        if rank == 0:
            base = "torch_comm_trace_rank0.json" if i == 0 else f"torch_comm_trace_rank0_{name}_t{T}.json"
            trace = os.path.join(args.out, base)
        res = _case(rank, W, dev, args, name, T, trace)
        per_rank: list = [None] * W
        dist.all_gather_object(per_rank, res["host_median_us"])
        res["host_median_us_per_rank"] = per_rank
        res["trace_file"] = os.path.basename(trace) if trace else None
        results.append(res)
        if rank == 0:
            print(f"{name:12s} T={T:5d}: " + "  ".join(f"{s} {v:.1f}" for s, v in res["host_median_us"].items())
                  + " us (rank 0)  compute ops/round " + " ".join(f"{s}={res['ops'][s]['compute']:g}" for s in STAGES)
                  + f"  launches/round {res['ops']['launches_per_round']:g}", flush=True)
    if rank == 0:
        record = {"bench": "torch_comm_profile", "command": " ".join(sys.argv), "backend": args.backend,
                  "world_size": W, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
                  "dtype": "bfloat16" if dev.type == "cuda" else "float32", "iters": args.iters,
                  "warmup": args.warmup, "profile_rounds": args.profile_rounds, "torch": torch.__version__,
                  "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "cases": results}
        with open(os.path.join(args.out, "torch_comm_profile.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {os.path.join(args.out, 'torch_comm_profile.json')}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Parse flags and spawn the ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 4096], help="tokens per rank, one case each")
    p.add_argument("--comms", nargs="+", default=["torch", "torch_fixed"], choices=["torch", "torch_fixed"])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile-rounds", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON and traces ($OUT)")
    args = p.parse_args()
    if args.experts % args.world_size:
        p.error(f"--experts ({args.experts}) must be a multiple of --world-size ({args.world_size})")
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        p.error(f"--backend nccl needs {args.world_size} CUDA devices, found {torch.cuda.device_count()}")
    os.makedirs(args.out, exist_ok=True)
    spawn_ranks(run_rank, args.world_size, None, args)


if __name__ == "__main__":
    main()
