"""moe_layer with block-scaled FP8 experts (SwiGLUExpertsFP8, backend triton_fp8) on the CPU interpreter.

Dimension legend: T tokens, H hidden, I intermediate, E experts, k top-k.
The layer's output must equal, token by token, the float64 oracle of the same scheme
(reference/fp8.swiglu_fp8_ref on the dequantised weights, weighted by the layer's own routing, plus the
bf16-style shared expert in float64) up to the float32 accumulation and the rare fp8 rounding tie it
flips, and stay within the scheme's own error (ACCURACY_BOUND) of the unquantised float64 layer.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_reference import moe as ref  # noqa: E402
from nanomoe_reference.fp8 import swiglu_fp8_ref  # noqa: E402

from nanomoe_fn import MoEConfig, MoEParams, init_moe_params, moe_layer, route  # noqa: E402
from nanomoe_fn.moe.fp8_params import dequantize_experts, quantize_experts  # noqa: E402
from tests.test_fused_moe_fp8 import ACCURACY_BOUND, fmk  # noqa: E402 (reloads the kernels)

pytestmark = [pytest.mark.skipif(not fmk.runs_interpreted(), reason="runs the Triton FP8 kernels interpreted"),
              pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@settings(max_examples=4, deadline=None)
@given(T=st.integers(0, 12), k=st.sampled_from([1, 2, 3]), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_layer_matches_the_scheme_oracle(T, k, shared, seed):
    cfg = MoEConfig(hidden=256, intermediate=128, num_experts=4, top_k=k, n_shared_experts=int(shared))
    g = torch.Generator().manual_seed(seed)
    params = init_moe_params(cfg, torch.float32, generator=g)
    fp8 = MoEParams(params.gate, quantize_experts(params.experts), params.shared)
    x = torch.randn(T, cfg.hidden, generator=g)
    out = moe_layer(fp8, x, cfg, backend="triton_fp8")
    assert out.shape == (T, cfg.hidden) and out.dtype == torch.float32
    if T == 0:
        return
    deq = dequantize_experts(fp8.experts, torch.float64)
    r = route(params.gate, x, cfg)
    want = torch.zeros(T, cfg.hidden, dtype=torch.float64)
    plain = torch.zeros_like(want)
    for t in range(T):
        for j in range(k):
            e, w = int(r.topk_ids[t, j]), float(r.topk_weights[t, j])
            want[t] += w * swiglu_fp8_ref(x[t:t + 1], deq.w13[e], deq.w2[e])[0]
            plain[t] += w * ref.swiglu(x[t:t + 1], deq.w13[e], deq.w2[e])[0]
    if shared:
        s = ref.swiglu(x, params.shared.w13, params.shared.w2)
        want, plain = want + s, plain + s
    assert rel(out, want) < 5e-3
    assert rel(out, plain) < ACCURACY_BOUND


def test_fp8_layer_refusals_name_the_argument():
    cfg = MoEConfig(hidden=256, intermediate=128, num_experts=4, top_k=2)
    params = init_moe_params(cfg, torch.float32)
    fp8 = MoEParams(params.gate, quantize_experts(params.experts), None)
    x = torch.randn(3, 256)
    with pytest.raises(TypeError, match="expert backend 'bmm' runs bf16/fp16/fp32 experts"):
        moe_layer(fp8, x, cfg, backend="bmm")
    with pytest.raises(TypeError, match="x must be one of"):
        moe_layer(fp8, x.double(), cfg, backend="triton_fp8")
    bad = MoEParams(params.gate, quantize_experts(params.experts, block=(64, 128)), None)
    with pytest.raises(ValueError, match=r"params.experts.w13_scale must be torch.float32 \[4, 4, 2\]|block"):
        moe_layer(bad, x, cfg, backend="triton_fp8")


def test_w8a16_layer_meets_the_tight_bound():
    """triton_w8a16: the same FP8 experts with float16 rows never quantised: within float16 rounding of the
    float64 layer on the dequantised weights (where W8A8's activations cost ~4.3%)."""
    cfg = MoEConfig(hidden=256, intermediate=256, num_experts=4, top_k=2, n_shared_experts=1)
    g = torch.Generator().manual_seed(3)
    params = init_moe_params(cfg, torch.float16, generator=g)
    fp8 = MoEParams(params.gate, quantize_experts(params.experts), params.shared)
    x = torch.randn(9, cfg.hidden, generator=g).to(torch.float16)
    out = moe_layer(fp8, x, cfg, backend="triton_w8a16")
    assert out.dtype == torch.float16
    deq = dequantize_experts(fp8.experts, torch.float64)
    r = route(params.gate, x, cfg)
    want = ref.swiglu(x, params.shared.w13, params.shared.w2)
    for t in range(9):
        for j in range(2):
            e = int(r.topk_ids[t, j])
            want[t] += float(r.topk_weights[t, j]) * ref.swiglu(x[t:t + 1], deq.w13[e], deq.w2[e])[0]
    assert rel(out, want) < 5e-3
    with pytest.raises(ValueError, match="bfloat16/float16"):
        moe_layer(MoEParams(params.gate, fp8.experts, None), x.float(), cfg.with_(n_shared_experts=0),
                  backend="triton_w8a16")


@pytest.mark.parametrize("backend", ["triton_fp8", "triton_fp8_hilo"])
def test_block_layout_and_two_term_layers(backend):
    """moe_layer on experts in the block layout (tile_experts) gives the rows' output bit for bit; the two-term
    backend (triton_fp8_hilo) lands within float32-level rounding of the unquantised float64 layer (W8A8: ~4%)."""
    from nanomoe_fn.moe.fp8_params import tile_experts

    cfg = MoEConfig(hidden=256, intermediate=128, num_experts=4, top_k=2)
    g = torch.Generator().manual_seed(5)
    params = init_moe_params(cfg, torch.float32, generator=g)
    fp8 = MoEParams(params.gate, quantize_experts(params.experts), None)
    tiled = MoEParams(params.gate, tile_experts(fp8.experts), None)
    x = torch.randn(10, cfg.hidden, generator=g)
    out = moe_layer(fp8, x, cfg, backend=backend)
    assert tiled.experts.tiled and torch.equal(moe_layer(tiled, x, cfg, backend=backend), out)
    deq = dequantize_experts(tiled.experts, torch.float64)
    r = route(params.gate, x, cfg)
    plain = torch.zeros(10, cfg.hidden, dtype=torch.float64)
    for t in range(10):
        for j in range(2):
            e = int(r.topk_ids[t, j])
            plain[t] += float(r.topk_weights[t, j]) * ref.swiglu(x[t:t + 1], deq.w13[e], deq.w2[e])[0]
    assert rel(out, plain) < (4e-3 if backend == "triton_fp8_hilo" else ACCURACY_BOUND)
    if backend == "triton_fp8_hilo":
        assert rel(out, plain) < rel(moe_layer(fp8, x, cfg, backend="triton_fp8"), plain) / 5
