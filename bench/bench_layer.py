"""One MoE layer (with its shared expert), or with --layer decoder the whole DeepSeek-V3 decoder layer (MLA +
MoE; bench/layer_cases.py), under every schedule of the pipeline transform, per comm.

    python bench/bench_layer.py --world-size 2 --backend nccl --comms torch,nvlink --json $OUT/layer.json
    python bench/bench_layer.py --layer decoder --comms nvlink --decode-tokens 32,128 --context 4096
    python bench/bench_layer.py --quick        # 2 gloo ranks, small sizes (what the CPU test runs)

Dimension legend: T tokens per rank, H hidden, I expert intermediate, E experts, k experts per token, W ranks.

Sizes: DeepSeek-V3 (H 7168, I 2048, E 256 sharded over the ranks, top-8 in 8 groups of which 4, one shared
expert, bf16), decode at --decode-tokens and prefill at --prefill-tokens per rank; they need one GPU per rank
(--backend nccl, the default): every rank draws all 256 experts before keeping its shard, ~23 GB in bf16,
~45 GB per rank in float32 on the CPU (--backend gloo without --quick; refused where the host has less).
On a CPU use --quick: H 64, I 32, E 16, top-4, float32, a few tokens, gloo. Every flag is checked before any
rank starts (bench/layer_cases.py: check_layer_flags; one line, exit status 2).

Schedules (nanomoe_fn/pipeline): sequential, shared_overlap (the shared expert inside dispatch's window), tbo
(two-batch overlap), tbo+shared; --compile adds each
under torch.compile (graph breaks allowed: the comms are not traced), --fullgraph each compiled as one graph
with the comm behind custom ops (OpComm: the decode-mode comms' fixed batches, and the prefill batches sized by
the routing with the triton experts; the decoder layer at decode only: MLA's kernels are custom ops too), --cuda-graph
each replayed as a CUDA graph where the comm is sync-free (torch_fixed, torch_decode, nvlink at decode sizes,
deepep_ll). Before timing, every schedule's output is compared with sequential's on the same tokens (a
mismatch fails the row, nothing is timed).

Per row (of the record bench/common.py's write_record describes, bench "layer"): median_us (CUDA events around each
call after a barrier; the slowest rank's median), b2b_us (back to back, GPUs), speedup_vs.sequential; TBO rows carry
ideal_us and share_of_ideal, shared-overlap rows shared_hidden. Stage times: each stage of the sequential plan timed
alone with events around it (stage_us, at T and at T/2); ideal TBO time = 2 * max(compute, comm) of the T/2 stages
(the first micro-batch of the program's split) + the split's own cost (one concat of the outputs), compute = every
compute stage (MoE: route, experts, shared, add; decoder: also the norms, MLA and residuals), comm = the four exchange
halves; share_of_ideal = (sequential / tbo) / (sequential / ideal). shared_hidden = (sequential - shared_overlap) /
the shared stage's time (shared_us). +graph rows use GPU-only stage times instead (bench/layer_stages.py: each compute
stage captured alone, the exchanges = the whole sequential graph minus them), for their ideal and shared_hidden, and
carry stage_half_us. shared_stream runs the shared experts on their own stream from the layer's start (_after_route,
_after_send: launched after that stage instead); the overlapped schedules run their exchanges on exchange streams
(nanomoe_fn/pipeline/streams.py). --schedules picks a subset (sequential always runs). --profile DIR writes one
torch.profiler trace per comm and schedule of the first case (rank 0), with NVTX ranges per stage.
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

from bench.bench_ep_moe_multi import COMMS, GPU_COMMS, comm_options, device_inputs  # noqa: E402
from bench.common import (  # noqa: E402
    all_ranks_ok,
    capture_graph,
    release_comm,
    sig,
    slowest,
    spawn_ranks,
    time_back_to_back,
    time_events,
    write_record,
)
from bench.layer_cases import (  # noqa: E402
    LAYERS,
    SCHEDULES,
    check_layer_flags,
    cpu_bytes_per_rank,
    decoder_case,
    decoder_inputs,
    moe_case,
    v3_config,
)
from bench.layer_stages import annotate_rows, eager_stage_times, graph_stage_times, profile  # noqa: E402
from nanomoe_fn import MoEConfig, Placement, shard_moe_params  # noqa: E402
from nanomoe_fn.cli_util import OneLineParser, run_cli  # noqa: E402
from nanomoe_fn.comm.base import make_comm  # noqa: E402
from nanomoe_fn.comm.launch import spawn_error_line  # noqa: E402
from nanomoe_fn.comm.ops import OpComm, masked_rows, sends_fp8  # noqa: E402
from nanomoe_fn.pipeline import Plan  # noqa: E402


def sync_free(comm: str, T: int) -> bool:
    """Whether the comm never reads device data on the host at this size (a CUDA graph can hold the layer)."""
    return comm in ("torch_fixed", "torch_decode", "deepep_ll") or (comm == "nvlink" and T <= 256)
TWO_INSTANCES = ("nvlink", "deepep")  # one dispatch in flight per instance: one per micro-batch
# deepep_ll: one instance per process, which micro-batches cannot share (DeepEPComm.shares_micro_batches)


def one_case(comm_name: str, phase: str, T: int, cfg: MoEConfig, args: argparse.Namespace, rank: int, W: int,
             device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
    """Every schedule of one (comm, phase, T): checked against sequential, then timed -> (rows, failures)."""
    case = {"phase": phase, "tokens": T, "experts": cfg.num_experts, "top_k": cfg.top_k, "hidden": cfg.hidden,
            "intermediate": cfg.intermediate, "comm": comm_name, "world_size": W}
    ns = argparse.Namespace(batch_size=T, max_num_tokens=T, comm_mode="auto", timeout=args.timeout, seed=args.seed)
    params, x = device_inputs(cfg, ns, dtype, device, rank)
    placement = Placement.identity(cfg.num_experts, W).to(device)
    local = shard_moe_params(params, placement, rank)
    rows, failed, comms = [], [], []
    barrier = (lambda: dist.barrier()) if W > 1 else None
    try:
        name, opts = comm_options(comm_name, ns, cfg, placement, dtype)
        comms = [make_comm(name, **opts) for _ in range(2 if comm_name in TWO_INSTANCES else 1)]
        if args.layer == "moe":
            lc = moe_case(cfg, local, x, comms, placement, args.expert_backend)
        else:
            inputs = decoder_inputs(args.mla, phase, T, args.context, args.prefill_len, device, dtype,
                                    args.seed + 1 + rank)
            lc = decoder_case(args.mla, cfg, local, comms, placement, args.expert_backend, args.attn_backend, inputs,
                              args.seed)
            case = {**case, "layer": "decoder", **lc.info}
        plans = {s: make(lc.program) for s, make in SCHEDULES.items() if s in args.schedules}
        if len(comms) == 1 and not getattr(comms[0], "shares_micro_batches", True):  # the layer refuses these
            for s in [s for s, p in plans.items() if p.micro_batches > 1]:
                args.skipped.append({"case": case, "variant": s, "why": f"{comm_name}: micro-batches cannot share "
                                     f"its one instance (shares_micro_batches), and one is all it allows"})
                del plans[s]

        def call(plan: Plan, inputs: dict = lc.inputs) -> torch.Tensor:
            return lc.call(plan, inputs)

        variants = {s: (lambda p=p: call(p)) for s, p in plans.items()}
        if args.compile or args.fullgraph:  # one code object per kind, one compile per plan: a fresh cache per case
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(plans))
        if args.compile:
            for s, p in plans.items():
                variants[s + "+compile"] = torch.compile(lambda p=p: call(p))
        if args.fullgraph and lc.layer == "decoder" and phase == "prefill":
            args.skipped.append({"case": case, "variant": "+fullgraph", "why": "mla's prefill path reads the "
                                 "longest context on the host (attention/mla.py): a graph break"})
        elif args.fullgraph and any(sends_fp8(c) for c in comms):
            args.skipped.append({"case": case, "variant": "+fullgraph", "why": "FP8 dispatch: its rows and scales "
                                 "do not pass through OpComm"})
        elif args.fullgraph and args.expert_backend != "triton" and any(masked_rows(c) is None for c in comms):
            args.skipped.append({"case": case, "variant": "+fullgraph", "why": f"a batch sized by the routing "
                                 f"traces with the triton experts only ({args.expert_backend!r} reads its counts)"})
        elif args.fullgraph:  # one graph: comms as custom ops (comm/ops.py)
            ops = [OpComm(c, placement) for c in comms]
            one = (moe_case(cfg, local, x, ops, placement, args.expert_backend) if lc.layer == "moe" else
                   decoder_case(args.mla, cfg, local, ops, placement, args.expert_backend, args.attn_backend,
                                lc.inputs, args.seed))
            for s, p in plans.items():
                variants[s + "+fullgraph"] = torch.compile(lambda p=p: one.call(p, one.inputs), fullgraph=True,
                                                           dynamic=False)
        graphs = args.cuda_graph and device.type == "cuda" and sync_free(comm_name, T)
        if graphs:
            for s, p in plans.items():
                graph, static_out = capture_graph(lambda p=p: call(p))
                variants[s + "+graph"] = lambda g=graph, o=static_out: (g.replay(), o)[1]
        want = call(plans["sequential"])
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        bad = {}
        for v, fn in variants.items():
            err = float((fn().float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
            if err > tol:
                bad[v] = f"differs from sequential: relative error {err:.3g} > {tol:g}"
        if not all_ranks_ok(not bad, device):
            return [], [{"case": case, "variant": v, "error": e} for v, e in bad.items()] or [
                {"case": case, "variant": "any", "error": "another rank's schedules differ from sequential"}]
        med = {}
        for v, fn in variants.items():
            t = slowest([statistics.median(time_events(fn, device, args.warmup, args.iters, barrier))], device)[0]
            med[v] = t
            row = {"case": case, "variant": v, "median_us": sig(t * 1e6)}
            if device.type == "cuda":
                b2b = time_back_to_back(fn, None, device, args.warmup, args.iters, barrier)
                row["b2b_us"] = sig(slowest([statistics.median(a + b for a, b in b2b)], device)[0] * 1e6)
            rows.append(row)
        halves, compute = (("T", lc.inputs), ("T/2", lc.half())), lc.compute_stages()
        alone = {label: eager_stage_times(plans["sequential"], call, inputs, device, args.warmup, args.iters, barrier)
                 for label, inputs in halves}
        half = alone["T/2"]
        comm_t = sum(v for k, v in half.items() if k not in compute)
        compute_t = sum(v for k, v in half.items() if k in compute)
        flat = want.reshape(-1, want.shape[-1])
        split_t = statistics.median(time_events(lambda: torch.cat([flat[: T // 2], flat[T // 2:]]), device,
                                                args.warmup, args.iters))
        ideal = {"": 2 * max(comm_t, compute_t) + split_t}
        if graphs:  # GPU-only stage times for the graph rows (layer_stages.py)
            seq = plans["sequential"]
            gt = {label: graph_stage_times(seq, lc.stage_params, inputs, lc.stage_ctx,
                                           lambda inputs=inputs: call(seq, inputs), device, args.warmup,
                                           args.iters, barrier)
                  for label, inputs in halves}
            g_half = gt["T/2"]
            ideal["+graph"] = 2 * max(g_half["exchanges"], sum(g_half[k] for k in compute)) + split_t
        annotate_rows(rows, med, alone, gt if graphs else None, ideal)
        if args.profile and not args.profiled:  # the first case of each comm; every rank runs the calls
            tag = ("decoder_" if lc.layer == "decoder" else "") + f"{comm_name}_{phase}_t{T}"
            profile(variants, args.profile, tag, trace=rank == 0)
            args.profiled = True
        return rows, failed
    except Exception as err:  # noqa: BLE001 - a comm that cannot run here is a failed row, not a crash
        traceback.print_exc()
        return rows, [{"case": case, "variant": "setup", "error": f"{type(err).__name__}: {err}"}]
    finally:
        for c in comms:
            release_comm(c)


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: every comm, phase and size; rank 0 prints and writes the JSON; exit 1 if a row failed."""
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device, dtype = torch.device("cuda", rank), torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    dist.init_process_group(args.backend, rank=rank, world_size=W, timeout=timedelta(seconds=args.timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    cfg = v3_config(args.quick)
    rows, failed = [], []
    args.skipped = []  # schedules a comm cannot run, with why
    try:
        for comm, phases in args.comms:
            args.profiled = False
            for phase, sizes in (("decode", args.decode_tokens), ("prefill", args.prefill_tokens)):
                for T in sizes if phase in phases else ():
                    r, f = one_case(comm, phase, T, cfg, args, rank, W, device, dtype)
                    rows += r
                    failed += f
                    if rank == 0:
                        for row in r:
                            print(f"{comm:10s} {phase:7s} T={T:6d} {row['variant']:24s} {row['median_us']:10.1f} us "
                                  f"x{row['speedup_vs']['sequential']:.3f}"
                                  + (f" share_of_ideal {row['share_of_ideal']}" if "share_of_ideal" in row else "")
                                  + (f" shared_hidden {row['shared_hidden']}" if "shared_hidden" in row else ""))
                        for x in f:
                            print(f"FAILED {comm} {phase} T={T} {x['variant']}: {x['error']}")
        if rank == 0 and args.json:
            write_record(args.json, "layer", device, W, {}, rows, {"failed": failed, "skipped": args.skipped})
    finally:
        dist.destroy_process_group()
    if failed:
        sys.exit(1)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of token counts, got {text!r}") from None
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"token counts per rank must be >= 1, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags (one-line errors: OneLineParser)."""
    p = OneLineParser(prog="bench_layer.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="ranks to spawn (must divide the experts: 256, 16 with "
                   "--quick)")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"],
                   help="nccl: one GPU per rank (default); gloo: CPU ranks, with --quick (the DeepSeek-V3 sizes need "
                        f"~{round(cpu_bytes_per_rank(v3_config(False)) / 1e9)} GB per rank in float32)")
    p.add_argument("--comms", default="torch",
                   help=f"comma list of comm backends ({', '.join(COMMS)}; {', '.join(GPU_COMMS)} need --backend "
                        "nccl), each optionally limited to one phase: torch_decode:decode,torch:prefill")
    p.add_argument("--decode-tokens", type=_sizes, default=[32, 64, 128, 256], help="comma list of tokens per rank")
    p.add_argument("--prefill-tokens", type=_sizes, default=[4096, 16384],
                   help="comma list of tokens per rank ('' for none)")
    p.add_argument("--expert-backend", default="triton", help="loop, bmm, triton or deepgemm (triton and deepgemm "
                   "need CUDA; --quick turns triton into bmm)")
    p.add_argument("--layer", default="moe", choices=LAYERS,
                   help="moe: the MoE layer alone; decoder: the whole decoder layer (MLA + MoE, bench/layer_cases.py)")
    p.add_argument("--context", type=int, default=4096, help="decoder decode: cache rows each sequence attends to")
    p.add_argument("--prefill-len", type=int, default=4096, help="decoder prefill: new tokens per sequence (each "
                   "--prefill-tokens count must be a multiple, or smaller)")
    p.add_argument("--attn-backend", default="triton", help="decoder: MLA backend (torch, triton; triton needs CUDA, "
                   "--quick turns it into torch)")
    p.add_argument("--schedules", default=",".join(SCHEDULES),
                   help=f"comma list of schedules to run (sequential is always run: the others are checked and "
                        f"compared against it); default all of {list(SCHEDULES)}")
    p.add_argument("--compile", action="store_true", help="also each schedule under torch.compile")
    p.add_argument("--fullgraph", action="store_true",
                   help="also each schedule compiled as one graph (fullgraph=True), the comm behind custom ops "
                        "(nanomoe_fn/comm/ops.py)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also each schedule replayed as a CUDA graph, for the sync-free comms (torch_fixed, nvlink "
                        "decode, deepep_ll); needs --backend nccl")
    p.add_argument("--profile", default=None, help="folder for torch.profiler traces of the first case per comm")
    p.add_argument("--quick", action="store_true", help="2 gloo ranks, small sizes, float32 (the CPU test)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for its peers (> 0)")
    p.add_argument("--json", default=None, help="write the rows to this path, as the record bench/common.py's "
                   "write_record describes (bench 'layer')")
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse and check every flag (here, once), then spawn --world-size ranks."""
    args = build_parser().parse_args(argv)
    check_layer_flags(args)
    try:
        spawn_ranks(run_rank, args.world_size, None, args)
    except Exception as err:  # a rank failed: one line naming it (its own output, FAILED rows included, is above)
        raise SystemExit(f"bench_layer.py: {spawn_error_line(err)}") from err


if __name__ == "__main__":
    run_cli(main, "bench_layer.py")
