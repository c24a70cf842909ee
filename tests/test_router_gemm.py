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
from nanomoe_kernels.router_gemm import BK, plan, router_logits_splitk, split_bf16_parts  # noqa: E402

from nanomoe_fn.moe.route import bf16_parts  # noqa: E402

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


SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38,
           -3.4028235e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 3 * 2 ** -8)]


@settings(max_examples=10, deadline=None)
@given(E=st.integers(1, 40), H=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_split_bf16_parts_equals_the_torch_split_bit_for_bit(E, H, seed):
    """The one-pass kernel's hi, mid, lo are torch's bf16 roundings bit for bit (ties to even, subnormals, the
    largest floats rounding to inf) over 80 decades of magnitude; NaN stays NaN; they sum to w exactly (w
    at least 2^-100)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, H, generator=g) * torch.logspace(-40, 38, H)[torch.randperm(H, generator=g)].float()
    flat = w.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL[: flat.numel()])
    got = split_bf16_parts(w.to(DEV)).cpu()
    want = torch.stack(bf16_parts(w))  # the torch ops on the CPU
    assert got.dtype == torch.bfloat16 and got.shape == (3, E, H)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    exact = w.isfinite() & got[0].isfinite() & (w.abs() >= 2 ** -100)  # lo's last bit above bf16's subnormals
    assert torch.equal(got.double().sum(0)[exact], w.double()[exact])


def test_split_bf16_parts_shapes_and_bad_arguments():
    """Empty and 3-dim weights keep their shape behind the parts axis; a non-float32 w is named."""
    assert split_bf16_parts(torch.empty(0, 7).to(DEV)).shape == (3, 0, 7)
    w = torch.randn(2, 3, 5)
    assert torch.equal(split_bf16_parts(w.to(DEV)).cpu(), torch.stack(bf16_parts(w.view(6, 5))).view(3, 2, 3, 5))
    with pytest.raises(ValueError, match="w must be a float32 tensor"):
        split_bf16_parts(torch.randn(4, 4).bfloat16())
