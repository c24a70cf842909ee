"""route vs the float64 reference router, and its errors."""

import nanomoe_reference as reference
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from nanomoe_fn import init_moe_params, preset, route
from tests.helpers import DTYPES, MIN_MARGIN, moe_configs, route_kwargs


@given(cfg=moe_configs(), T=st.integers(0, 64), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_route_matches_reference(cfg, T, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = init_moe_params(cfg, dtype, generator=gen)
    x = torch.randn(T, cfg.hidden, generator=gen).to(dtype)
    r = route(params.gate, x, cfg)
    ref_ids, ref_w, margin = reference.route(x, params.gate.weight, cfg.top_k, **route_kwargs(cfg, params))
    assume(margin > MIN_MARGIN)
    assert r.topk_ids.dtype == torch.int32 and r.topk_weights.dtype == torch.float32
    assert tuple(r.topk_ids.shape) == (T, cfg.top_k)
    # same experts in the same (best-first) order, same weights
    assert torch.equal(r.topk_ids.long(), ref_ids)
    torch.testing.assert_close(r.topk_weights.double(), ref_w, rtol=1e-5, atol=1e-6)
    if cfg.norm_topk_prob and T:
        torch.testing.assert_close(r.topk_weights.sum(-1).double(),
                                   torch.full((T,), cfg.routed_scaling_factor, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)  # float32 weights summed


def test_grouped_topk_only_picks_kept_groups():
    cfg = preset("deepseek-v3").with_(hidden=64)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(1))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    groups = route(params.gate, x, cfg).topk_ids.long() // (cfg.num_experts // cfg.n_group)
    assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)


def test_route_errors_name_the_argument():
    cfg = preset("tiny")
    p = init_moe_params(cfg)
    with pytest.raises(ValueError, match="hidden"):
        route(p.gate, torch.randn(4, cfg.hidden + 1), cfg)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        route(p.gate, torch.randn(cfg.hidden), cfg)
    with pytest.raises(TypeError, match="x must have dtype"):
        route(p.gate, torch.ones(4, cfg.hidden, dtype=torch.int64), cfg)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        route(p.gate, [[0.0] * cfg.hidden], cfg)
    with pytest.raises(ValueError, match="x must be on cpu"):
        route(p.gate, torch.randn(4, cfg.hidden, device="meta"), cfg)
    x = torch.randn(4, cfg.hidden)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        route(p.gate, x, cfg)
    with pytest.raises(ValueError, match="gate_params.bias"):
        route(type(p.gate)(p.gate.weight, None), torch.randn(4, cfg.hidden), cfg)
    with pytest.raises(ValueError, match="gate_params.weight"):
        route(type(p.gate)(p.gate.weight[:-1], p.gate.bias), torch.randn(4, cfg.hidden), cfg)


@pytest.mark.parametrize("score_func, bias", [("softmax", False), ("sigmoid", False), ("sigmoid", True)])
def test_grouped_routing_matches_reference(score_func, bias):
    cfg = preset("tiny").with_(hidden=48, num_experts=32, n_group=4, topk_group=2, top_k=4,
                               score_func=score_func, correction_bias=bias, norm_topk_prob=not bias)
    checked = 0
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        params = init_moe_params(cfg, generator=gen)
        x = torch.randn(24, cfg.hidden, generator=gen)
        r = route(params.gate, x, cfg)
        ids, w, margin = reference.route(x, params.gate.weight, cfg.top_k, **route_kwargs(cfg, params))
        if margin <= MIN_MARGIN:
            continue
        checked += 1
        assert torch.equal(r.topk_ids.long(), ids)
        torch.testing.assert_close(r.topk_weights.double(), w, rtol=1e-5, atol=1e-6)
    assert checked >= 3, "too many near-ties: the test compared too few draws"


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e30]))
def test_bf16_parts_sum_to_the_weight_exactly(seed, scale):
    """The split router GEMM's weight parts (nanomoe_fn.moe.route.bf16_parts): bf16 tensors whose float64 sum
    is the float32 weight bit for bit (so every product x * part is exact in float32), a bf16 weight its own
    part."""
    from nanomoe_fn.moe.route import bf16_parts

    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(seed)) * scale
    parts = bf16_parts(w)
    assert len(parts) == 3 and all(p.dtype == torch.bfloat16 and p.shape == w.shape for p in parts)
    assert torch.equal(sum(p.double() for p in parts), w.double())
    wb = w.bfloat16()
    assert bf16_parts(wb)[0] is wb and len(bf16_parts(wb)) == 1
