"""Checks shared by the expert GEMM GPU tests (tests/gpu/test_fused_moe_*_gpu.py).

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
"""

import torch
from nanomoe_kernels.fused_moe import fused_moe_contiguous, fused_moe_gathered, fused_moe_masked
from nanomoe_reference.expert_rows import make_routing, make_weights


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """||out - want|| / ||want|| in float64; out must be finite."""
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    return float((out.double().cpu() - want.double().cpu()).norm() / want.double().norm().clamp_min(1e-30))


def check_layouts(config: dict, baseline: dict, T: int) -> None:
    """The contiguous, gathered and masked entry points with `config` against the contiguous one with `baseline`
    (8 SwiGLU experts, top-2, H 256, I 128, bf16)."""
    E, k, H, I = 8, 2, 256, 128
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=5)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, _ = make_routing(T, E, k, "cuda", seed=6)
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).to(torch.int32)
    rows = x[order // k]
    want = fused_moe_contiguous(rows, counts, w, config=baseline)
    assert rel_err(fused_moe_contiguous(rows, counts, w, config=config), want) < 5e-3
    got = fused_moe_gathered(x, (order // k).to(torch.int32), counts, w, config=config)
    assert rel_err(got, want) < 5e-3
    cap = int(counts.max()) + 5
    xm = torch.zeros(E, cap, H, device="cuda", dtype=torch.bfloat16)
    starts = torch.cumsum(counts, 0) - counts
    for e in range(E):
        xm[e, :counts[e]] = rows[starts[e]:starts[e] + counts[e]]
    got = fused_moe_masked(xm, counts, w, config=config)
    for e in range(E):
        n = int(counts[e])
        assert rel_err(got[e, :n], want[starts[e]:starts[e] + n]) < 5e-3
