"""The split-H router GEMM (kernels/router_gemm.py) against float64 logits on drawn shapes and dtypes; its
split plan covers H exactly; bad arguments are named. On the CPU the kernel runs under TRITON_INTERPRET=1.

Dimension legend: T tokens, H hidden, E experts, S splits of H.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels.router_gemm import BK, plan, router_logits_splitk  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 70), E=st.sampled_from([8, 60, 256]), H=st.integers(1, 300),
       xdtype=st.sampled_from([torch.float32, torch.float16]), wdtype=st.sampled_from([torch.float32, torch.bfloat16]),
       sms=st.sampled_from([1, 4, 132]), seed=st.integers(0, 2 ** 16))
def test_router_logits_splitk_matches_float64(T, E, H, xdtype, wdtype, sms, seed):
    """within float32 rounding of the float64 logits, every split (tf32x3: ~2^-22 a product; plain TF32 would
    read ~1e-3); the FMA-unit ("ieee") dot too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(xdtype)
    w = (torch.randn(E, H, generator=g) * H ** -0.5).to(wdtype)
    want = x.double() @ w.double().T
    for precision in ("tf32x3", "ieee"):
        got = router_logits_splitk(x.to(DEV), w.to(DEV), sms=sms, precision=precision)
        assert got.dtype == torch.float32 and tuple(got.shape) == (T, E)
        err = float((got.cpu().double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert err < 2e-6, (precision, err)


@given(T=st.integers(1, 300), E=st.integers(1, 512), H=st.integers(1, 20000), sms=st.integers(1, 200))
def test_plan_covers_h_once(T, E, H, sms):
    """S splits of CHUNK columns (a multiple of BK) cover H, the last one not empty, S <= ceil(H / BK)."""
    bt, chunk, S = plan(T, E, H, sms)
    assert chunk % BK == 0 and S * chunk >= H > (S - 1) * chunk
    assert 16 <= bt <= 64 and S <= -(-H // BK)


def test_router_logits_splitk_zero_tokens_and_strided_x():
    """T = 0 gives [0, E]; a strided x (a column slice) reads the same logits as its contiguous copy."""
    w = torch.randn(24, 40).to(DEV)
    assert tuple(router_logits_splitk(torch.randn(0, 40).to(DEV), w).shape) == (0, 24)
    big = torch.randn(5, 80).to(DEV)
    assert torch.equal(router_logits_splitk(big[:, ::2], w), router_logits_splitk(big[:, ::2].contiguous(), w))


@pytest.mark.parametrize("x, w, match", [
    (torch.randn(3, 8), torch.randn(4, 9), "same H"),
    (torch.randn(3, 8).double(), torch.randn(4, 8), "bf16/fp16/fp32"),
    (torch.randn(3, 8), torch.randn(4, 8).half(), "fp32/bf16"),
])
def test_router_logits_splitk_names_bad_arguments(x, w, match):
    with pytest.raises(ValueError, match=match):
        router_logits_splitk(x, w)
