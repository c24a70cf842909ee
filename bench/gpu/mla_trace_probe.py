"""Where a few-row 128-head MLA decode's stage 1 spends its time: a timeline written by the kernel itself.

    python bench/gpu/mla_trace_probe.py --out $OUT/mla_trace_probe.json [--reps 30]
        [--variants | --orders [--order-set 0,1]]

The warp-specialised Gluon stage 1 (kernels/mla_decode_wgmma_ws.py, launch_partial(trace=...)) stamps
(%globaltimer ns, %clock64 cycles) at these slots of each program's row of the trace:

    0  program start               1  score warpgroup: Q landed
    2 + i   score: tile i landed    10 + i  score: q . k^T of tile i done    18 + i  score: p . v_lo of tile i done
    26 score: partials stored      27 value warpgroup: last p . v_hi done  28 value: partials stored
    29 load warp: last TMA issued   smid at trace[p, 60]                    (tiles i < 8)

For each shape the default call's stage 1, at its split count K and at K / 2 and 2 K, runs `reps` times after
each L2 state (zeroed 256 MB as do_bench leaves it, read 256 MB, none) and the JSON keeps the medians over
programs and reps of each phase, the kernel's span (first start to last store) and the spread of program starts
and ends. The traced partials are checked bit-equal to an untraced launch; each stage 1 alone and each shape's
whole default call are timed as do_bench's graph replay.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nanomoe_kernels import mla_decode_wgmma_ws as ws  # noqa: E402
from nanomoe_kernels.mla_decode import decode_tuning_for, default_splits, mla_decode  # noqa: E402

from bench.mla_cases import capture_graph, read_flush  # noqa: E402

C, DC, PAGE, SCALE = 512, 576, 64, 0.1352
SHAPES = [(128, 1, 16384, True), (128, 1, 16384, False), (128, 1, 4096, True), (128, 4, 16384, True)]
TILES = 8


def make_inputs(heads: int, rows: int, ctx: int, paged: bool) -> tuple:
    """q [R, N, Dc], cache (paged: 64-row pages in a shuffled block table), lengths, block table or None."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, heads, DC, device="cuda", generator=g).bfloat16()
    if paged:
        pages = rows * ctx // PAGE
        kv = torch.randn(pages, PAGE, DC, device="cuda", generator=g).bfloat16()
        bt = torch.randperm(pages, device="cuda", generator=g).int().view(rows, ctx // PAGE)
    else:
        kv, bt = torch.randn(rows, ctx, DC, device="cuda", generator=g).bfloat16(), None
    return q, kv, torch.full((rows,), ctx, dtype=torch.int32, device="cuda"), bt


def stage1(q, kv, lens, bt, trace=None, splits: int | None = None, store_tma: bool = False,
           part_dtype: torch.dtype = torch.float32, order: int = 0) -> tuple:
    """The default call's stage 1 alone (its tuning; its split count unless given; plain or TMA partial stores, in
    part_dtype; the load warp's first loads ordered by `order`, launch_partial's bits); returns (partials, lse, K)."""
    t = decode_tuning_for(q, kv, C)
    assert t.wgmma and t.warp_specialize, f"the default here is not the warp-specialised stage 1: {t}"
    paged = bt is not None
    max_len = bt.shape[1] * kv.shape[1] if paged else kv.shape[1]
    rows, heads = q.shape[:2]
    k = splits or default_splits(rows, heads, max_len, t, q.device, C, DC * q.element_size(), paged)
    o_part = torch.empty(rows, heads, k, C, dtype=part_dtype, device="cuda")
    lse = torch.empty(rows, heads, k, dtype=torch.float32, device="cuda")
    ws.launch_partial(q, kv, bt if paged else lens, lens, o_part, lse, C, rows // (bt.shape[0] if paged else
                      kv.shape[0]), k, max_len, SCALE * 1.4426950408889634, paged, trace=trace, store_tma=store_tma,
                      order=order)
    return o_part, lse, k


def phases(tr: torch.Tensor, tiles: int) -> dict:
    """Per-program phase lengths (us from %globaltimer, and cycles from %clock64) of one traced launch."""
    ns, clk = tr[:, 0:62:2].double(), tr[:, 1:62:2].double()
    last = min(tiles, TILES) - 1
    out = {}
    for unit, t, scale in (("us", ns, 1e-3), ("kcycles", clk, 1e-3)):
        spans = {
            "start_to_q": t[:, 1] - t[:, 0],
            "q_to_tile0": t[:, 2] - t[:, 1],
            "start_to_qk0": t[:, 10] - t[:, 0],
            "tile_qk": t[:, 10:10 + last + 1] - t[:, 2:2 + last + 1],
            "tile_whole": t[:, 18:18 + last + 1] - t[:, 2:2 + last + 1],
            "wait_next_tile": t[:, 3:3 + last] - t[:, 18:18 + last],
            "score_store": t[:, 26] - t[:, 18 + last],
            "value_after_score_tile": t[:, 27] - t[:, 18 + last],
            "value_store": t[:, 28] - t[:, 27],
            "program": torch.maximum(t[:, 26], t[:, 28]) - t[:, 0],
        }
        out[unit] = {}
        for name, v in spans.items():   # [programs] or [programs, tiles]: a median over programs per tile
            cols = [v] if v.dim() == 1 else list(v.unbind(1))
            for i, col in enumerate(cols):
                out[unit][name if v.dim() == 1 else f"{name}_{i}"] = col.median().item() * scale
    start, end = ns[:, 0], torch.maximum(ns[:, 26], ns[:, 28])
    out["kernel_span_us"] = (end.max() - start.min()).item() * 1e-3
    out["start_spread_us"] = (start.max() - start.min()).item() * 1e-3
    out["end_spread_us"] = (end.max() - end.min()).item() * 1e-3
    out["first_end_us"] = (end.min() - start.min()).item() * 1e-3
    out["sm_ghz"] = ((clk[:, 26] - clk[:, 0]) / (ns[:, 26] - ns[:, 0])).median().item()
    out["distinct_sms"] = int(tr[:, 60].unique().numel())
    return out


def median_dicts(ds: list[dict]) -> dict:
    """Key-wise median of equally shaped nested dicts of floats."""
    out = {}
    for key, v in ds[0].items():
        out[key] = median_dicts([d[key] for d in ds]) if isinstance(v, dict) else statistics.median(d[key] for d in ds)
    return out


VARIANTS = {  # name -> DecodeTuning fields over the default's (the warp-specialised wgmma stage 1)
    "default": {}, "store_tma": {"store_tma": True}, "bf16_partials": {"input_dtype_partials": True},
    "store_tma_bf16": {"store_tma": True, "input_dtype_partials": True},
    "store_tma_pdl": {"store_tma": True, "pdl": True},
    "store_tma_bf16_pdl": {"store_tma": True, "input_dtype_partials": True, "pdl": True},
}


def variants(rounds: int) -> list[dict]:
    """Each shape's whole call under each variant: checked against the default's output, then do_bench's graph
    replay (and after a read flush) in `rounds` interleaved rounds; the stage 1 of the store variants traced."""
    from dataclasses import replace

    from bench.mla_cases import graph_us_read_flush
    out = []
    for heads, rows, ctx, paged in SHAPES:
        q, kv, lens, bt = make_inputs(heads, rows, ctx, paged)
        base = decode_tuning_for(q, kv, C)
        def call(t, q=q, kv=kv, lens=lens, bt=bt):   # noqa: ANN001, ANN202 - one variant's whole call
            return lambda: mla_decode(q, kv, lens, C, SCALE, block_table=bt, tuning=t)

        fns = {name: call(replace(base, **f)) for name, f in VARIANTS.items()}
        ref = fns["default"]().float()
        row = {"heads": heads, "rows": rows, "context": ctx, "paged": paged, "max_abs_diff_vs_default": {},
               "rounds_us": {n: [] for n in fns}, "read_flush_us": {}}
        for name, fn in fns.items():
            row["max_abs_diff_vs_default"][name] = (fn().float() - ref).abs().max().item()
        graphs = {name: capture_graph(fn) for name, fn in fns.items()}
        for _ in range(rounds):
            for name, g in graphs.items():
                row["rounds_us"][name].append(1000 * triton.testing.do_bench(g.replay, warmup=25, rep=150,
                                                                              return_mode="median"))
        row["median_us"] = {n: statistics.median(v) for n, v in row["rounds_us"].items()}
        for name, fn in fns.items():
            row["read_flush_us"][name] = graph_us_read_flush(fn)
        zero_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        for name, (tma, dt) in {"trace_store_tma": (True, torch.float32),
                                "trace_store_tma_bf16": (True, torch.bfloat16)}.items():
            k = stage1(q, kv, lens, bt)[2]
            trace = torch.zeros((heads // ws.BH) * rows * k, 64, dtype=torch.int64, device="cuda")
            reps = []
            for _ in range(20):
                zero_buf.zero_()
                stage1(q, kv, lens, bt, trace, store_tma=tma, part_dtype=dt)
                torch.cuda.synchronize()
                reps.append(phases(trace.cpu(), triton.cdiv(triton.cdiv(ctx, k), 64)))
            row[name] = median_dicts(reps)
        del graphs
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("rounds_us",) and not k.startswith("trace")},
                         indent=1), flush=True)
    return out


def orders(reps: int, order_set: tuple = (0, 1, 2, 3)) -> list[dict]:
    """--orders: the one-row shapes' stage 1 as the default runs it (TMA stores of bf16 partials) under each order of
    the load warp's first loads (0: Q and both ring slots at once; 1: tile 1 after tile 0; 2: tile 0 after Q; 3:
    both; bit 4 drove the removed tile-pieces and L2-prefetch experiments, commits 2097afc / 750255a), traced after a
    zeroed flush and timed alone as do_bench's graph replay; partials checked bit-equal to order 0's."""
    zero_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    out = []
    for heads, rows, ctx, paged in [s for s in SHAPES if s[1] == 1]:
        q, kv, lens, bt = make_inputs(heads, rows, ctx, paged)
        base, base_lse, k = stage1(q, kv, lens, bt, store_tma=True, part_dtype=torch.bfloat16)
        row = {"heads": heads, "rows": rows, "context": ctx, "paged": paged, "splits": k, "by_order": {}}
        trace = torch.zeros((heads // ws.BH) * rows * k, 64, dtype=torch.int64, device="cuda")
        for order in order_set:
            def run(tr=None, order=order, q=q, kv=kv, lens=lens, bt=bt):   # noqa: ANN001, ANN202
                return stage1(q, kv, lens, bt, tr, store_tma=True, part_dtype=torch.bfloat16, order=order)
            part, lse, _ = run()
            one = {"equals_order_0": bool(torch.equal(part, base) and torch.equal(lse, base_lse))}
            reps_ = []
            for _ in range(reps):
                zero_buf.zero_()
                trace.zero_()
                run(trace)
                torch.cuda.synchronize()
                reps_.append(phases(trace.cpu(), triton.cdiv(triton.cdiv(ctx, k), 64)))
            one["zeroed"] = median_dicts(reps_)
            graph = capture_graph(run)
            one["stage1_us_do_bench"] = [triton.testing.do_bench(graph.replay, warmup=25, rep=150,
                                                                 return_mode="median") for _ in range(3)]
            del graph
            row["by_order"][order] = one
        out.append(row)
        print(json.dumps({o: (v["equals_order_0"], v["stage1_us_do_bench"], v["zeroed"]["kernel_span_us"],
                              v["zeroed"]["us"]["q_to_tile0"]) for o, v in row["by_order"].items()}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--variants", action="store_true", help="A/B the store variants instead of tracing splits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--orders", action="store_true", help="trace the load warp's first-load orders instead")
    parser.add_argument("--order-set", default="0,1,2,3", help="--orders: which launch_partial orders (0-3)")
    args = parser.parse_args()
    if args.orders:
        shapes = orders(args.reps, tuple(int(o) for o in args.order_set.split(",")))
        result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "shapes": shapes}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    if args.variants:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "variants": VARIANTS, "shapes": variants(args.rounds)}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    zero_buf = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    flushes = {"zeroed": zero_buf.zero_, "read": read_flush(), "none": lambda: None}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shapes": []}
    for heads, rows, ctx, paged in SHAPES:
        q, kv, lens, bt = make_inputs(heads, rows, ctx, paged)
        default_k = stage1(q, kv, lens, bt)[2]
        row = {"heads": heads, "rows": rows, "context": ctx, "paged": paged, "default_splits": default_k,
               "by_splits": {}}
        for k in (default_k, default_k // 2, default_k * 2):   # the default, and programs of twice / half the tiles
            plain, plain_lse, _ = stage1(q, kv, lens, bt, splits=k)
            programs = (heads // ws.BH) * rows * k
            trace = torch.zeros(programs, 64, dtype=torch.int64, device="cuda")
            traced, traced_lse, _ = stage1(q, kv, lens, bt, trace, splits=k)
            tiles = triton.cdiv(triton.cdiv(ctx, k), 64)
            one = {"programs": programs, "tiles_per_program": tiles, "tiles_traced": min(tiles, TILES),
                   "traced_equals_untraced": bool(torch.equal(plain, traced) and torch.equal(plain_lse, traced_lse))}
            for name, flush in flushes.items():
                reps = []
                for _ in range(args.reps):
                    flush()
                    trace.zero_()
                    stage1(q, kv, lens, bt, trace, splits=k)
                    torch.cuda.synchronize()
                    reps.append(phases(trace.cpu(), tiles))
                one[name] = median_dicts(reps)
            graph = capture_graph(lambda q=q, kv=kv, lens=lens, bt=bt, k=k: stage1(q, kv, lens, bt, splits=k))
            one["stage1_us_do_bench"] = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
            del graph
            row["by_splits"][k] = one
        graph = capture_graph(lambda q=q, kv=kv, lens=lens, bt=bt: mla_decode(q, kv, lens, C, SCALE, block_table=bt))
        row["call_us_do_bench"] = triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
        del graph
        result["shapes"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
