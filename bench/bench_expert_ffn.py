"""Expert-FFN kernel bench: the whole routed-expert FFN of one MoE layer on one GPU, per backend.

    python bench/bench_expert_ffn.py --quick --json bench/results/expert_ffn_h200.json

Dimension legend: T tokens, k top-k, E local experts, H hidden, I intermediate, R aligned rows.

Each case is gate/up GEMM + silu(gate) * up + down GEMM + top-k weighted sum into [T, H] (SwiGLU;
--seed-shape adds the seed's linear experts: E=256, H=2048, T=128), with routing drawn uniformly
(k distinct experts per token). As in ANCHORS.md, rows arrive already sorted/aligned (setup, not
timed) for every variant; the `triton+align` row also times the align step (kernels.moe_align).
Variants: `triton` (kernels.fused_moe), `deepgemm` (kernels.deepgemm, contiguous, torch glue),
`bmm` (padded [E, cap, H] torch.bmm, written here as the baseline). Every variant is checked against
a float32 reference on sampled tokens before timing. Floors: weight bytes of the experts hit over the
measured copy bandwidth, FLOPs over the measured bf16 matmul rate (both measured in this run);
`roofline` = floor / median. phase = decode when rows per expert (T*k/E) <= 64, else prefill.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nanomoe_kernels import deepgemm  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_aligned, stage_configs  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights, reference_rows  # noqa: E402

from bench.common import measure_ceilings, write_record  # noqa: E402

QUICK_TOKENS = (64, 256, 1024, 4096)
FULL_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
FULL_EXPERTS = (256, 128, 64, 32)


def sorted_layout(ids: torch.Tensor, E: int,
                  align_m: int) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor, int]:
    """Setup for the torch-glue variants (host work, untimed): (slot of each (token, k) pair within its
    expert [T*k], counts [E] host list, padded position of each pair [T*k], m_indices [R] int32 with
    -1 on padding, R) for experts padded to multiples of align_m."""
    flat = ids.reshape(-1).long().cpu()
    order = torch.sort(flat, stable=True).indices
    counts_t = torch.bincount(flat, minlength=E)
    padded = (counts_t + align_m - 1) // align_m * align_m
    starts = torch.cumsum(padded, 0) - padded
    offsets = torch.cumsum(counts_t, 0) - counts_t
    e_sorted = flat[order]
    rank = torch.arange(flat.numel()) - offsets[e_sorted]
    slot = torch.empty_like(flat)
    slot[order] = rank
    pos = starts[flat] + slot
    R = max(int(padded.sum()), align_m)
    m_idx = torch.full((R,), -1, dtype=torch.int32)
    m_idx[pos] = flat.to(torch.int32)
    dev = ids.device
    return slot.to(dev), counts_t.tolist(), pos.to(dev), m_idx.to(dev), R


def build_variants(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
                   expert_type: str, names: list[str]) -> dict[str, Callable[[], torch.Tensor]]:
    """{variant: zero-argument fn -> [T, H_out]}; setup (alignment, padding) runs here, untimed."""
    T, H = x.shape
    k, E = ids.shape[1], weights[0].shape[0]
    H_out = weights[-1].shape[1]
    I = weights[0].shape[1] // 2
    fns = {}
    if "triton" in names:
        first, down, bm = stage_configs(None, expert_type, E, H, I, H_out, x.dtype, T * k, x.device)
        al = moe_align(ids, E, bm)
        row_w = tw.reshape(-1).contiguous()

        def triton_fn():
            pairs = fused_moe_aligned(x, al, weights, expert_type, first, down, a_div=k, row_weights=row_w)
            return pairs.view(T, k, H_out).sum(1)

        fns["triton"] = triton_fn
        fns["triton+align"] = lambda: fused_moe(x, ids, tw, weights, expert_type)
    wk = tw.to(x.dtype).reshape(T, k, 1)
    if "deepgemm" in names and expert_type == "swiglu":
        ok, why = deepgemm.supports(x, weights)
        if not ok:
            print(f"  deepgemm skipped: {why}")
        else:
            _, _, pos, m_idx, R = sorted_layout(ids, E, deepgemm.alignment())
            a = x.new_zeros((R, H))
            a[pos] = x.repeat_interleave(k, 0)
            fns["deepgemm"] = lambda: (deepgemm.deepgemm_grouped_ffn(a, m_idx, *weights).index_select(0, pos)
                                       .view(T, k, H_out) * wk).sum(1)
    if "bmm" in names:
        slot, counts, _, _, _ = sorted_layout(ids, E, 1)
        cap = max(max(counts), 1)
        flat_e = ids.reshape(-1).long()
        xp = x.new_zeros((E, cap, H))
        xp[flat_e, slot] = x.repeat_interleave(k, 0)
        w_t = [w.transpose(1, 2) for w in weights]

        def bmm_fn():
            if expert_type == "linear":
                y = torch.bmm(xp, w_t[0])
            else:
                gate, up = torch.bmm(xp, w_t[0]).float().chunk(2, dim=-1)
                y = torch.bmm((F.silu(gate) * up).to(x.dtype), w_t[1])
            return (y[flat_e, slot].view(T, k, H_out) * wk).sum(1)

        fns["bmm"] = bmm_fn
    return fns


def run_case(E: int, T: int, k: int, H: int, I: int, expert_type: str, weights: tuple[torch.Tensor, ...],
             names: list[str], ceilings: dict, warm_only: bool, check_tokens: int = 6) -> list[dict]:
    """Rows of the JSON for one (E, T): check each variant, then time it (median of do_bench)."""
    import triton.testing

    dev = weights[0].device
    x = torch.randn(T, H, device=dev, dtype=weights[0].dtype)
    ids, tw = make_routing(T, E, k, str(dev), seed=T)
    fns = build_variants(x, ids, tw, weights, expert_type, names)
    sample = torch.linspace(0, T - 1, min(check_tokens, T), device=dev).long().unique()
    ref = None if warm_only else reference_rows(x, ids, tw, weights, expert_type, sample)
    hit = int(torch.unique(ids).numel())
    per_expert = sum(w[0].numel() for w in weights) * weights[0].element_size()
    wbytes = hit * per_expert
    flops = 2 * T * k * sum(w[0].numel() for w in weights)
    rows = []
    for name, fn in fns.items():
        out = fn()
        if warm_only:
            continue
        err = float((out[sample].float() - ref).norm() / ref.norm())
        ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        sec = ms * 1e-3
        floor = max(wbytes / (ceilings["hbm_gbps"] * 1e9), flops / (ceilings["bf16_tflops"] * 1e12))
        rows.append({
            "case": {"phase": "decode" if T * k <= 64 * E else "prefill", "tokens": T, "experts": E,
                     "top_k": k, "hidden": H, "intermediate": I if expert_type == "swiglu" else None,
                     "expert_type": expert_type, "dtype": str(x.dtype).replace("torch.", "")},
            "variant": name, "median_us": round(ms * 1e3, 1), "gbps": round(wbytes / sec / 1e9, 1),
            "tflops": round(flops / sec / 1e12, 2), "roofline": round(floor / sec, 3),
            "floor_us": round(floor * 1e6, 1), "check_rel_err": round(err, 5), "ok": err < 2e-2,
        })
        r = rows[-1]
        if name.startswith("triton"):
            first, down, _ = stage_configs(None, expert_type, E, H, I, weights[-1].shape[1], x.dtype, T * k,
                                           dev)
            r["config"] = {"up" if expert_type == "swiglu" else "linear": first, "down": down}
        print(f"  E={E:3d} T={T:5d} {name:13s} {r['median_us']:9.1f} us  {r['tflops']:7.1f} TFLOP/s "
              f"{r['gbps']:7.1f} GB/s  roofline {r['roofline']:.3f}  err {err:.1e}"
              f"{'' if r['ok'] else ' BAD'}")
    for r in rows:
        vs = {o["variant"]: round(o["median_us"] / r["median_us"], 3) for o in rows
              if o["variant"] in ("bmm", "deepgemm") and o is not r}
        if vs:
            r["speedup_vs"] = vs
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the bench; returns the JSON rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="E=32, T in 64/256/1024/4096 (the issue's sizes)")
    p.add_argument("--experts", type=int, nargs="*", default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--variants", default="triton,deepgemm,bmm")
    p.add_argument("--seed-shape", action="store_true",
                   help="also the seed's linear experts (E=256, H=2048, T=128)")
    p.add_argument("--warm-only", action="store_true", help="run each variant once (JIT warm-up), no timing")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run under TRITON_INTERPRET=1")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_expert_ffn needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    names = args.variants.split(",")
    experts = args.experts or ((32,) if args.quick else FULL_EXPERTS)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    ceilings = {} if args.warm_only else measure_ceilings(dev, dtype)
    print(f"ceilings: {ceilings}")
    rows = []
    torch.manual_seed(0)
    for E in experts:
        weights = make_weights(E, args.hidden, args.intermediate, "swiglu", dtype, args.device)
        for T in tokens:
            rows += run_case(E, T, args.top_k, args.hidden, args.intermediate, "swiglu", weights, names,
                             ceilings, args.warm_only)
        del weights
    if args.seed_shape:
        weights = make_weights(256, 2048, 0, "linear", dtype, args.device)
        rows += run_case(256, 128, 8, 2048, 0, "linear", weights, names, ceilings, args.warm_only)
    if args.json and not args.warm_only:
        write_record(args.json, "expert_ffn", dev, 1, ceilings, rows)
    print(f"{'E':>4} {'T':>6} {'variant':14s} {'us':>9} {'roofline':>8}")
    for r in rows:
        c = r["case"]
        print(f"{c['experts']:4d} {c['tokens']:6d} {r['variant']:14s} {r['median_us']:9.1f} "
              f"{r['roofline']:8.3f}")
    return rows


if __name__ == "__main__":
    main()
