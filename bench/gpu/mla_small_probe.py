"""Few-row and paged MLA decode on one GPU: tunings A/B in interleaved rounds, and where a call's time goes.

    python bench/gpu/mla_small_probe.py --out $OUT/mla_small_probe.json [--rounds 5] [--one-row | --partials
    | --partials-one-row | --pdl | --wgmma | --wgmma-splits | --ws-partials | --ws-pdl | --prologue | --reduce-warps
    | --few-rows | --few-rows-64]

For each shape (heads, rows, context; paged cache of 64-row pages unless marked contiguous) every variant
(a tuning and split count, or the library default) is checked against the default's output, then timed as
one CUDA-graph replay (L2 flushed before each, median of do_bench) in `rounds` interleaved rounds, so
a drift of the clocks hits every variant alike. The JSON keeps each round's figure and the median of
medians. Then each shape's default call is replayed under torch.profiler (the L2 flushed before each replay, as
do_bench does; before the twenty-fourth session these breakdowns were L2-warm): the GPU time of each kernel
(stage 1, the split reduction) and the replay's span between the first kernel's start and the last one's end;
first of all, a graph of two one-element kernels, timed the same way, for what the timing itself costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from nanomoe_kernels.mla_decode import DecodeTuning, decode_tuning_for, default_tuning, mla_decode  # noqa: E402
from nanomoe_kernels.mla_decode_tuning import ONE_ROW_WGMMA as OW  # noqa: E402

from bench.mla_cases import capture_graph  # noqa: E402

C, DC, PAGE, SCALE = 512, 576, 64, 0.1352
KM_PLAIN = DecodeTuning(16, 64, 1, 4, 2, key_major=True)
KM_TMA = DecodeTuning(16, 64, 1, 4, 2, tma=True, key_major=True)
SHAPES = [  # (heads, rows, context, paged) -> variants: name -> (tuning or None, splits or None)
    ((16, 1, 16384, True), {"default": (None, None), "km_plain": (KM_PLAIN, 128), "km_tma": (KM_TMA, 128)}),
    ((16, 1, 4096, True), {"default": (None, None), "km_plain": (KM_PLAIN, 32), "km_tma": (KM_TMA, 32)}),
    ((16, 4, 4096, True), {"default": (None, None), "km_plain": (KM_PLAIN, 32), "km_tma": (KM_TMA, 32)}),
    ((16, 4, 16384, True), {"default": (None, None), "km_plain": (KM_PLAIN, 32)}),
    ((16, 128, 16384, True), {"default": (None, None), "old_k2": (None, 2)}),
    ((16, 32, 16384, True), {"default": (None, None), "old_k8": (None, 8)}),
    ((16, 128, 16384, False), {"default": (None, None), "k4": (None, 4)}),
    ((128, 1, 16384, True), {"default": (None, None)}),
]

KM = dict(block_h=16, block_n=64, value_splits=1, num_warps=4, num_stages=2, key_major=True)
ONE_ROW = [  # --one-row: split counts and reduction blocks around the 16-head one-row default
    ((16, 1, 16384, True), {"default": (None, None), "k96": (None, 96), "k64": (None, 64),
                            **{f"red{h}x{c}": (DecodeTuning(**KM, reduce_h=h, reduce_c=c), 128)
                               for h, c in ((1, 64), (1, 128), (2, 64), (4, 128), (16, 32))}}),
    ((16, 1, 4096, True), {"default": (None, None), "k16": (None, 16),
                           **{f"red{h}x{c}": (DecodeTuning(**KM, reduce_h=h, reduce_c=c), 32)
                              for h, c in ((1, 64), (2, 64), (4, 128))}}),
]

PARTIALS = [  # --partials: each shape's default against the same tuning with its split partials in bf16
    (shape, {"default": (None, None), "bf16_partials": ("input_dtype_partials", None)})
    for shape in ((16, 1, 16384, True), (16, 1, 16384, False), (16, 1, 4096, True), (16, 4, 16384, True),
                  (16, 32, 16384, True), (128, 1, 16384, True), (128, 4, 16384, True))
]
BF16_KM = dict(KM, input_dtype_partials=True)
PARTIALS_ONE_ROW = [  # --partials-one-row: bf16 partials with reduction blocks (heads x columns) around 1 x 32
    (shape, {"default": (None, None), **{f"bf16_red{h}x{c}": (DecodeTuning(**BF16_KM, reduce_h=h, reduce_c=c), k)
                                         for h, c in ((1, 32), (1, 64), (2, 32), (1, 16), (2, 64))}})
    for shape, k in (((16, 1, 16384, True), 128), ((16, 1, 16384, False), 128), ((16, 1, 4096, True), 32))
]

PDL = [  # --pdl: each shape's default tuning with the reduction launched with and without PDL
    (shape, {"default": (None, None), "pdl": ("pdl_on", None), "no_pdl": ("pdl_off", None)})
    for shape in ((16, 1, 16384, True), (16, 1, 16384, False), (16, 1, 4096, True), (16, 4, 16384, True),
                  (16, 32, 16384, True), (16, 128, 16384, True), (128, 1, 16384, True), (128, 4, 16384, True),
                  (128, 32, 16384, False))
]

WG = DecodeTuning(wgmma=True)
WS = DecodeTuning(wgmma=True, warp_specialize=True)
WGMMA = [  # --wgmma: the Gluon stage 1 (the default on sm_90, warp-specialised) against its plain form ("wg") and the
    # Triton kernels' default ("tl"), split counts
    ((128, 1, 16384, True), {"default": (None, None), "tl": ("tl", None), "wg_k16": (WG, 16), "wg_k32": (WG, 32),
                             "wg_k128": (WG, 128), "wg": (WG, None), "ws_k32": (WS, 32), "ws_k128": (WS, 128)}),
    ((128, 1, 4096, True), {"default": (None, None), "tl": ("tl", None), "wg_k16": (WG, 16), "wg_k32": (WG, 32),
                            "wg": (WG, None)}),
    ((128, 4, 16384, True), {"default": (None, None), "tl": ("tl", None), "wg_k8": (WG, 8), "wg_k16": (WG, 16),
                             "wg_k32": (WG, 32), "wg": (WG, None), "ws_k32": (WS, 32)}),
    ((128, 32, 16384, False), {"default": (None, None), "tl": ("tl", None), "wg_k1": (WG, 1), "wg_k4": (WG, 4),
                               "wg": (WG, None), "ws_k4": (WS, 4)}),
    ((128, 32, 16384, True), {"default": (None, None), "tl": ("tl", None), "wg": (WG, None)}),
    ((128, 128, 4096, True), {"default": (None, None), "tl": ("tl", None), "wg": (WG, None)}),
    ((64, 8, 16384, True), {"default": (None, None), "tl": ("tl", None), "wg": (WG, None)}),
]
WG_BF16 = DecodeTuning(wgmma=True, input_dtype_partials=True)
WGMMA_SPLITS = [  # --wgmma-splits: few rows, the wgmma stage 1's split count around the default, bf16 partials
    ((128, 1, 16384, True), {"default": (None, None), "wg_k48": (WG, 48), "wg_k96": (WG, 96),
                             "wg_bf16": (WG_BF16, None), "wg_bf16_k128": (WG_BF16, 128)}),
    ((128, 4, 16384, True), {"default": (None, None), "wg_k12": (WG, 12), "wg_k24": (WG, 24),
                             "wg_bf16": (WG_BF16, None)}),
]

WS_BF16 = {f"ws_bf16_red{h}x{c}": (DecodeTuning(wgmma=True, warp_specialize=True, input_dtype_partials=True,
                                                reduce_h=h, reduce_c=c), None)
           for h, c in ((0, 0), (1, 64), (1, 128), (2, 64))}
WS_PARTIALS = [  # --ws-partials: the warp-specialised stage 1 with bf16 split partials, reduction blocks around them
    ((128, 1, 16384, True), {"default": (None, None), **WS_BF16}),
    ((128, 1, 4096, True), {"default": (None, None), **WS_BF16}),
    ((128, 4, 16384, True), {"default": (None, None), "ws_bf16_red0x0": WS_BF16["ws_bf16_red0x0"],
                             "ws_bf16_red1x64": WS_BF16["ws_bf16_red1x64"]}),
]

WS_PDL_T = DecodeTuning(wgmma=True, warp_specialize=True, pdl=True)
WS_PDL = [  # --ws-pdl: the warp-specialised stage 1 with the split reduction launched with PDL against without
    (shape, {"default": (None, None), "ws_pdl": (WS_PDL_T, None)})
    for shape in ((128, 1, 16384, True), (128, 1, 16384, False), (128, 1, 4096, True), (128, 4, 16384, True),
                  (128, 32, 16384, True), (64, 8, 16384, True))
]

OW_VARIANTS = {  # the one-row 128-head default: the load warp's first loads ordered, reduction blocks and warps, PDL
    "default": (None, None), "tile0_alone": (replace(OW, first_tile_alone=True), None),
    "q_first": (replace(OW, q_first=True), None), "both": (replace(OW, first_tile_alone=True, q_first=True), None),
    "pdl": (replace(OW, pdl=True), None), "tile0_alone_pdl": (replace(OW, first_tile_alone=True, pdl=True), None),
    **{f"red{h}x{c}_w{w}": (replace(OW, reduce_h=h, reduce_c=c, reduce_warps=w), None)
       for h, c, w in ((1, 128, 4), (1, 32, 4), (2, 64, 4), (1, 64, 1), (1, 64, 2), (1, 32, 1), (1, 32, 2),
                       (1, 128, 2), (1, 128, 8), (2, 128, 8))}}
PROLOGUE = [  # --prologue: OW_VARIANTS at one row; the same knobs on the 4-row default and the 16-head one-row one
    *[(shape, OW_VARIANTS) for shape in ((128, 1, 16384, True), (128, 1, 4096, True), (128, 1, 16384, False))],
    ((128, 4, 16384, True), {"default": (None, None), "tile0_alone": (replace(WS, first_tile_alone=True), None),
                             "w2": (replace(WS, reduce_warps=2), None), "w8": (replace(WS, reduce_warps=8), None)}),
    ((16, 1, 16384, True), {"default": (None, None), "w1": (DecodeTuning(**KM, pdl=True, reduce_warps=1), None),
                            "w2": (DecodeTuning(**KM, pdl=True, reduce_warps=2), None)}),
]

W = {f"w{w}": {"reduce_warps": w} for w in (1, 2)}    # fields over the shape's default tuning (decode_tuning_for)
OW1 = replace(OW, reduce_warps=1)
REDUCE_WARPS = [  # --reduce-warps: split reduction programs of 1 and 2 warps on every few-row shape; the one-row
    # 128-head default's reduction blocks at 1 warp, with the first tile alone and PDL; bf16 TMA partials at 4 rows
    ((128, 1, 16384, True), {"default": (None, None), "w1": (OW1, None),
                             "w1_t0": (replace(OW1, first_tile_alone=True), None),
                             "w1_t0_pdl": (replace(OW1, first_tile_alone=True, pdl=True), None),
                             **{f"w1_red{h}x{c}": (replace(OW1, reduce_h=h, reduce_c=c), None)
                                for h, c in ((1, 32), (1, 128), (2, 64), (1, 256))}}),
    ((128, 1, 4096, True), {"default": (None, None), "w1": (OW1, None),
                            "w1_t0": (replace(OW1, first_tile_alone=True), None),
                            "w1_t0_pdl": (replace(OW1, first_tile_alone=True, pdl=True), None),
                            "w1_red1x128": (replace(OW1, reduce_c=128, reduce_h=1), None)}),
    ((128, 4, 16384, True), {"default": (None, None), **{n: (f, None) for n, f in W.items()},
                             "ow_w1": (OW1, None), "ow_w1_t0": (replace(OW1, first_tile_alone=True), None)}),
    *[(shape, {"default": (None, None), **{n: (f, None) for n, f in W.items()}})
      for shape in ((16, 1, 16384, True), (16, 1, 4096, True), (16, 4, 16384, True), (16, 32, 16384, True),
                    (16, 128, 16384, True), (128, 32, 16384, True), (64, 8, 16384, True))],
]

FEW_OLD = {  # the defaults before runs 215-216: one row bf16 TMA partials, more rows WGMMA; 4-warp reductions
    1: replace(OW, first_tile_alone=False, pdl=False, reduce_warps=4), "more": replace(WS, reduce_warps=4)}


def few_rows_cases(heads: int, shapes: tuple) -> list:
    """The few-row defaults against the old ones, and the few-row tuning (with and without PDL) past FEW_ROWS."""
    return [((heads, r, ctx, True), {"default": (None, None), "old": (FEW_OLD[1] if r == 1 and heads >= 128
                                                                      else FEW_OLD["more"], None),
                                     "few": (replace(OW, pdl=False), None), "few_pdl": (OW, None),
                                     "ws_w1": (WS, None)}) for r, ctx in shapes]


FEW_ROWS_CASES = (few_rows_cases(128, ((1, 16384), (2, 16384), (4, 16384), (8, 16384), (16, 16384), (1, 4096),
                                       (4, 4096)))
                  + [((16, 1, 16384, True), {"default": (None, None), "old": ({"reduce_warps": 4}, None)})])
FEW_ROWS_64 = few_rows_cases(64, ((1, 16384), (4, 16384), (8, 16384), (1, 4096)))   # --few-rows-64: a 64-head shard


def make(heads: int, rows: int, ctx: int, paged: bool):
    g = torch.Generator(device="cuda").manual_seed(heads * 1000 + rows)
    kv = torch.randn(rows, ctx, DC, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(rows, heads, DC, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((rows,), ctx, dtype=torch.int32, device="cuda")
    if not paged:
        return q, kv, lens, None
    m = ctx // PAGE
    perm = torch.randperm(rows * m, device="cuda", generator=g)
    pages = torch.empty(rows * m, PAGE, DC, device="cuda", dtype=torch.bfloat16)
    pages[perm] = kv.reshape(rows * m, PAGE, DC)
    return q, pages, lens, perm.reshape(rows, m).int()


def kernel_times(graph, reps: int = 20) -> dict:
    """Mean GPU us per replay of each kernel, and of the span first start -> last end, from the profiler; the L2
    flushed before each replay the way do_bench does (256 MB zeroed), so the breakdown is the timed calls' (replays
    back to back keep the cache and the partials in L2: bench/results/mla_notes.md, run 145)."""
    from torch.profiler import ProfilerActivity, profile

    buf = torch.empty(1 << 26, dtype=torch.int32, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as flush_prof:
        buf.zero_()
        torch.cuda.synchronize()
    flush_kernels = {e.name for e in flush_prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            buf.zero_()
            graph.replay()
            torch.cuda.synchronize()
    events = [e for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0
              and e.name not in flush_kernels]
    events.sort(key=lambda e: e.time_range.start)
    per: dict = {}
    for e in events:
        per.setdefault(e.name[:60], []).append(e.time_range.elapsed_us())
    out = {k: round(sum(v) / reps, 2) for k, v in per.items()}
    n = len(events) // reps if reps else 0
    if n:
        spans = [events[i * n + n - 1].time_range.end - events[i * n].time_range.start for i in range(reps)]
        out["span_first_start_to_last_end"] = round(statistics.median(spans), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mla_small_probe.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=int, default=20)
    sets = {  # flag -> (case list, help); none given: SHAPES
        "one_row": (ONE_ROW, "the one-row split and reduction sweep"),
        "partials": (PARTIALS, "float32 against bf16 split partials"),
        "partials_one_row": (PARTIALS_ONE_ROW, "bf16 partials' reduction blocks, one row"),
        "pdl": (PDL, "the reduction with and without PDL"),
        "wgmma": (WGMMA, "the Gluon wgmma stage 1 against the Triton kernels"),
        "wgmma_splits": (WGMMA_SPLITS, "the wgmma stage 1's split counts, bf16 partials"),
        "ws_partials": (WS_PARTIALS, "bf16 partials behind the warp-specialised stage 1"),
        "ws_pdl": (WS_PDL, "the reduction with PDL behind the warp-specialised stage 1"),
        "prologue": (PROLOGUE, "the one-row 128-head default's load order and reduction"),
        "reduce_warps": (REDUCE_WARPS, "the split reduction's warps on few-row shapes"),
        "few_rows": (FEW_ROWS_CASES, "the few-row defaults against the old ones"),
        "few_rows_64": (FEW_ROWS_64, "the same at 64 heads"),
    }
    for flag, (_, text) in sets.items():
        ap.add_argument("--" + flag.replace("_", "-"), action="store_true", help=text)
    args = ap.parse_args()
    x = torch.zeros(1, device="cuda")
    floor = capture_graph(lambda: x.add_(1).mul_(1))     # two one-element kernels: what any 2-kernel replay costs
    floor_us = triton.testing.do_bench(floor.replay, warmup=5, rep=args.rep_ms, return_mode="median") * 1e3
    print(f"two-kernel graph replay: {floor_us:.2f} us", flush=True)
    results = [{"two_kernel_graph_us": round(floor_us, 2)}]
    chosen = [flag for flag in sets if getattr(args, flag)]
    cases = sets[chosen[0]][0] if chosen else SHAPES
    every = bool(chosen) and chosen[0] in ("prologue", "reduce_warps", "few_rows", "few_rows_64")   # every kernel
    for (heads, rows, ctx, paged), variants in cases:
        q, kv, lens, table = make(heads, rows, ctx, paged)
        want = mla_decode(q, kv, lens, C, SCALE, block_table=table)
        graphs, rec = {}, {"heads": heads, "rows": rows, "context": ctx, "paged": paged, "variants": {}}
        for name, (tuning, splits) in variants.items():
            if isinstance(tuning, dict):   # fields over what mla_decode picks for this shape
                tuning = replace(decode_tuning_for(q, kv, C), **tuning)
            elif tuning == "input_dtype_partials":  # the default tuning of this shape with bf16 partials
                tuning = replace(default_tuning(heads, rows), input_dtype_partials=True)
            elif tuning == "tl":      # what the default was before the wgmma kernel
                tuning = default_tuning(heads, rows)
            elif tuning in ("pdl_on", "pdl_off"):
                tuning = replace(default_tuning(heads, rows), pdl=tuning == "pdl_on")
            def fn(tuning=tuning, splits=splits, q=q, kv=kv, lens=lens, table=table):
                return mla_decode(q, kv, lens, C, SCALE, block_table=table, num_splits=splits, tuning=tuning)
            try:
                err = float((fn().double() - want.double()).norm() / want.double().norm())
                graphs[name] = capture_graph(fn)
            except Exception as e:  # noqa: BLE001 - a tuning Triton cannot compile is a result here
                rec["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}", "us": []}
                continue
            rec["variants"][name] = {"rel_err_vs_default": round(err, 5), "us": []}
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                us = triton.testing.do_bench(graph.replay, warmup=5, rep=args.rep_ms, return_mode="median") * 1e3
                rec["variants"][name]["us"].append(round(us, 2))
        for v in rec["variants"].values():
            if v["us"]:
                v["median_us"] = round(statistics.median(v["us"]), 2)
        named = ("default", "tl", "wg", "no_pdl", "km_plain", "bf16_partials", "bf16_red1x32", "bf16_red1x64",
                 "ws_bf16_red0x0", "ws_bf16_red1x64", "ws_pdl")
        rec["kernels"] = {name: kernel_times(graphs[name]) for name in (graphs if every else named)
                          if name in graphs}
        results.append(rec)
        print(json.dumps(rec), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rounds": args.rounds, "shapes": results}, f, indent=1)
        del graphs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
