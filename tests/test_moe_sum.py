"""kernels/moe_sum.sum_pairs (the fused MoE's top-k sum) against float64 sums of the same rows.

Dimension legend: T tokens, k experts per token, H columns.
On the CPU the kernel runs under TRITON_INTERPRET=1 (float32/float16); on a GPU machine it runs compiled,
bfloat16 included.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.moe_permute as mp  # noqa: E402
import nanomoe_kernels.moe_sum as ms  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED and type(ms._sum_k_kernel).__name__ != "InterpretedFunction":
    mp, ms = importlib.reload(mp), importlib.reload(ms)  # imported before the variable was set: decorate again

DEV = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU, or a CUDA GPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@settings(max_examples=30)
@given(T=st.integers(0, 40), k=st.integers(1, 9), H=st.sampled_from([1, 7, 64, 200, 600, 1100]),
       dtype=st.sampled_from(DTYPES), pad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sum_pairs_matches_float64(T, k, H, dtype, pad, seed):
    """Row t is the sum of rows t*k .. t*k+k-1, rounded once: within one rounding of the float64 sum, and
    equal to torch's float32 sum of the same rows; a row stride past H (a view) is read as such."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(T * k, H + 5 * pad, generator=g).to(dtype)
    pairs = full[:, :H].to(DEV)
    out = ms.sum_pairs(pairs, k)
    want = full[:, :H].double().view(T, k, H).sum(1)
    assert out.shape == (T, H) and out.dtype == dtype
    ulp = torch.finfo(dtype).eps
    mag = full[:, :H].double().abs().view(T, k, H).sum(1)
    bound = ulp * want.abs() + k * torch.finfo(torch.float32).eps * mag + torch.finfo(dtype).tiny
    assert ((out.cpu().double() - want).abs() <= bound).all()
    exact32 = full[:, :H].float().view(T, k, H).sum(1)
    assert torch.allclose(out.cpu().float(), exact32, rtol=2 * ulp, atol=2 * ulp)


def test_sum_pairs_writes_out_and_checks_arguments():
    """out= is written and returned; wrong pairs, k and out are errors naming the argument."""
    pairs = torch.arange(24, dtype=torch.float32, device=DEV).view(6, 4)
    out = torch.full((3, 4), 7.0, device=DEV)
    assert ms.sum_pairs(pairs, 2, out=out) is out
    assert torch.equal(out.cpu(), torch.tensor([[4.0, 6, 8, 10], [20, 22, 24, 26], [36, 38, 40, 42]]))
    assert ms.sum_pairs(pairs[:0], 3).shape == (0, 4)
    with pytest.raises(ValueError, match="k must be"):
        ms.sum_pairs(pairs, 4)
    with pytest.raises(ValueError, match="k must be"):
        ms.sum_pairs(pairs, 0)
    with pytest.raises(TypeError, match="pairs must be one of"):
        ms.sum_pairs(pairs.int(), 2)
    with pytest.raises(ValueError, match="pairs must have unit stride"):
        ms.sum_pairs(pairs.t(), 2)
    with pytest.raises(TypeError, match="out must be one of"):
        ms.sum_pairs(pairs, 2, out=torch.empty(3, 4, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        ms.sum_pairs(pairs, 2, out=torch.empty(2, 4, device=DEV))
