"""The fused router kernel (kernels/moe_route.py) against the float64 reference router and route's torch path,
on drawn configs (softmax / sigmoid, bias, groups with both rules, up to 256 experts) and DeepSeek-V3's;
ties go to the lower expert id; bad arguments are named. On the CPU the kernel runs under TRITON_INTERPRET=1;
on a GPU machine it runs compiled, and `route` itself takes it there (checked too); everywhere it equals
`select_experts(..., fused=False)`, the torch ops it replaces.

Dimension legend: T tokens, H hidden, E experts, k experts per token.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.moe_route as mr  # noqa: E402
import nanomoe_reference as reference  # noqa: E402
import pytest  # noqa: E402
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nanomoe_fn import init_moe_params, preset, route  # noqa: E402
from nanomoe_fn.moe.route import select_experts  # noqa: E402
from tests.helpers import MIN_MARGIN, moe_configs, route_kwargs  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not mr.runs_interpreted():
    importlib.reload(mr)  # kernels/ was imported before the variable was set: decorate the kernel again

DEV = "cpu" if mr.runs_interpreted() else "cuda"
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU, or a CUDA GPU")


def _fused(logits, bias, cfg):
    return mr.fused_route(logits, bias, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.score_func, cfg.group_rule,
                          cfg.norm_topk_prob, cfg.routed_scaling_factor)


def _check(cfg, T, seed, drawn=True):
    gen = torch.Generator().manual_seed(seed)
    params = init_moe_params(cfg, torch.float32, generator=gen)
    x = torch.randn(T, cfg.hidden, generator=gen)
    ref_ids, ref_w, margin = reference.route(x, params.gate.weight, cfg.top_k, **route_kwargs(cfg, params))
    if drawn:
        assume(margin > MIN_MARGIN)
    else:  # a fixed case must be clear of near-ties
        assert margin > MIN_MARGIN
    logits = (x @ params.gate.weight.T).to(DEV)
    bias = None if params.gate.bias is None else params.gate.bias.float().to(DEV)
    ids, w = _fused(logits, bias, cfg)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and tuple(ids.shape) == (T, cfg.top_k)
    assert torch.equal(ids.cpu().long(), ref_ids)  # the same experts, best first
    torch.testing.assert_close(w.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)
    torch_path = select_experts(logits, bias, cfg, fused=False)  # the same step in torch ops
    assert torch.equal(ids, torch_path.topk_ids)
    torch.testing.assert_close(w, torch_path.topk_weights, rtol=1e-5, atol=1e-6)
    assert torch.equal(select_experts(logits, bias, cfg).topk_ids, ids if DEV == "cuda" else torch_path.topk_ids)
    if DEV == "cuda":  # route on the GPU takes the kernel
        gpu = route(type(params.gate)(*(None if t is None else t.cuda() for t in (params.gate.weight,
                                                                                 params.gate.bias))), x.cuda(), cfg)
        assert torch.equal(gpu.topk_ids.cpu(), ref_ids.int())
        torch.testing.assert_close(gpu.topk_weights.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)


@given(cfg=moe_configs(max_experts=256, max_hidden=64), T=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_fused_route_matches_reference(cfg, T, seed):
    _check(cfg, T, seed)


@pytest.mark.parametrize("name", ["deepseek-v3", "seed", "tiny"])
def test_fused_route_on_the_presets(name):
    _check(preset(name).with_(hidden=64), 50, 7, drawn=False)


def test_ties_go_to_the_lower_expert_id():
    cfg = preset("deepseek-v3")
    logits = torch.zeros(3, 256, device=DEV)  # every score equal: groups 0-3, experts 0-7
    ids, w = _fused(logits, torch.zeros(256, device=DEV), cfg)
    assert ids.tolist() == [list(range(8))] * 3
    torch.testing.assert_close(w.cpu(), torch.full((3, 8), 2.5 / 8))


def test_fused_route_names_bad_arguments():
    logits = torch.zeros(4, 16, device=DEV)
    with pytest.raises(ValueError, match="logits must be"):
        mr.fused_route(logits.half(), None, 2)
    with pytest.raises(ValueError, match="bias must be"):
        mr.fused_route(logits, torch.zeros(8, device=DEV), 2)
    with pytest.raises(ValueError, match="n_group"):
        mr.fused_route(logits, None, 2, n_group=3)
    with pytest.raises(ValueError, match="top_k"):
        mr.fused_route(logits, None, 5, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="score_func"):
        mr.fused_route(logits, None, 2, score_func="relu")


def test_launch_shapes_give_the_same_routing():
    cfg = preset("deepseek-v3")
    logits = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).to(DEV)
    bias = (0.1 * torch.randn(256, generator=torch.Generator().manual_seed(4))).to(DEV)
    want = _fused(logits, bias, cfg)
    for bt, warps in ((1, 1), (2, 1), (4, 2), (16, 4), (32, 8)):
        got = mr.fused_route(logits, bias, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.score_func, cfg.group_rule,
                             cfg.norm_topk_prob, cfg.routed_scaling_factor, block_tokens=bt, num_warps=warps)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (bt, warps)
    with pytest.raises(ValueError, match="block_tokens"):
        mr.fused_route(logits, bias, 8, block_tokens=3)


@pytest.mark.parametrize("name", ["deepseek-v3", "seed"])
def test_exact_ties_route_alike_on_both_paths(name):
    # logits on a coarse grid: many exact ties between experts and between groups; the kernel and the torch ops
    # (stable sorts) both send a tie to the lower id, so eager GPU and compiled layers route alike
    cfg = preset(name)
    logits = torch.randint(-2, 3, (64, cfg.num_experts), generator=torch.Generator().manual_seed(5)).float().to(DEV)
    bias = torch.zeros(cfg.num_experts, device=DEV) if cfg.correction_bias else None
    fused, plain = select_experts(logits, bias, cfg, fused=True), select_experts(logits, bias, cfg, fused=False)
    assert torch.equal(fused.topk_ids, plain.topk_ids)
    torch.testing.assert_close(fused.topk_weights, plain.topk_weights, rtol=1e-6, atol=1e-7)


def test_compiled_route_runs_the_kernel_bit_for_bit():
    """Under torch.compile (fullgraph) the kernel runs as the custom op nanomoe::fused_route: the same ids and
    weights, bit for bit, as the eager call (inductor's fusion of the torch ops rounded the weights differently in
    the last bits, enough to change a bf16 model's tokens). On GPUs the default path takes it too."""
    cfg = preset("deepseek-v3")
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, cfg.num_experts, generator=g).to(DEV)
    bias = (0.1 * torch.randn(cfg.num_experts, generator=g)).to(DEV)
    fused = None if DEV == "cuda" else True
    eager = select_experts(logits, bias, cfg, fused=fused)
    torch._dynamo.reset()
    compiled = torch.compile(lambda lg, b: select_experts(lg, b, cfg, fused=fused), fullgraph=True,
                             backend="aot_eager")(logits, bias)
    assert torch.equal(compiled.topk_ids, eager.topk_ids) and torch.equal(compiled.topk_weights, eager.topk_weights)
    assert torch.equal(eager.topk_ids, _fused(logits, bias, cfg)[0])


@pytest.mark.skipif(DEV != "cuda", reason="the split router GEMM runs on CUDA only")
@pytest.mark.parametrize("T, wdtype", [(1, torch.float32), (32, torch.float32), (32, torch.bfloat16),
                                       (256, torch.float32), (257, torch.float32), (512, torch.bfloat16),
                                       (1024, torch.float32), (4096, torch.float32), (2048, torch.bfloat16)])
def test_split_router_gemm(T, wdtype):
    """route's router GEMM on CUDA: up to SPLIT_MIN_TOKENS rows the float32 GEMM split over H
    (kernels/router_gemm.py), within float32 rounding of the float64 logits; above that (bf16 x) bf16 tensor-core
    GEMMs over the weight's bf16 parts, within ~1e-5 of the largest (9.6e-6 at T = 4096 on an H200); the routing of
    those logits (near-ties aside); compiled (the custom ops) bit for bit as eager."""
    from nanomoe_fn.moe.params import GateParams
    from nanomoe_fn.moe.route import SPLIT_MIN_TOKENS, router_logits

    cfg = preset("deepseek-v3")  # only its router: [256, 7168] (the whole MoE would be 45 GB of float32)
    gen = torch.Generator().manual_seed(T)
    w = (torch.randn(cfg.num_experts, cfg.hidden, generator=gen) * cfg.hidden ** -0.5).to(wdtype)
    x = torch.randn(T, cfg.hidden, generator=gen).bfloat16()
    want = x.double() @ w.double().T
    got = router_logits(x.cuda(), w.cuda())
    assert got.dtype == torch.float32 and tuple(got.shape) == (T, cfg.num_experts)
    err = float((got.cpu().double() - want).abs().max() / want.abs().max())
    # tf32x3 products (~2^-22), IEEE float32 sums of 128-column chunks; or the tensor cores' accumulation over H
    assert err < (2e-6 if T <= SPLIT_MIN_TOKENS else 3e-5), err
    torch._dynamo.reset()
    compiled = torch.compile(router_logits, fullgraph=True)(x.cuda(), w.cuda())
    assert torch.equal(compiled, got)
    assert torch.equal(router_logits(x.cuda(), w.cuda()), got)  # the same bits on every call (no atomics)
    bias = (0.01 * torch.randn(cfg.num_experts, generator=gen)).cuda()
    r = route(GateParams(w.cuda(), bias), x.cuda(), cfg)
    exact = select_experts(want.float().cuda(), bias, cfg)  # the routing of float64 logits rounded once
    differ = int((r.topk_ids != exact.topk_ids).any(1).sum())
    assert differ <= T // 200, differ  # only near-ties may go the other way
