"""Where the FP8 expert FFN's time goes, stage by stage, on one GPU (issue 14's diagnosis; prints + JSON).

    python bench/gpu/fp8_breakdown.py --tokens 64 4096 --json /tmp/out/fp8_breakdown.json

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, R aligned rows.
For triton_fp8 and deepgemm_fp8 at DeepSeek-V3 dims (E=32, top-8): each stage alone (do_bench, median us)
with its bytes and FLOPs, next to the whole call timed eagerly and as a CUDA-graph replay; the stages are
the backends' own functions called in order on their own intermediate tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import triton.testing as tt  # noqa: E402
from nanomoe_kernels import deepgemm_fp8 as dg8  # noqa: E402
from nanomoe_kernels.fp8_glue import permute_fp8_rows, silu_mul_quant  # noqa: E402
from nanomoe_kernels.fp8_quant import quant_fp8_blocks  # noqa: E402
from nanomoe_kernels.fused_moe_fp8 import fp8_configs, fp8_ffn_aligned, fused_moe_fp8, quant_rows  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_permute import unpermute_sum  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402


def us(fn, graph: bool = False) -> float:
    """Median microseconds of fn (eager do_bench, or CUDA-graph replays)."""
    if graph:
        return 1e3 * tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return 1e3 * tt.do_bench(fn, warmup=10, rep=100, return_mode="median")


def one_case(T: int, E: int, k: int, H: int, I: int, w: tuple, dg) -> dict:
    """Each stage of both backends at T tokens."""
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=T)
    r = {"tokens": T, "experts": E}
    # triton_fp8: align, quant, the two GEMMs (fp8_ffn_aligned), the k-sum
    up, down, bm = fp8_configs(None, E, H, I, T * k, x.device)
    al = moe_align(ids, E, bm)
    xq, xs = quant_rows(x)
    row_w = tw.reshape(-1).float().contiguous()
    pairs = x.new_empty((T * k, H))
    r["triton_fp8"] = {
        "align": us(lambda: moe_align(ids, E, bm)), "quant": us(lambda: quant_rows(x)),
        "gemms": us(lambda: fp8_ffn_aligned(xq, xs, al, *w, up, down, pairs, a_div=k, row_weights=row_w)),
        "ksum": us(lambda: pairs.view(T, k, H).sum(1)),
        "whole": us(lambda: fused_moe_fp8(x, ids, tw, *w)),
        "whole_graph": us(lambda: fused_moe_fp8(x, ids, tw, *w), graph=True)}
    # deepgemm_fp8: align, quant, permute, GEMM 1, silu_mul_quant, GEMM 2, unpermute + k-sum
    A = dg8.alignment_fp8()
    al8 = moe_align(ids, E, A)
    a8, a8s, m_idx = permute_fp8_rows(xq, xs, al8, a_div=k)
    R = a8.shape[0]
    h = torch.empty((R, 2 * I), dtype=torch.bfloat16, device="cuda")
    inter, inter_s = silu_mul_quant(h.zero_(), m_indices=m_idx)
    y = torch.zeros((R, H), dtype=torch.bfloat16, device="cuda")
    r["deepgemm_fp8"] = {
        "rows_padded": R, "align": us(lambda: moe_align(ids, E, A)), "quant": us(lambda: quant_rows(x)),
        "permute": us(lambda: permute_fp8_rows(xq, xs, al8, a_div=k)),
        "gemm1": us(lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a8, a8s), (w[0], w[1]), h, m_idx)),
        "silu_mul_quant": us(lambda: silu_mul_quant(h, m_indices=m_idx)),
        "gemm2": us(lambda: dg.m_grouped_fp8_gemm_nt_contiguous((inter, inter_s), (w[2], w[3]), y, m_idx)),
        "unpermute_sum": us(lambda: unpermute_sum(y, al8, T, k, tw)),
        "whole": us(lambda: dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w)),
        "whole_graph": us(lambda: dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w), graph=True)}
    flops = 2 * T * k * 3 * H * I
    for name in ("triton_fp8", "deepgemm_fp8"):
        r[name] = {n: round(v, 1) if isinstance(v, float) else v for n, v in r[name].items()}
    r["gemm_tflops"] = {"deepgemm_gemm1": round(2 * T * k * 2 * I * H / r["deepgemm_fp8"]["gemm1"] / 1e6, 1),
                        "deepgemm_gemm2": round(2 * T * k * I * H / r["deepgemm_fp8"]["gemm2"] / 1e6, 1),
                        "triton_gemms": round(flops / r["triton_fp8"]["gemms"] / 1e6, 1)}
    return r


def main() -> None:
    """Time each stage of both FP8 backends at each token count."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 4096])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    E, k, H, I = a.experts, 8, 7168, 2048
    w13, w2 = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    w = (*quant_fp8_blocks(w13), *quant_fp8_blocks(w2))
    del w13, w2
    dg = dg8._require(torch.empty(1, H, device="cuda", dtype=torch.bfloat16), w)
    rows = []
    for T in a.tokens:
        r = one_case(T, E, k, H, I, w, dg)
        print(json.dumps(r))
        rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bench": "fp8_breakdown", "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
