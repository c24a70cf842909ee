"""The route stage at DeepSeek-V3 dims: the fused selection kernel (kernels/moe_route.py) against the torch ops
it replaces, eager (host time included) and as CUDA-graph replays (GPU time only), with the whole `route`
(the float32 router GEMM first) beside them; every timed path is first checked against the other.

    python bench/gpu/route_probe.py --json $OUT/route_probe.json
    python bench/gpu/route_probe.py --sweep --gemm --tokens 32 128 4096 --iters 20
        # + the kernel's launch shapes, and the router GEMM on tensor cores (split float32 weights)
    python bench/gpu/route_probe.py --dims --tokens 1 5      # tiny dims on the CPU (TRITON_INTERPRET=1): a smoke test

Dimension legend: T tokens, H hidden (7168), E experts (256), k (8).

Floor of the selection: read the [T, E] float32 logits and write [T, k] ids and weights, at the HBM rate measured
in the same run (the kernel is launch-bound below a few thousand tokens: ~3-5 us). Rows: per T, us per call
for select (fused / torch) and route (fused / torch), eager and graph, with the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from bench.common import capture_graph, measure_ceilings, sig, time_events, write_record  # noqa: E402
from nanomoe_fn import preset  # noqa: E402
from nanomoe_fn.batch import Routing  # noqa: E402
from nanomoe_fn.checks import check_values  # noqa: E402
from nanomoe_fn.moe.params import GateParams  # noqa: E402
from nanomoe_fn.moe.route import route, select_experts  # noqa: E402


def paths(gate: object, bias: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, cfg: object,
          gpu: bool) -> dict:
    """The timed calls: the selection alone (fused, torch) and the whole route (fused; torch on GPUs: route's
    steps with the selection forced to the torch ops)."""
    def route_torch() -> Routing:
        lg = x.float() @ gate.weight.T
        check_values(torch.isfinite(lg).all(), "router logits contain NaN/inf")
        return select_experts(lg, bias, cfg, fused=False)

    out = {"select_fused": lambda: select_experts(logits, bias, cfg, fused=True),
           "select_torch": lambda: select_experts(logits, bias, cfg, fused=False),
           "route_fused": lambda: route(gate, x, cfg)}
    return out | ({"route_torch": route_torch} if gpu else {})


def sweep(logits: torch.Tensor, bias: torch.Tensor, cfg: object, want: Routing, dev: torch.device,
          iters: int) -> dict:
    """{"BTxW": us} for block_tokens BT in 1-16 and num_warps W in 1-4 (CUDA-graph replays on GPUs), each
    checked against `want`: the same experts, weights within float32 rounding (a launch shape changes the order
    of the weight sum's additions); "BTxW_weights_maxdiff" where they are not bit-equal."""
    from nanomoe_kernels.moe_route import fused_route

    out: dict = {}
    for bt in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4):
            def fn(bt: int = bt, warps: int = warps) -> tuple:
                return fused_route(logits, bias, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.score_func,
                                   cfg.group_rule, cfg.norm_topk_prob, cfg.routed_scaling_factor, bt, warps)
            ids, w = fn()
            if not torch.equal(ids, want.topk_ids):
                bad = (ids != want.topk_ids).any(1).nonzero().flatten()[:4].tolist()
                raise SystemExit(f"block_tokens={bt} num_warps={warps}: different experts for tokens {bad}: "
                                 f"{ids[bad].tolist()} against {want.topk_ids[bad].tolist()}")
            if not torch.equal(w, want.topk_weights):
                diff = float((w - want.topk_weights).abs().max())
                if diff > 1e-6 * float(want.topk_weights.abs().max()):
                    raise SystemExit(f"block_tokens={bt} num_warps={warps}: weights off by {diff}")
                out[f"{bt}x{warps}_weights_maxdiff"] = diff
            call = capture_graph(fn)[0].replay if dev.type == "cuda" else fn
            out[f"{bt}x{warps}"] = sig(statistics.median(time_events(call, dev, 5, iters)) * 1e6)
    return out


def split_logits(x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """x [T, H] bf16 times w = sum(parts) (bf16 [E, H] each) -> float32 logits [T, E]: one bf16 GEMM per part
    with float32 output (tensor cores; each product is exact in float32). On the CPU: float32 matmuls."""
    if x.is_cuda:
        return sum(torch.mm(x, p.T, out_dtype=torch.float32) for p in parts)
    return sum(x.float() @ p.float().T for p in parts)


def gemm_row(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, cfg: object, dev: torch.device,
             iters: int) -> dict:
    """The router GEMM as float32 (cuBLAS), as three bf16 GEMMs over a hi/mid/lo split of the float32 weight
    (w = hi + mid + lo to float32's 24 bits) and as the float32 GEMM split over H (kernels/router_gemm.py): us
    per call (CUDA graphs on GPUs), the largest logit
    difference, and how many tokens' routing differs."""
    hi = w.bfloat16()
    mid = (w - hi.float()).bfloat16()
    parts = [hi, mid, (w - hi.float() - mid.float()).bfloat16()]
    xb = x.bfloat16()
    ref, got = xb.float() @ w.T, split_logits(xb, parts)
    a, b = select_experts(ref, bias, cfg), select_experts(got, bias, cfg)
    out = {"logit_max_abs_diff": sig(float((ref - got).abs().max())), "logit_max_abs": sig(float(ref.abs().max())),
           "tokens_routed_differently": int((a.topk_ids != b.topk_ids).any(1).sum())}
    from nanomoe_kernels.router_gemm import router_logits_splitk, split_bf16_parts

    from nanomoe_fn.moe.route import _split_logits

    out["splitk_max_abs_diff"] = sig(float((router_logits_splitk(xb, w) - ref).abs().max()))

    def parts_torch() -> list[torch.Tensor]:  # route's parts before run 152: five elementwise torch ops a call
        h = w.bfloat16()
        r = w - h
        m = r.bfloat16()
        return [h, m, (r - m).bfloat16()]

    timed = [("fp32", lambda: xb.float() @ w.T), ("split3", lambda: split_logits(xb, parts)),
             ("splitk", lambda: router_logits_splitk(xb, w))]
    if dev.type == "cuda":  # route's path now: the one-pass parts kernel, one GEMM over the stacked [3E, H]
        stacked = _split_logits(xb, w)
        out["stacked_max_abs_diff"] = sig(float((stacked - ref).abs().max()))
        out["stacked_vs_split3_max_abs_diff"] = sig(float((stacked - got).abs().max()))
        out["parts_kernel_equal_torch"] = bool(torch.equal(split_bf16_parts(w), torch.stack(parts_torch())))
        timed += [("parts_torch", parts_torch), ("parts_kernel", lambda: split_bf16_parts(w)),
                  ("split3_with_parts", lambda: split_logits(xb, parts_torch())),
                  ("stacked_with_parts", lambda: _split_logits(xb, w))]
    for name, fn in timed:
        call = capture_graph(fn)[0].replay if dev.type == "cuda" else fn
        out[f"gemm_{name}_us"] = sig(statistics.median(time_events(call, dev, 5, iters)) * 1e6)
    if dev.type == "cuda":  # the split kernel's tunings: (block_e, block_k, programs per SM, precision, warps)
        sweep_k = {}
        for be, bk, per_sm, prec, nw in [(64, 32, 2, "tf32x3", 4), (64, 32, 2, "ieee", 4), (128, 32, 2, "tf32x3", 8),
                                         (64, 32, 4, "tf32x3", 4), (32, 32, 2, "tf32x3", 4)]:
            def fn(be=be, bk=bk, per_sm=per_sm, prec=prec, nw=nw):
                return router_logits_splitk(xb, w, block_e=be, block_k=bk, per_sm=per_sm, precision=prec,
                                            num_warps=nw)
            name = f"{be}x{bk}_{per_sm}_{prec}_w{nw}"
            sweep_k[name + "_maxdiff"] = sig(float((fn() - ref).abs().max()))
            sweep_k[name] = sig(statistics.median(time_events(capture_graph(fn)[0].replay, dev, 5, iters)) * 1e6)
        out["splitk_sweep_us"] = sweep_k
    return out


def main() -> None:
    """Time each T; print one line per T and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 128, 256, 1024, 4096, 16384])
    p.add_argument("--dims", action="store_true", help="tiny dims on the CPU (a smoke test of this script)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also time the kernel's launch shapes (GPU)")
    p.add_argument("--gemm", action="store_true", help="also the router GEMM as three bf16 GEMMs (split weights)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dev = torch.device("cpu" if args.dims else "cuda")
    cfg = preset("deepseek-v3").with_(hidden=64) if args.dims else preset("deepseek-v3")
    # the router only: init_moe_params would draw every expert's weights (45 GB in float32 at V3 dims)
    g = torch.Generator().manual_seed(0)
    gate = GateParams((torch.randn(cfg.num_experts, cfg.hidden, generator=g) * cfg.hidden ** -0.5).to(dev),
                      (torch.randn(cfg.num_experts, generator=g) * 0.1).to(dev))
    bias = gate.bias.float()
    ceilings = measure_ceilings(dev, torch.bfloat16) if dev.type == "cuda" else {}
    graphs = dev.type == "cuda"
    rows = []
    for T in args.tokens:
        x = torch.randn(T, cfg.hidden, device=dev).to(torch.bfloat16 if graphs else torch.float32)
        logits = x.float() @ gate.weight.T
        variants = paths(gate, bias, x, logits, cfg, graphs)
        a, b = variants["select_fused"](), variants["select_torch"]()
        same = torch.equal(a.topk_ids, b.topk_ids) and torch.allclose(a.topk_weights, b.topk_weights, 1e-5, 1e-6)
        if not same:  # near-ties may differ in order: count the tokens whose expert sets differ
            diff = int((a.topk_ids.sort(1).values != b.topk_ids.sort(1).values).any(1).sum())
            print(f"T={T}: fused and torch selections differ on {diff} of {T} tokens")
            if diff > max(1, T // 1000):
                raise SystemExit(f"T={T}: the fused selection differs from the torch ops on {diff} tokens")
        row = {"case": {"tokens": T, "experts": cfg.num_experts, "hidden": cfg.hidden, "top_k": cfg.top_k},
               "same_as_torch": same}
        for name, fn in variants.items():
            row[f"{name}_us"] = sig(statistics.median(time_events(fn, dev, 5, args.iters)) * 1e6)
            if graphs:
                g, out = capture_graph(fn)
                assert isinstance(out, Routing)
                row[f"{name}_graph_us"] = sig(statistics.median(time_events(g.replay, dev, 5, args.iters)) * 1e6)
        if args.gemm:  # the router GEMM on tensor cores (a split of the float32 weight), against float32
            row["gemm"] = gemm_row(x, gate.weight, bias, cfg, dev, args.iters)
        if args.sweep:  # the kernel's launch shapes (fused_route's block_tokens, num_warps), as CUDA graphs
            row["sweep_graph_us" if graphs else "sweep_us"] = sweep(logits, bias, cfg, a, dev, args.iters)
        if ceilings:
            row["select_floor_us"] = sig((T * cfg.num_experts * 4 + T * cfg.top_k * 8) / ceilings["hbm_gbps"] / 1e3)
            row["route_floor_us"] = sig((T * cfg.hidden * 2 + cfg.num_experts * cfg.hidden * 4)
                                        / ceilings["hbm_gbps"] / 1e3 + row["select_floor_us"])
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items() if k != "case"), f"T={T}", flush=True)  # sweep included
    if args.json:
        write_record(args.json, "route_probe", dev, 1, ceilings, rows)


if __name__ == "__main__":
    main()
