"""Single-device EP MoE benchmark, seed-compatible CLI.

    python bench/bench_ep_moe.py --batch-size 8 --hidden-dim 256 --warmup 5 --iters 20

Times one MoE layer (route, dispatch, experts, combine) per mode and prints ms/iter. `--mode both`
checks that the modes agree (and match reference/ on the first tokens) before timing.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    MODES,
    add_seed_flags,
    check_seed_flags,
    measure_ceilings,
    pick_device,
    pick_dtype,
    pick_modes,
    roofline,
    sig,
    time_fn,
    write_record,
)
from bench.workload import agree, check_against_reference, config_from_args, floors, make_inputs  # noqa: E402
from nanomoe_fn import LocalComm, Placement, moe_layer  # noqa: E402
from nanomoe_fn.cli_util import OneLineParser, UsageError, run_cli  # noqa: E402
from nanomoe_fn.moe.experts import capturable_backends  # noqa: E402
from nanomoe_fn.profiling import cuda_profiler, nvtx_range  # noqa: E402

# backends whose layer has no host sync, so the whole layer can be captured in a CUDA graph
GRAPHABLE = tuple(capturable_backends())


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
    """Capture fn() (one MoE layer) in a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def check_capturable(modes: list[str], device: torch.device) -> None:
    """--cuda-graph needs at least one mode whose backend has no host sync (UsageError, one line); off CUDA the
    message says so too, so that following its advice does not meet a second refusal."""
    if not any(MODES[m] in GRAPHABLE for m in modes):
        fix = (f"use --mode {' / '.join(m for m in MODES if MODES[m] in GRAPHABLE)} or all" if device.type == "cuda"
               else f"and this run is on {device}: --cuda-graph needs a CUDA device, leave it out on the CPU")
        raise UsageError(f"--cuda-graph: none of the modes {modes} can be captured (they read counts on the host); "
                         + fix)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the bench; returns the JSON rows."""
    parser = OneLineParser(prog="bench_ep_moe.py", description=__doc__.split("\n\n")[0])
    add_seed_flags(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time sync-free backends (triton, deepgemm) as CUDA-graph replays of the whole layer")
    args = parser.parse_args(argv)
    check_seed_flags(args)
    device = pick_device(args.device)  # first: off CUDA no --mode can be captured, whatever --mode says
    if args.cuda_graph and args.mode != "all":  # known from the flags alone
        check_capturable(["loop", "batched_gemm"] if args.mode == "both" else [args.mode], device)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device (this run is on {device}); leave it out on the CPU")
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    cfg = config_from_args(args)
    modes = pick_modes(args.mode, cfg, device)
    if args.cuda_graph:
        check_capturable(modes, device)
    params, x = make_inputs(cfg, args, dtype, device)
    comm, placement = LocalComm(), Placement.identity(cfg.num_experts, 1).to(device)

    def layer(m: str) -> torch.Tensor:
        return moe_layer(params, x, cfg, comm, placement, MODES[m], capacity=args.tokens_per_expert)

    outs = {m: layer(m) for m in modes}
    err_ref = check_against_reference(outs[modes[0]], params, x, cfg)
    for m in modes[1:]:
        agree(outs[m], outs[modes[0]], dtype)

    bytes_moved, flops = floors(params, x, cfg)
    print(f"device={device} dtype={str(dtype).replace('torch.', '')} tokens={args.batch_size} "
          f"hidden={cfg.hidden} experts={cfg.num_experts} top_k={cfg.top_k} expert_type={cfg.expert_type} "
          f"ref_err={err_ref:.2e}")
    rows = []
    for m in modes:
        def step(m: str = m) -> torch.Tensor:
            with nvtx_range(f"moe_layer[{m}]"):
                return layer(m)

        use_graph = args.cuda_graph and device.type == "cuda" and MODES[m] in GRAPHABLE
        if args.cuda_graph and not use_graph:
            print(f"{m}: timed eagerly (reads counts on the host, cannot be captured in a CUDA graph)")
        if use_graph:
            try:
                step = graphed(step)  # noqa: F811 - the replay of the same layer
            except RuntimeError as err:  # report and time it eagerly rather than lose the run
                print(f"{m}: CUDA graph capture failed ({str(err).splitlines()[0]}); timing eagerly")
                use_graph = False
        with cuda_profiler(args.cuda_profiler):
            times = time_fn(step, device, args.warmup, args.iters)
        med, mean = statistics.median(times), statistics.fmean(times)
        print(f"{m}: {mean * 1e3:.3f} ms/iter (median {med * 1e3:.3f} ms){'  [CUDA graph]' if use_graph else ''}")
        row = {"case": {"phase": "decode" if args.batch_size <= 256 else "prefill", "tokens": args.batch_size,
                        "experts": cfg.num_experts, "top_k": cfg.top_k, "hidden": cfg.hidden,
                        "expert_type": cfg.expert_type, "dtype": str(dtype).replace("torch.", ""),
                        "cuda_graph": use_graph},
               "variant": m, "median_us": round(med * 1e6, 2), "mean_us": round(mean * 1e6, 2),
               "gbps": sig(bytes_moved / med / 1e9), "tflops": sig(flops / med / 1e12)}
        rows.append(row)
    # ceilings after the timed loops: the big matmul's thread pool otherwise slows small CPU work
    ceilings = measure_ceilings(device, dtype) if args.json else None
    for row in rows if ceilings else []:
        row["roofline"] = sig(roofline(row["median_us"] * 1e-6, bytes_moved, flops, ceilings))
    if len(rows) > 1:
        base = rows[0]["median_us"]
        for row in rows[1:]:
            row["speedup_vs"] = {rows[0]["variant"]: round(base / row["median_us"], 3)}
    if args.json:
        write_record(args.json, "ep_moe", device, 1, ceilings, rows)
    return rows


if __name__ == "__main__":
    run_cli(main, "bench_ep_moe.py")
