"""Benchmark MLA attention: absorbed decode over the compressed cache, and the expanded causal prefill.

Dimension legend: B batch (sequences), L context per sequence, N heads, C latent (512), Dr rope (64),
Dc = C + Dr (576) cache row, S prefill tokens, Dqk = 192, Dv = 128.

Decode moves B * L * Dc * 2 bytes of cache and does 2 * B * N * L * (Dc + C) FLOPs; prefill (causal,
batch 1) does 2 * N * (Dqk + Dv) * S * (S + 1) / 2 FLOPs. The floor is the larger of bytes over the
measured copy bandwidth and FLOPs over the measured bf16 matmul rate, both measured in the same run;
`roofline` = floor / median. Variants: triton (paged cache, page 64), triton_contiguous, torch (the
library's torch backend, contiguous cache), and with --tune triton_best (best tuning and split count
found for that shape on the paged cache, with --candidates key_major among the key-major tunings only;
decode only on the ANCHORS shapes) and triton_best_contiguous (the same on the contiguous cache).
Decode rows time CUDA-graph replays (as serving launches decode); prefill rows eager calls. The
few-sequence shapes (B = 1, 4 at L = 4k, 16k) add an sglang row (SGLang's Triton MLA decode through
bench/peers_sgl.py, when it loads; else a row with peer_skipped) and a split-count sweep (tuning_sweep
in the JSON; --no-sweep skips it). Their rows also carry median_us_read_flush (a replay after an L2 flush that
reads, leaving clean lines) and median_us_in_step (what one call adds inside a captured decode step, no graph
launch of its own: bench/mla_cases.in_step_us); median_us stays do_bench's. Usage: python bench/bench_mla.py
[--quick] [--tune] [--candidates all|key_major] [--small-batch] [--no-sweep] [--anchors] [--json PATH]; on
the GPU machine bench/gpu/mla_gpu.sh runs the GPU tests and then this (with --tune by default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_kernels.mla_decode import (  # noqa: E402
    decode_tuning_for,
    default_splits,
    mla_decode,
    tma_unsupported,
)
from nanomoe_kernels.mla_prefill import mla_prefill  # noqa: E402

from bench.common import device_name, versions  # noqa: E402
from bench.mla_cases import (  # noqa: E402
    ANCHORS,
    DC,
    DECODE_TUNINGS,
    DN,
    DR,
    DV,
    KEY_MAJOR_TUNINGS,
    PAGE,
    PREFILL_TILES,
    SMALL_SHAPES,
    SMALL_SPLITS,
    SMALL_TUNINGS,
    SPLITS,
    C,
    bench_us,
    ceilings,
    graph_us,
    graph_us_read_flush,
    in_step_us,
)
from nanomoe_fn.attention.backends import torch_decode, torch_prefill  # noqa: E402
from nanomoe_fn.attention.cache import ContiguousCache  # noqa: E402
from nanomoe_fn.attention.config import MLAConfig  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # CPU smoke runs of the triton paths


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error of out against want in float32; inf when out holds a non-finite value."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.float() - want.float()).norm() / want.float().norm())


def floor_us(nbytes: float, flops: float, ceil: dict) -> float:
    """The larger of bytes over the copy bandwidth and FLOPs over the matmul rate, in microseconds."""
    return max(nbytes / (ceil["hbm_gbps"] * 1e3), flops / (ceil["bf16_tflops"] * 1e6))


def row(case: dict, variant: str, us: float, nbytes: float, flops: float, ceil: dict, **extra: object) -> dict:
    """One JSON row: rates and roofline (floor / us, floor from ceil), then the extra keys."""
    floor = floor_us(nbytes, flops, ceil)
    out = {"case": case, "variant": variant, "median_us": round(us, 2),
           "gbps": round(nbytes / us / 1e3, 1), "tflops": round(flops / us / 1e6, 1),
           "roofline": round(floor / us, 3)}
    out.update(extra)
    return out


def sgl_decode(q: torch.Tensor, kv: torch.Tensor, scale: float, splits: int) -> tuple[Callable, torch.Tensor]:
    """SGLang's Triton MLA decode over kv [B, L, Dc] (every row full, one token a slot), loaded by
    bench/peers_sgl.py from the git-ignored .peers/sgl: (call, its output buffer). Raises with a reason."""
    from bench.peers_sgl import load_sgl_decode  # here: the loader and the kernel files are optional

    mod = load_sgl_decode()
    batch, heads, _ = q.shape
    k_buf = kv.reshape(-1, 1, DC)
    ints = dict(dtype=torch.int32, device=q.device)
    indptr, indices = torch.arange(batch + 1, **ints) * kv.shape[1], torch.arange(k_buf.shape[0], **ints)
    logits = torch.empty(batch, heads, splits, C, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    n_splits, o = torch.full((batch,), splits, **ints), q.new_empty(batch, heads, C)
    return (lambda: mod.decode_attention_fwd(q, k_buf, k_buf[..., :C], o, indptr, indices, logits, lse, n_splits,
                                             splits, scale, 1.0, 1.0, has_mla=True)), o


def decode_case(heads: int, batch: int, ctx: int, args: argparse.Namespace, ceil: dict, dev: str,
                sweep: list) -> list[dict]:
    """Rows of one decode shape: torch, sglang (when it loads), triton (paged, contiguous), triton_best
    with --tune on anchor and small-batch shapes; small-batch shapes also sweep K (trials go to sweep)."""
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
    anchor, small = ANCHORS.get((heads, batch, ctx)), (heads, batch, ctx) in SMALL_SHAPES
    base: dict = {}                                        # variant -> us, for speedup_vs

    def speedups(us: float) -> dict:
        s = {k: round(v / us, 2) for k, v in base.items()}
        if anchor:
            s.update({"anchor_sglang_triton": round(anchor[0] / us, 2),
                      "anchor_torch": round(anchor[1] / us, 2)})
        return s

    def add(variant: str, us: float, fn: Callable | None = None, **extra: object) -> None:
        if fn is not None and dev == "cuda" and (small or args.small_batch):   # few rows: also after a clean L2
            extra["median_us_read_flush"] = round(graph_us_read_flush(fn), 2)
            extra["median_us_in_step"] = round(in_step_us(fn), 2)
        rows.append(row(case, variant, us, nbytes, flops, ceil, floor_us=round(floor_us(nbytes, flops, ceil), 2),
                        speedup_vs=speedups(us), **extra))

    cfg = MLAConfig.preset("deepseek-v3", num_heads=heads)
    cache = ContiguousCache(kv=kv, lens=lens)
    qs, pos = q[:, None], (lens - 1)[:, None]
    try:
        t = graph_us(lambda: torch_decode(qs, cache, pos, cfg), rep)
        add("torch", t, lambda: torch_decode(qs, cache, pos, cfg))
        base["torch"] = t
    except torch.OutOfMemoryError:
        print(f"skip torch decode {case}: out of memory", flush=True)
    torch.cuda.empty_cache() if dev == "cuda" else None
    if dev != "cuda" and not INTERPRET:
        return rows
    want = mla_decode(q, pages, lens, C, scale, block_table=table)          # the tested default
    if small or args.small_batch or anchor:
        try:   # best of a few split counts, as the anchors' "best split"; the output is checked first
            best = (float("inf"), 0, 0.0)
            for k in (8, 16, 32, 64):
                fn, o = sgl_decode(q, kv, scale, k)
                fn()
                t = graph_us(fn, max(10, rep // 2))
                best = min(best, (t, k, rel_err(o, want)), key=lambda x: x[0])
            add("sglang", best[0], sgl_decode(q, kv, scale, best[1])[0],
                config={"num_kv_splits": best[1], "rel_err_vs_triton": round(best[2], 4)})
            base["sglang"] = best[0]
        except Exception as e:  # noqa: BLE001 (the peer is optional: record why it is missing)
            rows.append({"case": case, "variant": "sglang", "peer_skipped": f"{type(e).__name__}: {str(e)[:200]}"})
    tun, tun_c = decode_tuning_for(q, pages, C), decode_tuning_for(q, kv, C)     # what the default calls run
    dev_t = torch.device(dev)
    k_def = default_splits(batch, heads, ctx, tun, dev_t, paged=True)
    cfg_info = {"tuning": tun.__dict__, "splits": k_def}
    paged_fn, contiguous_fn = (lambda: mla_decode(q, pages, lens, C, scale, block_table=table),
                               lambda: mla_decode(q, kv, lens, C, scale))
    add("triton", graph_us(paged_fn, rep), paged_fn, config=cfg_info)
    add("triton_contiguous", graph_us(contiguous_fn, rep), contiguous_fn,
        config={"tuning": tun_c.__dict__, "splits": default_splits(batch, heads, ctx, tun_c, dev_t)})
    if not ((args.tune and anchor) or small) or args.no_sweep:
        return rows
    pool = KEY_MAJOR_TUNINGS[heads] if args.candidates == "key_major" else (
        DECODE_TUNINGS[heads] + SMALL_TUNINGS[heads] + KEY_MAJOR_TUNINGS[heads])
    cands = [tun] + [c for c in pool if c != tun] if args.tune else [tun]
    splits = SMALL_SPLITS if small else SPLITS
    best = (float("inf"), None, None)
    for cand in cands:
        try:   # a candidate must compile here and agree with the tested default before it is timed
            err = rel_err(mla_decode(q, pages, lens, C, scale, block_table=table, tuning=cand), want)
        except Exception as e:  # noqa: BLE001 (report and go on: one tuning may not build on this stack)
            err = f"{type(e).__name__}: {str(e)[:200]}"
        if not isinstance(err, float) or err > 2e-2:
            print(f"tuning {cand} rejected: {err}", flush=True)
            sweep.append({"case": case, "tuning": cand.__dict__, "rejected": str(err)})
            continue
        for k in sorted({default_splits(batch, heads, ctx, cand, dev_t, paged=True), *splits}):
            if k > 1 and k * 2 * cand.block_n > ctx:
                continue
            t = graph_us(lambda k=k, cand=cand: mla_decode(q, pages, lens, C, scale, block_table=table,
                                                           num_splits=k, tuning=cand), max(10, rep // 4))
            sweep.append({"case": case, "tuning": cand.__dict__, "splits": k, "median_us": round(t, 2)})
            best = min(best, (t, cand, k), key=lambda x: x[0])
    t, cand, k = best
    t = graph_us(lambda: mla_decode(q, pages, lens, C, scale, block_table=table, num_splits=k, tuning=cand), rep)
    add("triton_best", t, config={"tuning": cand.__dict__, "splits": k})
    if not cand.tma or not tma_unsupported(kv, C, cand):
        t = graph_us(lambda: mla_decode(q, kv, lens, C, scale, num_splits=k, tuning=cand), rep)
        add("triton_best_contiguous", t, config={"tuning": cand.__dict__, "splits": k})
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
    """The JSON record (its fields: bench/common.py, write_record; plus the tuning sweep), rewritten after every
    case so a cut run keeps rows."""
    if not path:
        return
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"bench": "mla", "command": "python " + " ".join(sys.argv),
              "date": datetime.date.today().isoformat(), "device": device_name(dev),
              "world_size": 1, "versions": versions(), "ceilings": ceil, "rows": rows, "tuning_sweep": sweep}
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def summary(r: dict) -> str:
    """One printed line of a row: N, B, L/S, variant, us, roofline, speedups (or why a peer was skipped)."""
    c = r["case"]
    return (f"N={c['heads']:3d} B={c['batch']:3d} L={c['context']:5d} {r['variant']:18s} {r.get('median_us', 0):9.1f} "
            f"us  roofline {r.get('roofline', 0):.3f}  {r.get('speedup_vs', r.get('peer_skipped'))}")


def main() -> None:
    """Run the decode and prefill shapes, print a summary and write the JSON as it goes."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here, one JSON record (its fields: bench/common.py, write_record)")
    ap.add_argument("--quick", action="store_true", help="a small subset of shapes")
    ap.add_argument("--tune", action="store_true",
                    help="also sweep tunings and split counts on the anchor shapes (triton_best rows)")
    ap.add_argument("--heads", type=int, nargs="+", default=[128, 16])
    ap.add_argument("--rep-ms", type=int, default=50)
    ap.add_argument("--phases", nargs="+", help="decode and/or prefill (default both; decode only with "
                    "--small-batch or --anchors)")
    ap.add_argument("--small-batch", action="store_true",
                    help="only the few-sequence decode rows (B=1, 4 at L=4k, 16k) with their split sweep")
    ap.add_argument("--no-sweep", action="store_true", help="no tuning or split sweep (no triton_best rows)")
    ap.add_argument("--anchors", action="store_true", help="only the anchor decode shapes (with --small-batch: both)")
    ap.add_argument("--candidates", choices=["all", "key_major"], default="all",
                    help="with --tune: every tuning, or only the key-major ones (next to the default)")
    ap.add_argument("--max-cache-gb", type=float, default=24.0,
                    help="skip decode shapes with a larger cache")
    args = ap.parse_args()
    args.phases = args.phases or (["decode"] if args.small_batch or args.anchors else ["decode", "prefill"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ceil = ceilings(dev, args.rep_ms)
    print(f"device {dev}: ceilings {ceil}", flush=True)
    batches, contexts, tokens = ([1, 32, 128], [1024, 4096, 16384, 32768], [1024, 4096, 16384])
    if args.quick:
        batches, contexts, tokens = [1, 32], [1024, 16384], [1024, 4096]
    if dev == "cpu":   # interpreter smoke run: tiny shapes, the small-batch sweep at L=256
        batches, contexts, tokens = [1, 2], [256], [128]
        SMALL_SHAPES[:] = [(h, b, 256) for h in (128, 16) for b in (1, 4)]
    small = [k for k in SMALL_SHAPES if k[0] in args.heads]
    anchors = [k for k in ANCHORS if k[0] in args.heads and dev == "cuda"]
    if args.small_batch or args.anchors:
        shapes = (small if args.small_batch else []) + (anchors if args.anchors else [])
    else:
        shapes = [(h, b, c) for h in args.heads for b in batches for c in contexts]
        shapes += [k for k in anchors + small if k not in shapes]
    rows, sweep = [], []
    if "decode" in args.phases:   # anchors first, then the small-batch shapes, then the grid
        for h, b, c in sorted(shapes, key=lambda s: (s not in ANCHORS, s not in SMALL_SHAPES, s)):
            if b * c * DC * 2 > args.max_cache_gb * 1e9:
                print(f"skip decode heads={h} batch={b} context={c}: cache over --max-cache-gb", flush=True)
                continue
            new = decode_case(h, b, c, args, ceil, dev, sweep)
            rows += new
            write(args.json, ceil, rows, sweep)
            for r in new:
                print("decode " + summary(r), flush=True)
    if "prefill" in args.phases:
        for h in args.heads:
            for s in tokens:
                new = prefill_case(h, s, args, ceil, dev)
                rows += new
                write(args.json, ceil, rows, sweep)
                for r in new:
                    print(f"prefill N={h:3d} S={s:5d} {r['variant']:18s} {r['median_us']:9.1f} us  "
                          f"roofline {r['roofline']:.3f}  {r['tflops']} TFLOP/s", flush=True)
    print("\nsummary")
    for r in rows:
        print(f"{r['case']['phase']:7s} " + summary(r))


if __name__ == "__main__":
    main()
