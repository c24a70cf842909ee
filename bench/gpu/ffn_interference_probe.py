"""One GPU: is the Triton expert FFN slower after DeepGEMM ran in the same process, and why?

    python bench/gpu/ffn_interference_probe.py                       (timings, do_bench medians)
    ncu --profile-from-start off --metrics ... python bench/gpu/ffn_interference_probe.py --profile
                                                                      (counters of triton, deepgemm, triton)

bench_expert_ffn.py --ranking at 128 experts x 4096 tokens read `triton` 6691 us with `deepgemm` among the
variants and 6129 us without it (run 179). Here the same `triton` call (V3 dims, top-8, routing seed T) is timed
alone, after importing DeepGEMM, after one DeepGEMM call, after the allocator cache is emptied and after a large
cached allocation; with --profile, one triton call, one deepgemm call and one triton call again run inside
cudaProfilerStart/Stop, so Nsight Compute (clocks locked) can compare the two triton calls' DRAM bytes and time.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_kernels.fused_moe import fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

E, T, K, H, I = 128, 4096, 8, 7168, 2048


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", action="store_true", help="triton, deepgemm, triton inside profiler ranges")
    a = ap.parse_args()
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K, "cuda", seed=T)
    first, down, bm = stage_configs(None, "swiglu", E, H, I, H, x.dtype, T * K, x.device)
    al, row_w = moe_align(ids, E, bm), tw.reshape(-1).contiguous()

    def tri() -> torch.Tensor:
        return sum_pairs(fused_moe_aligned(x, al, w, "swiglu", first, down, a_div=K, row_weights=row_w), K)

    def timed(label: str) -> None:
        v = [triton.testing.do_bench(tri, warmup=25, rep=100, return_mode="median") * 1e3 for _ in range(3)]
        print(f"{label:36s} {statistics.median(v):8.1f} us {[round(t) for t in v]} reserved "
              f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB", flush=True)

    from nanomoe_kernels import deepgemm

    al_dg = moe_align(ids, E, deepgemm.alignment())

    def dg() -> torch.Tensor:
        return deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al_dg)

    if a.profile:
        tri(), dg()
        torch.cuda.synchronize()
        for fn in (tri, dg, tri):
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        return
    timed("triton alone")
    dg()
    torch.cuda.synchronize()
    timed("after one deepgemm call")
    for _ in range(20):
        dg()
    torch.cuda.synchronize()
    timed("after 20 deepgemm calls")
    torch.cuda.empty_cache()
    timed("after empty_cache")


if __name__ == "__main__":
    main()
