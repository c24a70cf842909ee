"""One GPU: is the Triton expert FFN slower after DeepGEMM ran in the same process, and why?

    python bench/gpu/ffn_interference_probe.py [--json PATH]         (timings, do_bench medians)
    ncu --profile-from-start off --metrics ... python bench/gpu/ffn_interference_probe.py --profile
                                                                      (counters of triton, deepgemm, triton)

bench_expert_ffn.py --ranking at 128 experts x 4096 tokens read `triton` 6691 us with `deepgemm` among the
variants and 6129 us without it (run 179), the same in every round whatever ran just before. Here the same
`triton` call (V3 dims, top-8, routing seed T) is timed in three of the ranking's windows after each change
of the process's state, in the order the ranking makes them: alone, after `bmm` is built and timed, after
DeepGEMM's variant is built and called once, after it is timed, after the allocator cache is emptied, after
DeepGEMM's variant is freed and after 2 GiB are held; each timing carries the GPU's temperature, SM clock and
power (nvidia-smi) and the allocator's reserved memory. With --variants the ranking's own sequence runs instead
(build_variants, one call of each, interleaved rounds), with this probe's triton call timed among the variants.
With --profile, one triton call, one deepgemm call and
one triton call again run inside cudaProfilerStart/Stop, so Nsight Compute (clocks locked) can compare the two
triton calls' DRAM bytes and time.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from collections.abc import Callable

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

E, T, K, H, I = 128, 4096, 8, 7168, 2048


def gpu_now() -> dict:
    """Temperature, SM clock, power (nvidia-smi) and the allocator's reserved GiB, for each timing."""
    from bench.bench_expert_ffn import gpu_state

    return {**(gpu_state() or {}), "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2)}


def window_us(fn: Callable[[], object], n: int = 3) -> list[float]:
    """n do_bench medians of fn (warm-up 25 ms, 100 ms windows: the ranking's), in us."""
    return [round(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3, 1) for _ in range(n)]


def steps(tri: Callable[[], torch.Tensor], x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor,
          w: tuple[torch.Tensor, ...]) -> list[dict]:
    """Time `tri` after each change of the process's state, in the order the ranking makes them."""
    from nanomoe_kernels import deepgemm

    from bench.expert_ffn_variants import package_variant

    held: dict[str, object] = {}
    out: list[dict] = []

    def timed(label: str) -> None:
        before = gpu_now()
        us = window_us(tri)
        ptr = tri().data_ptr()
        out.append({"after": label, "triton_us": us, "median_us": statistics.median(us), "gpu_before": before,
                    "gpu_after": gpu_now(), "out_ptr_gib": round(ptr / 2**30, 3)})
        print(f"{label:44s} {statistics.median(us):8.1f} us {us} {out[-1]['gpu_after']}", flush=True)

    def bmm_windows() -> None:
        held["bmm"] = package_variant(x, ids, tw, w, "bmm")
        held["bmm_us"] = window_us(held["bmm"])
        out.append({"bmm_us": held["bmm_us"]})

    def dg_built() -> None:
        al = moe_align(ids, E, deepgemm.alignment())
        held["dg"] = lambda: deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al)
        held["dg"]()
        torch.cuda.synchronize()

    def dg_windows() -> None:
        out.append({"deepgemm_us": window_us(held["dg"])})

    def dg_freed() -> None:
        held.pop("dg")
        gc.collect()
        torch.cuda.empty_cache()

    def hold_2gib() -> None:
        torch.cuda.empty_cache()
        held["pad"] = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")

    timed("alone")
    for label, act in (("bmm built and timed (3 windows)", bmm_windows), ("deepgemm built, one call", dg_built),
                       ("deepgemm timed (3 windows)", dg_windows), ("torch.cuda.empty_cache()", torch.cuda.empty_cache),
                       ("deepgemm timed again", dg_windows), ("deepgemm freed, empty_cache", dg_freed),
                       ("empty_cache, then 2 GiB held", hold_2gib)):
        act()
        timed(label)
    return out


def scenario(names: list[str], reverse: bool, tri: Callable[[], torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
             tw: torch.Tensor, w: tuple[torch.Tensor, ...], rounds: int = 3) -> dict:
    """The ranking's own sequence: bench/expert_ffn_variants.build_variants(names), each variant called once (the
    check; in reverse order with reverse), then `rounds` rounds of one window per variant, each round starting one
    variant later; `triton_probe` (this probe's own triton call, built before the others) is timed among them."""
    from bench.expert_ffn_variants import build_variants

    fns = {"triton_probe": tri, **build_variants(x, ids, tw, w, "swiglu", names).fns}
    for name in (reversed(list(fns)) if reverse else fns):
        fns[name]()
    torch.cuda.synchronize()
    order, times, states = list(fns), {n: [] for n in fns}, {n: [] for n in fns}
    for rnd in range(rounds):
        for name in order[rnd % len(order):] + order[:rnd % len(order)]:
            before = gpu_now()
            times[name] += window_us(fns[name], 1)
            states[name].append({"before": before, "after": gpu_now()})
    for name in order:
        print(f"{name:14s} {statistics.median(times[name]):8.1f} us {times[name]}", flush=True)
    stats = torch.cuda.memory_stats()
    return {"variants": names, "checks_reversed": reverse, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "median_us": {n: statistics.median(t) for n, t in times.items()}, "rounds_us": times,
            "window_gpu_state": states, "segments": stats.get("segment.all.current"),
            "reserved_gib": round(stats.get("reserved_bytes.all.current", 0) / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true", help="triton, deepgemm, triton inside profiler ranges")
    ap.add_argument("--json", default=None, help="where to write the record")
    ap.add_argument("--variants", default=None,
                    help="comma-separated bench variants: run the ranking's sequence with them (scenario) "
                         "instead of the steps")
    ap.add_argument("--reverse-checks", action="store_true", help="scenario: call the variants once in reverse")
    a = ap.parse_args()
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K, "cuda", seed=T)
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K, x.device)
    al, row_w = moe_align(ids, E, bm), tw.reshape(-1).contiguous()

    def tri() -> torch.Tensor:
        return sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K, row_weights=row_w), K)

    if a.profile:
        from nanomoe_kernels import deepgemm

        al_dg = moe_align(ids, E, deepgemm.alignment())

        def dg() -> torch.Tensor:
            return deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al_dg)

        tri(), dg()
        torch.cuda.synchronize()
        for fn in (tri, dg, tri):
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return
    rec = {"bench": "ffn_interference_probe", "case": {"experts": E, "tokens": T, "top_k": K, "hidden": H,
                                                       "intermediate": I}}
    if a.variants:
        rec["scenario"] = scenario(a.variants.split(","), a.reverse_checks, tri, x, ids, tw, w)
    else:
        rec["steps"] = steps(tri, x, ids, tw, w)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()
