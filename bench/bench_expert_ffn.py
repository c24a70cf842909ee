"""Expert-FFN kernel bench: the whole routed-expert FFN of one MoE layer on one GPU, per backend and peer.

    python bench/bench_expert_ffn.py --quick --json bench/results/expert_ffn_h200.json
    python bench/bench_expert_ffn.py --ranking --json bench/results/ranking_h200.json

Dimension legend: T tokens, k top-k, E local experts, H hidden, I intermediate.

Each case is gate/up GEMM + silu(gate) * up + down GEMM + top-k weighted sum into [T, H] (SwiGLU;
--seed-shape adds the seed's linear experts: E=256, H=2048, T=128), with routing drawn uniformly
(k distinct experts per token). The rows are sorted/aligned ahead (setup, not timed) for every variant
but `triton+align`, which also times its align step. The variants and exactly what each times:
bench/expert_ffn_variants.py (ours: loop, bmm, triton, triton+align, deepgemm; FP8: triton_fp8,
triton_fp8_tiles, triton_fp8_hilo(_tiles), deepgemm_fp8, triton_w8a16; peers: deepgemm_glue, bmm_padded,
sglang). Every variant is checked against a float32 reference on sampled tokens before timing. Floors: weight
bytes of the experts hit over the measured copy bandwidth, FLOPs over the measured bf16 matmul rate (both
measured in this run); `roofline` = floor / median. FP8 rows: 1-byte weights, the FP8 matmul rate measured
with torch._scaled_mm, and the error bound FP8_ERR_BOUND against the reference on the dequantised weights (the
activations' own error; `triton_fp8_hilo*`: 2e-2 as bf16's, and its floor counts its two MMAs per step).
--cuda-graph times the sync-free variants as CUDA graph replays (`cuda_graph` in each row). phase = decode when
rows per expert (T*k/E) <= 64, else prefill. Rows carry `speedup_vs` (the peer's median / this median)
for the peers sglang, deepgemm_glue, bmm_padded and triton that ran in the same case.

--ranking: T in 64..16384 x E in 32..256 at V3 dims with loop, bmm, triton, deepgemm (100 ms timing
windows instead of 200; `loop` skipped where it would take over ~50 ms a call), then a table of the order
and the violations of the expected one: loop slower than bmm slower than triton, and deepgemm within 5% of
triton (or faster) at T >= 1024. The ceilings are timed over the rows' window (`window_ms`): under the
H200's power cap a shorter window reads faster, kernels and ceilings alike (the ranking's 32 x 1024
`triton` read 1465 us in run 249, the 200 ms bench 1539-1572 in runs 243 and 246).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from nanomoe_kernels.fp8_quant import dequant_fp8_blocks, quant_fp8_blocks  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights, reference_rows  # noqa: E402

from bench.common import measure_ceilings, round_order, sig, time_fn, write_record  # noqa: E402
from bench.expert_ffn_variants import FP8_VARIANTS, PEERS, VARIANTS, build_variants  # noqa: E402

QUICK_TOKENS = (64, 256, 1024, 4096)
FULL_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
FULL_EXPERTS = (256, 128, 64, 32)
RANK_TOKENS = (64, 256, 1024, 4096, 16384)
RANK_EXPERTS = (32, 64, 128, 256)
RANK_VARIANTS = ("loop", "bmm", "triton", "deepgemm")
LOOP_LIMIT_MS = 50.0  # --ranking skips `loop` above this estimated time per call
# FP8 rows against the unquantised float32 reference: e4m3 activations per 128 channels cost ~4.3% on
# Gaussian inputs (x and the SwiGLU output both quantised; tests/test_fused_moe_fp8.py ACCURACY_BOUND)
FP8_ERR_BOUND = 5e-2
# variants with no host sync: --cuda-graph times them as graph replays (the decode path's real cost)
GRAPH_VARIANTS = ("triton", "triton+align", "deepgemm", "triton_fp8", "triton_fp8_tiles", "triton_fp8_hilo",
                  "triton_fp8_hilo_tiles", "deepgemm_fp8", "triton_w8a16", "sglang")


def loop_estimate_ms(T: int, E: int, k: int, H: int, I: int) -> float:
    """A rough `loop` time on an H200: FLOPs at 300 TFLOP/s plus ~64 us of launches per expert hit."""
    hit = E * (1 - (1 - 1 / E) ** (T * k))
    return 2 * T * k * 3 * H * I / 300e12 * 1e3 + hit * 0.064


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: int, graph: bool = False, settle_ms: int = 0,
            warmup_ms: int | None = None) -> float:
    """Median ms of fn: triton's do_bench on a GPU (a rep_ms window after warmup_ms of calls, default
    min(25, rep_ms / 4)), or do_bench_cudagraph (the calls replayed from one CUDA graph: no host launch cost)
    with graph; on the CPU (a dry run under the interpreter) the median of 3 wall-clock calls. settle_ms: the
    GPU idles that long first, so every window starts from the same power state (with a warm-up long enough to
    reach the power cap, ~50 ms on the H200, it then times the capped steady state whatever ran before)."""
    if device.type != "cuda":
        return statistics.median(time_fn(fn, device, 1, 3)) * 1e3
    import triton.testing

    if settle_ms:
        torch.cuda.synchronize(device)
        time.sleep(settle_ms / 1e3)
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    warm = min(25, rep_ms // 4) if warmup_ms is None else warmup_ms
    return triton.testing.do_bench(fn, warmup=warm, rep=rep_ms, return_mode="median")


def gpu_state() -> dict | None:
    """nvidia-smi's temperature (C), SM clock (MHz) and power draw (W) of GPU 0 now (None without nvidia-smi):
    read around each timing window with --gpu-stats, so a slow window can be told from a hot or capped GPU."""
    keys = ("temperature.gpu", "clocks.sm", "power.draw")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(keys)}", "--format=csv,noheader,nounits",
                              "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                             capture_output=True, text=True, timeout=10).stdout.split(",")
        return {k: float(v) for k, v in zip(("temp_c", "sm_mhz", "power_w"), out)}
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def run_case(E: int, T: int, k: int, H: int, I: int, expert_type: str, weights: tuple[torch.Tensor, ...],
             names: list[str], ceilings: dict, warm_only: bool, opts: argparse.Namespace, skipped: list[dict],
             rep_ms: int = 200, check_tokens: int = 6) -> list[dict]:
    """Rows of the JSON for one (E, T): check each variant, then time them all in opts.rounds interleaved rounds
    (time_ms each; the row's median_us is the median over rounds)."""
    dev = weights[0].device
    x = torch.randn(T, H, device=dev, dtype=weights[0].dtype)
    ids, tw = make_routing(T, E, k, str(dev), seed=T)
    case = {"phase": "decode" if T * k <= 64 * E else "prefill", "tokens": T, "experts": E, "top_k": k,
            "hidden": H, "intermediate": I if expert_type == "swiglu" else None, "expert_type": expert_type,
            "dtype": str(x.dtype).replace("torch.", "")}
    built = build_variants(x, ids, tw, weights, expert_type, names, opts.sgl_config, opts.sgl_folder)
    for name, why in built.skipped.items():
        print(f"  E={E:3d} T={T:5d} {name:13s} skipped: {why}")
        skipped.append({"variant": name, "case": case, "reason": why})
    sample = torch.linspace(0, T - 1, min(check_tokens, T), device=dev).long().unique()
    ref = None if warm_only else reference_rows(x, ids, tw, weights, expert_type, sample)
    ref8 = None  # FP8 rows: the reference on the dequantised weights (the error left is the activations')
    if not warm_only and any(n in built.fns for n in FP8_VARIANTS):
        ref8 = reference_rows(x, ids, tw, tuple(dequant_fp8_blocks(*quant_fp8_blocks(w)) for w in weights),
                              expert_type, sample)
    hit = int(torch.unique(ids).numel())
    wbytes = hit * sum(w[0].numel() for w in weights) * weights[0].element_size()
    flops = 2 * T * k * sum(w[0].numel() for w in weights)
    rows, checked = [], {}
    for name, fn in built.fns.items():
        out = fn()
        if warm_only:
            continue
        want = ref8 if name in FP8_VARIANTS else ref
        checked[name] = float((out[sample].float() - want).norm() / want.norm())
    # interleaved rounds in bench.common.round_order: under the H200's power cap a variant timed right after a
    # heavy one runs up to ~10% slower (bench/results/expert_ffn_notes.md), so no variant keeps a position or a
    # neighbour
    times: dict[str, list[float]] = {n: [] for n in checked}
    stats: dict[str, list[dict]] = {n: [] for n in checked}  # --gpu-stats: the GPU's state around each window
    graphs = {n: opts.cuda_graph and n in GRAPH_VARIANTS for n in checked}
    order = list(checked)
    for rnd in range(max(1, opts.rounds)):
        for name in round_order(order, rnd):
            before = gpu_state() if opts.gpu_stats else None
            try:
                times[name].append(time_ms(built.fns[name], dev, rep_ms, graphs[name], opts.settle_ms,
                                           opts.warmup_ms))
            except RuntimeError as e:  # a capture this variant does not support: time it eagerly
                print(f"  {name}: CUDA graph capture failed ({str(e).splitlines()[0][:100]}); timed eagerly")
                graphs[name] = False
                times[name].append(time_ms(built.fns[name], dev, rep_ms, settle_ms=opts.settle_ms,
                                           warmup_ms=opts.warmup_ms))
            if opts.gpu_stats:
                stats[name].append({"before": before, "after": gpu_state()})
    for name, err in checked.items():
        fp8, ms, graph = name in FP8_VARIANTS, statistics.median(times[name]), graphs[name]
        sec = ms * 1e-3
        # FP8 rows: 1-byte weights (+ a float32 scale per 128 x 128 block), FLOPs at the measured FP8 rate
        # (2x bf16's when none was measured); their error is the scheme's own (activations quantised)
        nbytes = wbytes * (1 + 4 / 128 ** 2) / weights[0].element_size() if fp8 else wbytes
        fp8_mma = fp8 and name != "triton_w8a16"  # W8A16 multiplies in bf16
        rate = (ceilings.get("fp8_tflops") or 2 * ceilings["bf16_tflops"]) if fp8_mma else ceilings["bf16_tflops"]
        hilo = name.startswith("triton_fp8_hilo")
        mma_flops = flops * (2 if hilo else 1)  # two MMAs per step (hi and lo)
        floor = max(nbytes / (ceilings["hbm_gbps"] * 1e9), mma_flops / (rate * 1e12))
        r = {"case": case, "variant": name, "median_us": round(ms * 1e3, 1), "gbps": round(nbytes / sec / 1e9, 1),
             "tflops": round(flops / sec / 1e12, 2), "roofline": round(floor / sec, 3),
             "floor_us": round(floor * 1e6, 1), "check_rel_err": round(err, 5),
             "ok": err < (FP8_ERR_BOUND if fp8_mma and not hilo else 2e-2), "cuda_graph": graph}
        if len(times[name]) > 1:
            r["rounds_us"] = [round(t * 1e3, 1) for t in times[name]]
        if name in built.configs:
            r["config"] = built.configs[name]
        if stats[name]:
            r["window_gpu_state"] = stats[name]
        rows.append(r)
        print(f"  E={E:3d} T={T:5d} {name:13s} {r['median_us']:9.1f} us  {r['tflops']:7.1f} TFLOP/s "
              f"{r['gbps']:7.1f} GB/s  roofline {r['roofline']:.3f}  err {err:.1e}"
              f"{'' if r['ok'] else ' BAD'}")
    for r in rows:
        vs = {o["variant"]: sig(o["median_us"] / r["median_us"], 3) for o in rows
              if o["variant"] in PEERS and o is not r}
        if vs:
            r["speedup_vs"] = vs
    return rows


def ranking_table(rows: list[dict]) -> list[dict]:
    """Per (E, T): the variants fastest first and the violations of loop > bmm > triton (slowest first) and
    of deepgemm <= 1.05 x triton at T >= 1024; printed as a table."""
    by_case: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        by_case.setdefault((r["case"]["experts"], r["case"]["tokens"]), {})[r["variant"]] = r["median_us"]
    print(f"\nranking (median us; expected loop > bmm > triton, deepgemm <= 1.05 x triton at T >= 1024)\n"
          f"{'E':>4} {'T':>6} " + " ".join(f"{v:>10}" for v in RANK_VARIANTS) + "  order (fastest first) / flags")
    table = []
    for (E, T), us in sorted(by_case.items()):
        flags = []
        for slow, fast in (("loop", "bmm"), ("bmm", "triton")):
            if slow in us and fast in us and us[fast] >= us[slow]:
                flags.append(f"{fast} not faster than {slow}")
        if T >= 1024 and "deepgemm" in us and "triton" in us and us["deepgemm"] > 1.05 * us["triton"]:
            flags.append(f"deepgemm {us['deepgemm'] / us['triton']:.2f}x triton")
        order = sorted(us, key=us.get)
        table.append({"experts": E, "tokens": T, "us": us, "order": order, "violations": flags})
        cells = " ".join(f"{us[v]:10.1f}" if v in us else f"{'-':>10}" for v in RANK_VARIANTS)
        print(f"{E:4d} {T:6d} {cells}  {' < '.join(order)}" + (f"  VIOLATES: {'; '.join(flags)}" if flags else ""))
    return table


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with .names the checked variant list (argparse error on an unknown one)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="E=32, T in 64/256/1024/4096 (the issue's sizes)")
    p.add_argument("--ranking", action="store_true",
                   help="T 64..16384 x E 32..256 with loop,bmm,triton,deepgemm and the ranking table")
    p.add_argument("--experts", type=int, nargs="*", default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--variants", default=None, help=f"comma-separated, of {','.join(VARIANTS)} (default: all; "
                                                    f"--ranking: {','.join(RANK_VARIANTS)})")
    p.add_argument("--sgl-config", default="tuned",
                   help="SGLang peer tile: tuned (by rows per expert), default (SGLang's fallback) or a JSON dict")
    p.add_argument("--sgl-folder", default=None, help="where sglang 0.5.23's kernel files are (default: .peers/sgl)")
    p.add_argument("--seed-shape", action="store_true",
                   help="also the seed's linear experts (E=256, H=2048, T=128)")
    p.add_argument("--warm-only", action="store_true", help="run each variant once (JIT warm-up), no timing")
    p.add_argument("--cuda-graph", action="store_true",
                   help=f"time {', '.join(GRAPH_VARIANTS)} as CUDA graph replays (no host launch cost)")
    p.add_argument("--gpu-stats", action="store_true",
                   help="record nvidia-smi's temperature, SM clock and power around each timing window")
    p.add_argument("--settle-ms", type=int, default=0,
                   help="idle the GPU this long before each timing window (0: back to back)")
    p.add_argument("--warmup-ms", type=int, default=None,
                   help="calls before each timing window, in ms (default min(25, window / 4))")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds per case, median over them (default 3 with --ranking, else 1)")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run under TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    names = (args.variants or ",".join(RANK_VARIANTS if args.ranking else VARIANTS)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    args.names = names
    if args.rounds is None:
        args.rounds = 3 if args.ranking else 1
    return args


def _write(args: argparse.Namespace, dev: torch.device, ceilings: dict, rows: list[dict],
           skipped: list[dict], window_ms: int) -> None:
    """The JSON record of the rows so far (with --ranking, their order table too); nothing without --json."""
    if not args.json or args.warm_only:
        return
    extra: dict = {"skipped": skipped, "window_ms": window_ms}
    if args.ranking and rows:
        extra["ranking"] = ranking_table(rows)
    write_record(args.json, "expert_ffn", dev, 1, ceilings, rows, extra)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the bench; returns the JSON rows."""
    args = parse(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_expert_ffn needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    experts = args.experts or (RANK_EXPERTS if args.ranking else (32,) if args.quick else FULL_EXPERTS)
    tokens = args.tokens or (RANK_TOKENS if args.ranking else QUICK_TOKENS if args.quick else FULL_TOKENS)
    rep_ms = 100 if args.ranking else 200  # each timing window (`window_ms`); the ceilings are timed over the same
    ceilings = {} if args.warm_only else measure_ceilings(dev, dtype, rep_ms=rep_ms)
    print(f"ceilings: {ceilings}")
    rows, skipped = [], []
    k, H, I = args.top_k, args.hidden, args.intermediate
    torch.manual_seed(0)
    for E in experts:
        weights = make_weights(E, H, I, "swiglu", dtype, args.device)
        for T in tokens:
            names = list(args.names)
            if args.ranking and "loop" in names and loop_estimate_ms(T, E, k, H, I) > LOOP_LIMIT_MS:
                names.remove("loop")
                why = f"estimated {loop_estimate_ms(T, E, k, H, I):.0f} ms a call > {LOOP_LIMIT_MS:.0f} ms"
                print(f"  E={E:3d} T={T:5d} loop          skipped: {why}")
                skipped.append({"variant": "loop", "case": {"tokens": T, "experts": E}, "reason": why})
            rows += run_case(E, T, k, H, I, "swiglu", weights, names, ceilings, args.warm_only, args, skipped,
                             rep_ms=rep_ms)
            _write(args, dev, ceilings, rows, skipped, rep_ms)  # after every case: a cut run keeps its rows
        del weights
    if args.seed_shape:
        weights = make_weights(256, 2048, 0, "linear", dtype, args.device)
        rows += run_case(256, 128, 8, 2048, 0, "linear", weights, args.names, ceilings, args.warm_only, args,
                         skipped)
    _write(args, dev, ceilings, rows, skipped, rep_ms)
    print(f"\n{'E':>4} {'T':>6} {'variant':14s} {'us':>9} {'roofline':>8}")
    for r in rows:
        c = r["case"]
        print(f"{c['experts']:4d} {c['tokens']:6d} {r['variant']:14s} {r['median_us']:9.1f} "
              f"{r['roofline']:8.3f}")
    return rows


if __name__ == "__main__":
    main()
