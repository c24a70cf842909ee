"""One GPU: where the expert FFN's time goes at prefill sizes, DeepGEMM's masked layout there, and `bmm`
against `loop` where the ranking grid had them within 3%.

    DG_PRINT_CONFIGS=1 python bench/gpu/ffn_layout_probe.py --json out.json [--rounds 3]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8, uniform routing. Per (E, T) of --cases:
- `triton`: the bench's row (fused_moe_aligned with the alignment made ahead, then the k-sum);
- `deepgemm`: deepgemm_fused_moe with the alignment made ahead (the bench's row, layout "auto"), and
  `dg_contiguous` / `dg_masked` / `dg_bounded` the same in each layout of kernels/deepgemm_layout.py (checked
  against each other and triton); `dg_gemms` the two contiguous GEMMs and silu_mul alone (every expert padded
  to 128 rows);
- `permute_padded` / `permute_live`: the masked layout's permute writing every padding row, or only the live
  rows (the package's way); `dg_masked_padded`: the masked FFN with the former; `dg_bounded_one_group`: the
  bounded layout with all experts in one group whatever its buffers' bytes (`dg_bounded` groups them past
  BOUNDED_MAX_BYTES);
- `dg_masked_gemms`: the same GEMMs and silu_mul in DeepGEMM's masked layout [E, cap, H] (cap the largest count
  rounded up to 128, expected_m = N / E), built untimed; its live rows are checked against dg_gemms'.
Per (E, T) of --bmm-cases: the package's `bmm` and `loop` backends on the pairs sorted by expert (untimed
sort), and `bmm_chunked`, bmm with the torch activation it had before (float32 chunks over every row).
Timings are do_bench medians (L2 flushed) over interleaved rounds; a torch.profiler pass gives each variant's
kernels (us per call); the ceilings are measured before and after.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, N = T * k pairs, cap rows per expert.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels import deepgemm, deepgemm_layout  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_capacity import with_capacity  # noqa: E402
from nanomoe_kernels.moe_permute import permute_rows  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

import nanomoe_fn.moe.experts as experts_mod  # noqa: E402
from bench.common import measure_ceilings  # noqa: E402
from bench.expert_ffn_variants import package_variant  # noqa: E402

K_TOP, H, I = 8, 7168, 2048
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run (--dims, TRITON_INTERPRET=1)


def cuda_events(fn, calls: int) -> list:
    """The CUDA kernels of `calls` calls of fn in launch order (torch.profiler events, after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def kernel_breakdown(fn, calls: int = 3) -> dict[str, float]:
    """us per call of each CUDA kernel `fn` launches (torch.profiler over `calls` calls after a warm-up)."""
    acc: dict[str, float] = collections.defaultdict(float)
    for ev in cuda_events(fn, calls):
        acc[ev.name[:90]] += ev.device_time / calls
    return {k: round(v, 1) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def kernel_sequence(fn, calls: int = 3) -> list[list]:
    """[[kernel name, us], ...] of one call of fn in launch order, each the mean over `calls` profiled calls."""
    evs = cuda_events(fn, calls)
    n = len(evs) // calls
    return [[evs[i].name[:60], round(sum(evs[i + c * n].device_time for c in range(calls)) / calls, 1)]
            for i in range(n)]


def masked_inputs(x: torch.Tensor, ids: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(xm [E, cap, H] with expert e's rows in pair order, counts [E] int32, cap), built with torch ops."""
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    cap = -(-int(counts.max()) // 128) * 128
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel(), device=x.device) - offsets[flat[order]]
    xm = x.new_zeros((E, cap, x.shape[1]))
    xm[flat[order], slot] = x[order // K_TOP]
    return xm, counts.to(torch.int32), cap


def ffn_case(E: int, T: int, rounds: int, rep_ms: int) -> dict:
    dev = torch.device(DEV)
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, DEV)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, DEV)
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K_TOP, dev)
    al = moe_align(ids, E, bm)
    row_w = tw.reshape(-1).contiguous()
    fns = {"triton": lambda: sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K_TOP,
                                                         row_weights=row_w), K_TOP)}
    rec: dict = {"E": E, "T": T, "configs": {"up": first, "down": down}}
    ok, why = deepgemm.supports(x, w)
    if ok:
        al_dg = moe_align(ids, E, deepgemm.alignment())
        a, m_idx = permute_rows(x, al_dg, a_div=K_TOP)
        xm, counts, cap = masked_inputs(x, ids, E)
        expected = max(1, T * K_TOP // E)
        fns["deepgemm"] = lambda: deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al_dg)
        for layout in ("contiguous", "masked", "bounded"):
            fns[f"dg_{layout}"] = functools.partial(deepgemm.deepgemm_fused_moe, x, ids, tw, w, align=al_dg,
                                                    layout=layout)
        # the masked layout's permute writing every padding row (as before the live counts) against live rows only
        cap_m = -(-int(al_dg.padded_counts.max()) // 128) * 128
        mal, live = with_capacity(al_dg, cap_m)
        fns["permute_padded"] = lambda: permute_rows(x, mal, a_div=K_TOP, capacity=cap_m)
        fns["permute_live"] = lambda: permute_rows(x, mal, a_div=K_TOP, capacity=cap_m, live=live)
        fns["dg_masked_padded"] = functools.partial(_padded_permute, deepgemm.deepgemm_fused_moe, x, ids, tw, w,
                                                    align=al_dg, layout="masked")
        fns["dg_bounded_one_group"] = functools.partial(_one_group, deepgemm.deepgemm_fused_moe, x, ids, tw, w,
                                                        align=al_dg, layout="bounded")
        fns["dg_gemms"] = lambda: deepgemm.deepgemm_grouped_ffn(a, m_idx, *w)
        fns["dg_masked_gemms"] = lambda: deepgemm.deepgemm_moe_masked(xm, counts, w, expected_m=expected)
        # the masked rows against the contiguous rows of the same pairs: both keep pair order within an expert
        ym, yc = fns["dg_masked_gemms"](), fns["dg_gemms"]()
        live_m = torch.cat([ym[e, :n] for e, n in enumerate(counts.tolist())])
        live_c = yc[m_idx >= 0]
        rec["masked_vs_contiguous_rel"] = float((live_m.double() - live_c.double()).norm() / live_c.double().norm())
        whole = {n: fns[n]().double() for n in ("dg_contiguous", "dg_masked", "dg_bounded", "dg_masked_padded",
                                                 "dg_bounded_one_group", "triton")}
        base = whole["dg_contiguous"]
        rec["layouts_vs_contiguous_rel"] = {n: float((v - base).norm() / base.norm()) for n, v in whole.items()}
        assert max(rec["layouts_vs_contiguous_rel"].values()) < 2e-2, rec["layouts_vs_contiguous_rel"]
        rec["rows"] = {"pairs": T * K_TOP, "contiguous_padded": int(((counts + 127) // 128 * 128).sum()),
                       "masked_cap": cap,
                       "max_count": int(counts.max()), "min_count": int(counts.min())}
    else:
        rec["deepgemm_skipped"] = why
    return _time(rec, fns, rounds, rep_ms, flops=2 * T * K_TOP * 3 * H * I)


def _padded_permute(fn, *args, **kwargs) -> torch.Tensor:
    """fn(*args, **kwargs) with kernels/deepgemm's permute_rows writing every padding row (live dropped)."""
    def padded(*a, live=None, **kw):
        return permute_rows(*a, **kw)

    deepgemm.permute_rows = padded
    try:
        return fn(*args, **kwargs)
    finally:
        deepgemm.permute_rows = permute_rows


def _one_group(fn, *args, **kwargs) -> torch.Tensor:
    """fn(*args, **kwargs) with the bounded layout's experts in one group whatever its buffers' bytes."""
    keep = deepgemm_layout.BOUNDED_MAX_BYTES
    deepgemm_layout.BOUNDED_MAX_BYTES = 1 << 50
    try:
        return fn(*args, **kwargs)
    finally:
        deepgemm_layout.BOUNDED_MAX_BYTES = keep


def bmm_case(E: int, T: int, rounds: int, rep_ms: int) -> dict:
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, DEV)
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, DEV)
    fns = {name: package_variant(x, ids, tw, w, name) for name in ("bmm", "loop")}
    new = experts_mod._swiglu_padded

    def old_act(h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # the activation bmm had before
        P, C, _ = h.shape
        return experts_mod._swiglu_chunked(h.view(P * C, -1)).view(P, C, -1)

    def chunked() -> torch.Tensor:
        experts_mod._swiglu_padded = old_act
        try:
            return fns["bmm"]()
        finally:
            experts_mod._swiglu_padded = new

    fns["bmm_chunked"] = chunked
    want = fns["loop"]().double()
    rec = {"E": E, "T": T, "rel_vs_loop": {n: float((fns[n]().double() - want).norm() / want.norm())
                                           for n in ("bmm", "bmm_chunked")}}
    return _time(rec, fns, rounds, rep_ms, flops=2 * T * K_TOP * 3 * H * I)


def _bench_ms(fn, rep_ms: int) -> float:
    if DEV == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _time(rec: dict, fns: dict, rounds: int, rep_ms: int, flops: int) -> dict:
    us: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            us[name].append(round(_bench_ms(fn, rep_ms) * 1e3, 1))
    rec["us"] = us
    rec["median_us"] = {n: statistics.median(v) for n, v in us.items()}
    rec["tflops"] = {n: round(flops / (v * 1e-6) / 1e12, 1) for n, v in rec["median_us"].items()}
    rec["kernels_us"] = {n: kernel_breakdown(fn) for n, fn in fns.items()} if DEV == "cuda" else {}
    print(json.dumps({k: rec[k] for k in ("E", "T", "median_us", "tflops")}), flush=True)
    for n, k in rec["kernels_us"].items():
        print(n, json.dumps(dict(list(k.items())[:6])), flush=True)
    return rec


def _pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_layout_probe.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=120)
    ap.add_argument("--cases", default="32x1024,32x4096,128x1024,256x4096", help="ExT for the FFN variants")
    ap.add_argument("--bmm-cases", default="32x4096,128x16384", help="ExT for bmm against loop")
    ap.add_argument("--dims", default="", help="H,I instead of DeepSeek-V3's (a CPU smoke run)")
    ap.add_argument("--host", default="", help="ExT cases: only the host probe of deepgemm_fused_moe's layouts")
    a = ap.parse_args()
    global H, I
    if a.dims:
        H, I = (int(v) for v in a.dims.split(","))
    dev = torch.device(DEV)
    if a.host:
        res = host_probe(os.path.dirname(os.path.abspath(a.json)), _pairs(a.host))
        with open(a.json, "w") as f:
            json.dump({"bench": "ffn_layout_host_probe", "cases": res}, f, indent=1)
        return
    out = {"bench": "ffn_layout_probe", "torch": torch.__version__, "triton": triton.__version__, "H": H, "I": I,
           "ceilings_before": measure_ceilings(dev, torch.bfloat16), "ffn": [], "bmm": []}
    print(json.dumps(out["ceilings_before"]), flush=True)
    for E, T in _pairs(a.cases):
        out["ffn"].append(ffn_case(E, T, a.rounds, a.rep_ms))
        torch.cuda.empty_cache()
    for E, T in _pairs(a.bmm_cases):
        out["bmm"].append(bmm_case(E, T, a.rounds, a.rep_ms))
        torch.cuda.empty_cache()
    out["ceilings_after"] = measure_ceilings(dev, torch.bfloat16)
    print(json.dumps(out["ceilings_after"]), flush=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)



def host_probe(out_dir: str, cases: list[tuple[int, int]]) -> dict:
    """deepgemm_fused_moe in each layout: do_bench median, host us per call (synchronised around it), and a
    torch.profiler table (CPU and CUDA) plus a chrome trace per case in out_dir."""
    res = {}
    for E, T in cases:
        w = make_weights(E, H, I, "swiglu", torch.bfloat16, DEV)
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        ids, tw = make_routing(T, E, K_TOP, DEV)
        al = moe_align(ids, E, deepgemm.alignment())
        for layout in ("contiguous", "masked", "bounded"):
            fn = functools.partial(deepgemm.deepgemm_fused_moe, x, ids, tw, w, align=al, layout=layout)
            fn()
            torch.cuda.synchronize()
            host = []
            for _ in range(10):
                t0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            name = f"E{E}_T{T}_{layout}"
            prof.export_chrome_trace(os.path.join(out_dir, f"trace_{name}.json"))
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            res[name] = {"do_bench_us": round(_bench_ms(fn, 120) * 1e3, 1), "host_us": statistics.median(host),
                         "cuda_us": kernel_breakdown(fn)}
            print(name, json.dumps({k: v for k, v in res[name].items() if k != "cuda_us"}), flush=True)
            print(table, flush=True)
    return res


if __name__ == "__main__":
    main()
