"""Multi-rank EP MoE benchmark over torch.distributed, seed-compatible CLI.

    python bench/bench_ep_moe_multi.py --world-size 2 --backend gloo --mode both \
        --batch-size 8 --hidden-dim 256 --warmup 5 --iters 20
    python bench/bench_ep_moe_multi.py --world-size 2 --backend nccl --mode triton --comm nvlink --cuda-graph

Dimension legend: T tokens per rank (--batch-size), H hidden, E experts, k experts per token, W ranks.

Spawns --world-size processes (or runs as one rank under torchrun, which sets RANK/WORLD_SIZE).
Experts are sharded evenly over the ranks; every rank holds --batch-size tokens. Before timing,
each rank checks its EP output against the same layer run on one rank with all experts (and
`--mode both` checks the modes agree). Reported time per mode: the median over iterations of the
slowest rank's time (CUDA events on GPUs, after a barrier).

--comm (a comma list runs each in turn): torch (exact splits, a host sync), torch_decode (the torch comm's
decode mode, TorchComm(max_tokens): fixed token-row blocks, no host sync), torch_fixed (fixed
blocks, no host sync), nvlink (ours; --comm-mode decode = masked, sync-free, or prefill; auto =
decode up to 256 tokens/rank), deepep (DeepEP normal mode), deepep_ll (DeepEP low latency, masked,
sync-free). --cuda-graph times CUDA-graph replays of the whole layer for the sync-free comms
(torch_decode, torch_fixed, nvlink decode, deepep_ll) with the sync-free expert backends (triton, deepgemm,
and bmm on their masked batches); `loop` reads counts on the host and is timed eagerly under `--mode
both/all`; other combinations are refused. On CUDA the parameters are drawn on the device (same
seed -> same weights on every rank), so DeepSeek-V3 sizes start in seconds.

Every flag is checked once, in the parent, before any rank starts (a mistake: one line
`bench_ep_moe_multi.py: error: ...`, exit status 2): sizes >= 1, --world-size dividing --num-experts,
GPUs for nccl, a --master-port in 1..65535 that is free now. The ranks' first exchange is a handshake
(nanomoe_fn/comm/handshake.py): ranks started with different flags (torchrun) fail together with an
error naming the field that differs, instead of meeting in a collective of mismatched shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import (  # noqa: E402
    MODES,
    add_seed_flags,
    all_ranks_ok,
    capture_graph,
    check_seed_flags,
    measure_ceilings,
    pick_dtype,
    pick_modes,
    ranks_errors,
    release_comm,
    roofline,
    sig,
    spawn_ranks,
    time_back_to_back,
    time_events,
    write_record,
)
from bench.workload import agree, config_from_args, make_inputs, rank_floors  # noqa: E402
from nanomoe_fn import Placement, moe_layer, shard_moe_params  # noqa: E402
from nanomoe_fn.cli_util import UsageError, run_cli  # noqa: E402
from nanomoe_fn.comm.base import make_comm  # noqa: E402
from nanomoe_fn.comm.handshake import handshake  # noqa: E402
from nanomoe_fn.comm.launch import check_port, check_world_size, spawn_error_line  # noqa: E402
from nanomoe_fn.moe.params import GateParams, LinearExperts, MoEParams, SharedMLP, SwiGLUExperts  # noqa: E402
from nanomoe_fn.profiling import cuda_profiler, nvtx_range  # noqa: E402

COMMS = ("torch", "torch_decode", "torch_fixed", "nvlink", "deepep", "deepep_ll")
GPU_COMMS = ("nvlink", "deepep", "deepep_ll")
GRAPH_BACKENDS = ("triton", "deepgemm", "bmm")  # bmm only on a masked batch, which every sync-free comm gives


def comm_mode(comm: str, args: argparse.Namespace) -> str | None:
    """nvlink's mode (decode / prefill), deepep's (normal / low_latency); None for the torch comms."""
    if comm == "nvlink":
        return args.comm_mode if args.comm_mode != "auto" else ("decode" if args.batch_size <= 256 else "prefill")
    return {"deepep": "normal", "deepep_ll": "low_latency"}.get(comm)


def sync_free(comm: str, args: argparse.Namespace) -> bool:
    """Whether the comm's dispatch/combine never read device data on the host (CUDA-graph capturable)."""
    return comm in ("torch_decode", "torch_fixed", "deepep_ll") or (
        comm == "nvlink" and comm_mode(comm, args) == "decode")


def comm_options(comm: str, args: argparse.Namespace, cfg: object, placement: Placement,
                 dtype: torch.dtype) -> tuple[str, dict]:
    """(registry name, constructor options) for --comm; sized for --max-num-tokens (default --batch-size)."""
    T_max = max(1, args.max_num_tokens or args.batch_size)
    if comm == "torch":
        return "torch", {"timeout_s": args.timeout}
    if comm == "torch_decode":
        return "torch", {"max_tokens": T_max, "timeout_s": args.timeout}
    if comm == "torch_fixed":  # sized for the largest batch: can never overflow
        return "torch_fixed", {"max_tokens": T_max, "timeout_s": args.timeout}
    opts = {"max_tokens": T_max, "hidden": cfg.hidden, "top_k": cfg.top_k, "num_slots": placement.num_physical,
            "dtype": dtype, "mode": comm_mode(comm, args), "timeout_s": args.timeout}
    return ("nvlink" if comm == "nvlink" else "deepep"), opts


def device_inputs(cfg: object, args: argparse.Namespace, dtype: torch.dtype, device: torch.device,
                  rank: int) -> tuple[MoEParams, torch.Tensor]:
    """make_inputs' parameters (N(0, 1/fan_in), router float32) and tokens, drawn on the device from
    one seed (the same on every rank): DeepSeek-V3 sizes (11 G weights) in milliseconds, not minutes."""
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def normal(shape: tuple, std: float, dt: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device, dtype=dt).mul_(std)

    H, I_, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    gate = GateParams(normal((E, H), H ** -0.5, torch.float32),
                      normal((E,), 0.1, torch.float32) if cfg.correction_bias else None)
    if cfg.expert_type == "swiglu":
        experts = SwiGLUExperts(w13=normal((E, 2 * I_, H), H ** -0.5, dtype), w2=normal((E, H, I_), I_ ** -0.5, dtype))
    else:
        experts = LinearExperts(w=normal((E, H, H), H ** -0.5, dtype))
    shared = None
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * I_
        shared = SharedMLP(w13=normal((2 * S, H), H ** -0.5, dtype), w2=normal((H, S), S ** -0.5, dtype))
    x_gen = torch.Generator(device=device).manual_seed(args.seed + 1 + rank)
    x = torch.randn(args.batch_size, H, generator=x_gen, device=device, dtype=torch.float32).to(dtype)
    return MoEParams(gate=gate, experts=experts, shared=shared), x


def static_config(args: argparse.Namespace, cfg: object, dtype: torch.dtype) -> dict:
    """What every rank must agree on (compared by the handshake): the layer config, dtype, sizes, the
    comms and modes in order, and the loop counts (each iteration is a collective)."""
    return {type(cfg).__name__: cfg, "dtype": dtype, "batch_size": args.batch_size,
            "max_num_tokens": args.max_num_tokens, "tokens_per_expert": args.tokens_per_expert,
            "comm": list(args.comm), "comm_mode": args.comm_mode, "mode": args.mode, "cuda_graph": args.cuda_graph,
            "warmup": args.warmup, "iters": args.iters, "seed": args.seed, "backend": args.backend}


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
        failed = _bench(rank, world_size, args, device)
    finally:
        dist.destroy_process_group()
    if failed:
        sys.exit(1)


def _time_mode(m: str, layer: object, args: argparse.Namespace, device: torch.device, graph: bool,
               single: torch.Tensor, dtype: torch.dtype) -> tuple[list[float], bool, str]:
    """Per-iteration seconds of one mode (eager, or CUDA-graph replays, checked against `single`);
    returns (times, graphed, why capture failed)."""
    def step() -> torch.Tensor:
        with nvtx_range(f"ep_moe[{m}]"):
            return layer(m)

    fn, err = step, ""
    if graph:
        try:
            g, out = capture_graph(step, warmup=3)
            g.replay()
            torch.cuda.synchronize()
            fn = g.replay
        except Exception as e:  # noqa: BLE001 - reported; the mode is timed eagerly instead
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not all_ranks_ok(not err, device):
            err, fn = ranks_errors(err), step
            print(f"{m}: CUDA graph capture failed ({err}); timing eagerly")
        else:
            agree(out, single, dtype)  # the replayed layer computes the same answer
    with cuda_profiler(args.cuda_profiler):
        if fn is not step:  # graph replays back to back after one barrier: the steady state of a decode loop
            times = [t[0] for t in time_back_to_back(fn, None, device, args.warmup, args.iters, dist.barrier)]
        else:
            times = time_events(fn, device, args.warmup, args.iters, barrier=dist.barrier)
    return times, fn is not step, err


def _bench(rank: int, world_size: int, args: argparse.Namespace, device: torch.device) -> bool:
    """Every --comm in turn; returns True when a comm failed (recorded in the JSON's "failed")."""
    dtype = pick_dtype(args.dtype, device)
    cfg = config_from_args(args)
    # the first exchange: ranks launched with different flags fail together, naming the field (the
    # world size against --num-experts and every other flag were checked in the parent, before spawning)
    handshake(static_config(args, cfg, dtype), timeout_s=args.timeout)
    params, x = (device_inputs if device.type == "cuda" else make_inputs)(cfg, args, dtype, device, rank)
    placement = Placement.identity(cfg.num_experts, world_size).to(device)
    local = shard_moe_params(params, placement, rank)
    modes = pick_modes(args.mode, cfg, device)
    single = moe_layer(params, x, cfg, backend="bmm")  # all experts on this rank: the EP-free answer
    # this rank's share: its experts' weights and rows (the max over ranks); rows' gbps/tflops/roofline use it
    bytes_moved, flops = rank_floors(params, x, cfg, rank, world_size)
    del params  # only the local experts are needed from here on
    rows, failed = [], []
    for comm_name in args.comm:
        name, opts = comm_options(comm_name, args, cfg, placement, dtype)
        try:
            comm = make_comm(name, **opts)
        except ValueError as err:
            raise SystemExit(f"rank {rank}: --comm {comm_name}: {err}") from err
        try:
            rows += _bench_comm(comm_name, comm, modes, local, x, cfg, placement, single, dtype, device, args,
                                bytes_moved, flops)
        except SystemExit:
            raise
        except Exception as err:  # noqa: BLE001 - recorded; the next comm still runs
            traceback.print_exc()
            failed.append({"comm": comm_name, "error": f"rank {rank}: {type(err).__name__}: {err}"})
        release_comm(comm)
    # ceilings after the timed loops: the big matmul's thread pool otherwise slows small CPU work
    ceilings = measure_ceilings(device, dtype) if args.json and rank == 0 else None
    for row in rows if ceilings else []:
        row["roofline"] = sig(roofline(row["median_us"] * 1e-6, bytes_moved, flops, ceilings))
    if rank == 0 and args.json:
        write_record(args.json, "ep_moe_multi", device, world_size, ceilings, rows,
                     {"failed": failed} if failed else None)
    return bool(failed)


def _bench_comm(comm_name: str, comm: object, modes: list[str], local: MoEParams, x: torch.Tensor, cfg: object,
                placement: Placement, single: torch.Tensor, dtype: torch.dtype, device: torch.device,
                args: argparse.Namespace, bytes_moved: float, flops: float) -> list[dict]:
    def layer(m: str) -> torch.Tensor:
        return moe_layer(local, x, cfg, comm, placement, MODES[m], capacity=args.tokens_per_expert)

    for m in modes:  # each mode checked before any timing
        agree(layer(m), single, dtype)
    rows = []
    for m in modes:
        graph = args.cuda_graph and MODES[m] in GRAPH_BACKENDS
        times, graphed, graph_err = _time_mode(m, layer, args, device, graph, single, dtype)
        # the layer is as slow as its slowest rank
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        per_iter = slowest.cpu().tolist()
        med, mean = statistics.median(per_iter), statistics.fmean(per_iter)
        if dist.get_rank() == 0:
            print(f"{m}: {mean * 1e3:.3f} ms/iter (median {med * 1e3:.3f} ms)  [world_size={dist.get_world_size()}, "
                  f"backend={args.backend}, comm={comm_name}, tokens/rank={args.batch_size}"
                  f"{', CUDA graph' if graphed else ''}]")
        case = {"phase": "decode" if args.batch_size <= 256 else "prefill", "tokens": args.batch_size,
                "experts": cfg.num_experts, "top_k": cfg.top_k, "hidden": cfg.hidden,
                "intermediate": cfg.intermediate, "expert_type": cfg.expert_type,
                "dtype": str(dtype).replace("torch.", ""), "comm": comm_name, "backend": args.backend,
                "cuda_graph": graphed}
        if comm_mode(comm_name, args):
            case["comm_mode"] = comm_mode(comm_name, args)
        row = {"case": case, "variant": m, "median_us": round(med * 1e6, 2), "mean_us": round(mean * 1e6, 2),
               "gbps": sig(bytes_moved / med / 1e9), "tflops": sig(flops / med / 1e12)}
        if graph_err:
            row["graph_error"] = graph_err
        rows.append(row)
    return rows


def check_comm_flags(args: argparse.Namespace) -> None:
    """Refuse --comm / --cuda-graph combinations that cannot run, before any rank starts."""
    from nanomoe_fn.comm import COMM_BACKENDS

    args.comm = [c.strip() for c in args.comm.split(",") if c.strip()]
    bad = [c for c in args.comm if c not in COMMS]
    if bad or not args.comm:
        raise UsageError(f"--comm: unknown {bad}; choose from {list(COMMS)} (a comma list runs each)")
    for c in args.comm:
        name = "deepep" if c.startswith("deepep") else ("torch" if c == "torch_decode" else c)
        if c in GPU_COMMS and args.backend != "nccl":
            raise UsageError(f"--comm {c} needs CUDA GPUs with --backend nccl (this is --backend {args.backend})")
        masked = c in ("torch_decode", "torch_fixed", "deepep_ll") or (c == "nvlink" and comm_mode(c, args) == "decode")
        if masked and args.tokens_per_expert is not None:
            raise UsageError(f"--tokens-per-expert does not apply to --comm {c}: it delivers the masked "
                             "[E_local, W * max-num-tokens, H] layout itself")
        if args.cuda_graph and not sync_free(c, args):
            raise UsageError(f"--cuda-graph needs a sync-free comm (torch_decode, torch_fixed, nvlink in decode mode, "
                             f"deepep_ll); "
                             f"--comm {c}{' (' + str(comm_mode(c, args)) + ')' if comm_mode(c, args) else ''} "
                             "reads counts on the host")
        if name not in COMM_BACKENDS:
            raise UsageError(f"--comm {c}: the {name!r} comm backend is not registered in nanomoe_fn.comm "
                             f"(known: {sorted(COMM_BACKENDS)})")
    if args.cuda_graph and args.backend != "nccl":
        raise UsageError("--cuda-graph needs CUDA GPUs (--backend nccl)")
    if args.cuda_graph and args.mode in MODES and MODES[args.mode] not in GRAPH_BACKENDS:
        raise UsageError(f"--cuda-graph: --mode {args.mode} reads expert counts on the host and cannot be captured; "
                         f"use one of {[m for m in MODES if MODES[m] in GRAPH_BACKENDS]}, both or all")


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (the seed's plus the multi-rank ones)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_seed_flags(parser)
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to spawn (default 2; under torchrun: its WORLD_SIZE)")
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--master-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--comm", default="torch",
                        help=f"one of {list(COMMS)} or a comma list; torch: exact splits (a host sync); torch_decode "
                             "and torch_fixed: fixed-size blocks for --max-num-tokens (default --batch-size) tokens "
                             "per rank, no host sync, masked layout (no --tokens-per-expert); nvlink / deepep / "
                             "deepep_ll need GPUs")
    parser.add_argument("--comm-mode", default="auto", choices=["auto", "decode", "prefill"],
                        help="nvlink's mode; auto = decode up to 256 tokens/rank, else prefill")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time CUDA-graph replays of the whole layer (sync-free comms and expert backends)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for its peers")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse and check flags (once, here); spawn ranks (or be one under torchrun)."""
    args = build_parser().parse_args(argv)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    check_launch_flags(args, torchrun)
    if torchrun:  # launched by torchrun: this process is one rank
        run_rank(int(os.environ["RANK"]), args.world_size, args)
        return
    try:
        spawn_ranks(run_rank, args.world_size, args.master_port, args)
    except Exception as err:  # a rank failed: one line naming it (its own output is above)
        raise SystemExit(f"bench_ep_moe_multi: {spawn_error_line(err)}") from err


def check_launch_flags(args: argparse.Namespace, torchrun: bool) -> None:
    """Every flag checked once, in the parent, before any rank starts (UsageError, one line each);
    sets args.world_size (torchrun's WORLD_SIZE under torchrun, default 2)."""
    check_seed_flags(args)
    check_comm_flags(args)
    if args.device not in (None, "cuda" if args.backend == "nccl" else "cpu"):
        raise UsageError("--device: the multi-rank bench places ranks itself (cuda:<rank> for nccl, cpu for gloo)")
    if not 0 < args.timeout < float("inf"):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if torchrun:
        env_world = int(os.environ["WORLD_SIZE"])
        if args.world_size is not None and args.world_size != env_world:
            raise UsageError(f"--world-size {args.world_size} differs from torchrun's WORLD_SIZE={env_world}; "
                             "leave --world-size out under torchrun")
        if args.master_port is not None:
            raise UsageError("--master-port does not apply under torchrun (it sets the rendezvous); "
                             "use torchrun's --master-port")
        args.world_size = env_world
    elif args.world_size is None:
        args.world_size = 2
    try:
        check_world_size(args.world_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.num_experts % args.world_size:
        raise UsageError(f"--world-size ({args.world_size}) must divide --num-experts ({args.num_experts})")
    if args.backend == "nccl":
        need, have = (1 if torchrun else args.world_size), torch.cuda.device_count()
        if have < need:
            raise UsageError(f"--backend nccl needs {need} CUDA device(s), this machine has {have}; "
                             "use --backend gloo on CPU")
    if args.master_port is not None and not torchrun:
        try:
            check_port(args.master_port)
        except ValueError as err:
            raise UsageError(str(err)) from None


if __name__ == "__main__":
    run_cli(main, "bench_ep_moe_multi.py")
