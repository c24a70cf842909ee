"""Benchmark MLA attention: absorbed decode over the compressed cache, and the expanded causal prefill.

Dimension legend: B batch (sequences), L context per sequence, N heads, C latent (512), Dr rope (64),
Dc = C + Dr (576) cache row, S prefill tokens, Dqk = 192, Dv = 128.

Decode moves B * L * Dc * 2 bytes of cache and does 2 * B * N * L * (Dc + C) FLOPs; prefill (causal,
batch 1) does 2 * N * (Dqk + Dv) * S * (S + 1) / 2 FLOPs. The floor is the larger of bytes over the
measured copy bandwidth and FLOPs over the measured bf16 matmul rate, both measured in the same run;
`roofline` = floor / median. Variants: triton (paged cache, page 64), triton_contiguous, torch (the
library's torch backend, contiguous cache), and with --tune triton_best (best tuning and split count
found for that shape; decode only on the ANCHORS shapes). Decode rows time CUDA-graph replays (as
serving launches decode); prefill rows eager calls. Usage: python bench/bench_mla.py [--quick] [--tune]
[--json PATH]; on the GPU machine bench/gpu/mla_gpu.sh runs the GPU tests and then this with --tune.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_kernels.mla_decode import DecodeTuning, default_splits, default_tuning, mla_decode  # noqa: E402
from nanomoe_kernels.mla_prefill import mla_prefill  # noqa: E402

from bench.common import device_name, versions  # noqa: E402
from nanomoe_fn.attention.backends import torch_decode, torch_prefill  # noqa: E402
from nanomoe_fn.attention.cache import ContiguousCache  # noqa: E402
from nanomoe_fn.attention.config import MLAConfig  # noqa: E402

C, DR, DC, DN, DV, PAGE = 512, 64, 576, 128, 128, 64
# (heads, batch, context) -> (SGLang Triton MLA decode us, plain torch us), from ../shared/ANCHORS.md
ANCHORS = {(128, 32, 16384): (2069, 946), (128, 128, 4096): (2400, 984), (128, 64, 32768): (8673, 3729),
           (16, 32, 16384): (333, 379), (16, 128, 16384): (1255, 1415), (16, 64, 32768): (1247, 1418)}
DT = DecodeTuning
DECODE_TUNINGS = {128: [DT(128, 32, 2, 8, 2), DT(128, 32, 2, 8, 2, tma=True), DT(128, 32, 2, 8, 3),
                        DT(128, 32, 2, 8, 3, tma=True), DT(64, 64, 1, 8, 2)],
                  16: [DT(16, 32, 1, 4, 3, ctas_per_sm=2), DT(16, 32, 1, 4, 4, ctas_per_sm=2),
                       DT(16, 64, 1, 8, 2, ctas_per_sm=2), DT(16, 128, 1, 8, 2),
                       DT(64, 32, 1, 8, 2, tma=True)]}
PREFILL_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]   # first = the default
SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # CPU smoke runs of the triton paths


def bench_us(fn: Callable[[], object], rep_ms: int) -> float:
    """Median microseconds of fn: CUDA events via do_bench (L2 flushed before each call), else wall clock."""
    if torch.cuda.is_available():
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")
        return ms * 1e3
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def graph_us(fn: Callable[[], object], rep_ms: int) -> float:
    """Median microseconds of one CUDA-graph replay of fn (decode is launched from graphs in serving;
    this keeps Python launch overhead out of small shapes). Plain timing off the GPU."""
    if not torch.cuda.is_available():
        return bench_us(fn, rep_ms)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()                                     # compile and warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    us = bench_us(graph.replay, rep_ms)
    del graph
    torch.cuda.empty_cache()
    return us


def ceilings(dev: str, rep_ms: int) -> dict:
    """Copy bandwidth (bytes read + written) and dense bf16 matmul rate, measured now on random data."""
    n, m = (1 << 30, 8192) if dev == "cuda" else (1 << 24, 1024)
    src = torch.randn(n // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = bench_us(lambda: dst.copy_(src), rep_ms)
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    t_mm = bench_us(lambda: a @ b, rep_ms)
    return {"hbm_gbps": round(2 * n / t_copy / 1e3, 1), "bf16_tflops": round(2 * m ** 3 / t_mm / 1e6, 1)}


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error of out against want in float32; inf when out holds a non-finite value."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - want.float()).norm() / want.float().norm())


def row(case: dict, variant: str, us: float, nbytes: float, flops: float, ceil: dict, **extra: object) -> dict:
    """One JSON row: rates and roofline (floor / us, floor from ceil), then the extra keys."""
    floor = max(nbytes / (ceil["hbm_gbps"] * 1e3), flops / (ceil["bf16_tflops"] * 1e6))
    out = {"case": case, "variant": variant, "median_us": round(us, 2),
           "gbps": round(nbytes / us / 1e3, 1), "tflops": round(flops / us / 1e6, 1),
           "roofline": round(floor / us, 3)}
    out.update(extra)
    return out


def decode_case(heads: int, batch: int, ctx: int, args: argparse.Namespace, ceil: dict, dev: str,
                sweep: list) -> list[dict]:
    """Rows of one decode shape: torch, triton (paged, contiguous), triton_best with --tune (trials go to sweep)."""
    g = torch.Generator(device=dev).manual_seed(batch * 7 + heads)
    dtype = torch.bfloat16
    kv = torch.randn(batch, ctx, DC, device=dev, dtype=dtype, generator=g)
    q = torch.randn(batch, heads, DC, device=dev, dtype=dtype, generator=g)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    m = ctx // PAGE
    perm = torch.randperm(batch * m, device=dev, generator=g)
    pages = torch.empty(batch * m, PAGE, DC, device=dev, dtype=dtype)
    pages[perm] = kv.reshape(batch * m, PAGE, DC)
    table = perm.reshape(batch, m).int()
    scale = MLAConfig.preset("deepseek-v3").softmax_scale
    case = {"phase": "decode", "heads": heads, "batch": batch, "context": ctx, "page_size": PAGE}
    nbytes, flops = batch * ctx * DC * 2.0, 2.0 * batch * heads * ctx * (DC + C)
    rows, rep = [], args.rep_ms
    anchor = ANCHORS.get((heads, batch, ctx))

    def speedups(us: float, t_torch: float | None) -> dict:
        s = {} if t_torch is None else {"torch": round(t_torch / us, 2)}
        if anchor:
            s.update({"anchor_sglang_triton": round(anchor[0] / us, 2),
                      "anchor_torch": round(anchor[1] / us, 2)})
        return s

    cfg = MLAConfig.preset("deepseek-v3", num_heads=heads)
    cache = ContiguousCache(kv=kv, lens=lens)
    qs, pos = q[:, None], (lens - 1)[:, None]
    t_torch = None
    try:
        t_torch = graph_us(lambda: torch_decode(qs, cache, pos, cfg), rep)
        rows.append(row(case, "torch", t_torch, nbytes, flops, ceil, speedup_vs=speedups(t_torch, None)))
    except torch.OutOfMemoryError:
        print(f"skip torch decode {case}: out of memory", flush=True)
    torch.cuda.empty_cache() if dev == "cuda" else None
    if dev != "cuda" and not INTERPRET:
        return rows
    tun = default_tuning(heads)
    dev_t = torch.device(dev)
    cfg_info = {"tuning": tun.__dict__, "splits": default_splits(batch, heads, ctx, tun, dev_t)}
    want = mla_decode(q, pages, lens, C, scale, block_table=table)          # the tested default
    t = graph_us(lambda: mla_decode(q, pages, lens, C, scale, block_table=table), rep)
    rows.append(row(case, "triton", t, nbytes, flops, ceil, speedup_vs=speedups(t, t_torch), config=cfg_info))
    t = graph_us(lambda: mla_decode(q, kv, lens, C, scale), rep)
    rows.append(row(case, "triton_contiguous", t, nbytes, flops, ceil, speedup_vs=speedups(t, t_torch),
                    config=cfg_info))
    if args.tune and anchor:
        best = (float("inf"), None, None)
        for cand in DECODE_TUNINGS[heads]:
            try:   # a candidate must compile here and agree with the tested default before it is timed
                err = rel_err(mla_decode(q, pages, lens, C, scale, block_table=table, tuning=cand), want)
            except Exception as e:  # noqa: BLE001 (report and go on: one tuning may not build on this stack)
                err = f"{type(e).__name__}: {str(e)[:200]}"
            if not isinstance(err, float) or err > 2e-2:
                print(f"tuning {cand} rejected: {err}", flush=True)
                sweep.append({"case": case, "tuning": cand.__dict__, "rejected": str(err)})
                continue
            for k in sorted({default_splits(batch, heads, ctx, cand, dev_t), *SPLITS}):
                if k > 1 and k * 4 * cand.block_n > ctx:
                    continue
                t = graph_us(lambda k=k, cand=cand: mla_decode(q, pages, lens, C, scale, block_table=table,
                                                               num_splits=k, tuning=cand), max(10, rep // 4))
                sweep.append({"case": case, "tuning": cand.__dict__, "splits": k, "median_us": round(t, 2)})
                best = min(best, (t, cand, k), key=lambda x: x[0])
        t, cand, k = best
        t = graph_us(lambda: mla_decode(q, pages, lens, C, scale, block_table=table, num_splits=k,
                                        tuning=cand), rep)
        rows.append(row(case, "triton_best", t, nbytes, flops, ceil, speedup_vs=speedups(t, t_torch),
                        config={"tuning": cand.__dict__, "splits": k}))
    return rows


def prefill_case(heads: int, tokens: int, args: argparse.Namespace, ceil: dict, dev: str) -> list[dict]:
    """Rows of one causal prefill (batch 1): torch, triton (default tile), triton_best over tiles with --tune."""
    g = torch.Generator(device=dev).manual_seed(tokens + heads)
    dtype = torch.bfloat16
    q = torch.randn(1, tokens, heads, DN + DR, device=dev, dtype=dtype, generator=g)
    k_nope = torch.randn(1, tokens, heads, DN, device=dev, dtype=dtype, generator=g)
    k_pe = torch.randn(1, tokens, DR, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, tokens, heads, DV, device=dev, dtype=dtype, generator=g)
    pos = torch.arange(tokens, device=dev, dtype=torch.int32)[None]
    cfg = MLAConfig.preset("deepseek-v3", num_heads=heads)
    case = {"phase": "prefill", "heads": heads, "batch": 1, "context": tokens, "tokens": tokens}
    nbytes = 2.0 * tokens * heads * (2 * (DN + DR) + 2 * DV)
    flops = 2.0 * heads * (DN + DR + DV) * tokens * (tokens + 1) / 2
    rows, rep = [], args.rep_ms
    qn, qp = q[..., :DN], q[..., DN:]
    t_torch = None
    try:
        t_torch = bench_us(lambda: torch_prefill(qn, qp, k_nope, k_pe, v, pos, cfg), rep)
        rows.append(row(case, "torch", t_torch, nbytes, flops, ceil))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        print(f"skip torch prefill {case}: {str(e)[:120]}", flush=True)
    torch.cuda.empty_cache() if dev == "cuda" else None
    if dev != "cuda" and not INTERPRET:
        return rows
    results = []
    for bm, bn, w, s in PREFILL_TILES[: 1 if not args.tune else None]:
        t = bench_us(lambda bm=bm, bn=bn, w=w, s=s: mla_prefill(
            qn, qp, k_nope, k_pe, v, pos, cfg.softmax_scale, block_m=bm, block_n=bn, num_warps=w,
            num_stages=s), rep)
        results.append((t, {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": s}))
    sp = {} if t_torch is None else {"torch": round(t_torch / results[0][0], 2)}
    rows.append(row(case, "triton", results[0][0], nbytes, flops, ceil, speedup_vs=sp, config=results[0][1]))
    if args.tune:
        t, conf = min(results, key=lambda x: x[0])
        sp = {} if t_torch is None else {"torch": round(t_torch / t, 2)}
        rows.append(row(case, "triton_best", t, nbytes, flops, ceil, speedup_vs=sp, config=conf))
    return rows


def write(path: str | None, ceil: dict, rows: list, sweep: list) -> None:
    """The DESIGN.md record (plus the tuning sweep), rewritten after every case so a cut run keeps rows."""
    if not path:
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"bench": "mla", "command": "python " + " ".join(sys.argv),
              "date": datetime.date.today().isoformat(), "device": device_name(dev),
              "world_size": 1, "versions": versions(), "ceilings": ceil, "rows": rows, "tuning_sweep": sweep}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main() -> None:
    """Run the decode and prefill shapes, print a summary and write the JSON as it goes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here (DESIGN.md schema)")
    ap.add_argument("--quick", action="store_true", help="a small subset of shapes")
    ap.add_argument("--tune", action="store_true",
                    help="also sweep tunings and split counts on the anchor shapes (triton_best rows)")
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--phases", nargs="+", default=["decode", "prefill"])
    ap.add_argument("--max-cache-gb", type=float, default=24.0,
                    help="skip decode shapes with a larger cache")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ceil = ceilings(dev, args.rep_ms)
    print(f"device {dev}: ceilings {ceil}", flush=True)
    batches, contexts, tokens = ([1, 32, 128], [1024, 4096, 16384, 32768], [1024, 4096, 16384])
    if args.quick:
        batches, contexts, tokens = [1, 32], [1024, 16384], [1024, 4096]
    if dev == "cpu":
        batches, contexts, tokens = [1, 2], [256], [128]
    shapes = [(h, b, c) for h in args.heads for b in batches for c in contexts]
    shapes += [k for k in ANCHORS if k not in shapes and k[0] in args.heads and dev == "cuda"]
    rows, sweep = [], []
    if "decode" in args.phases:
        for h, b, c in sorted(shapes, key=lambda s: (s not in ANCHORS, s)):   # anchors first
            if b * c * DC * 2 > args.max_cache_gb * 1e9:
                print(f"skip decode heads={h} batch={b} context={c}: cache over --max-cache-gb", flush=True)
                continue
            new = decode_case(h, b, c, args, ceil, dev, sweep)
            rows += new
            write(args.json, ceil, rows, sweep)
            for r in new:
                print(f"decode N={h:3d} B={b:3d} L={c:5d} {r['variant']:18s} {r['median_us']:9.1f} us  "
                      f"roofline {r['roofline']:.3f}  {r.get('speedup_vs', {})}", flush=True)
    if "prefill" in args.phases:
        for h in args.heads:
            for s in tokens:
                new = prefill_case(h, s, args, ceil, dev)
                rows += new
                write(args.json, ceil, rows, sweep)
                for r in new:
                    print(f"prefill N={h:3d} S={s:5d} {r['variant']:18s} {r['median_us']:9.1f} us  "
                          f"roofline {r['roofline']:.3f}  {r['tflops']} TFLOP/s", flush=True)
    print("\nphase   N   B     L/S   variant              us        roofline  speedup_vs")
    for r in rows:
        c = r["case"]
        print(f"{c['phase']:7s} {c['heads']:3d} {c['batch']:3d} {c['context']:6d}  {r['variant']:18s} "
              f"{r['median_us']:10.1f}  {r['roofline']:.3f}  {r.get('speedup_vs', '')}")


if __name__ == "__main__":
    main()
