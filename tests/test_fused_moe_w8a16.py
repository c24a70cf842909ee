"""W8A16 fused MoE (kernels/fused_moe_w8a16.py): FP8 block-scaled weights, float16 activations, on the CPU
interpreter, against the float64 FFN on the dequantised weights with unquantised activations.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, n batch rows, cap rows per expert.
Nothing but the weights is quantised, so the kernels differ from that reference only by float16 rounding
(the SwiGLU output and the output rows are float16): bounded by F16_TOL, where W8A8 (fused_moe_fp8) is
~4.3% off the same reference (tests/test_fused_moe_fp8.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.fused_moe_w8a16 as w8  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fused_moe_fp8 import CFG, act64, down64, fmk, make_case, rel  # noqa: E402 (reloads the kernels)

if fmk.runs_interpreted():
    w8 = importlib.reload(w8)  # bind the interpreted kernels' module objects
pytestmark = [pytest.mark.skipif(not fmk.runs_interpreted(), reason="CPU kernel tests run under TRITON_INTERPRET=1"),
              pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")]
F16 = torch.float16
F16_TOL = 3e-3
CONFIGS = [CFG, {**CFG, "USE_TMA": True, "K_STEPS": 2},
           {"up": {**CFG, "BLOCK_N": 64, "BLOCK_M": 32}, "down": {**CFG, "BLOCK_N": 256, "USE_TMA": True}},
           {**CFG, "BLOCK_M": 32, "SPLIT_M": 16, "MERGE_TAIL": True}]


def ffn64(x, ids, tw, w):
    """float64 sum_j w_j * expert_j(x) on the dequantised weights, nothing else quantised."""
    T, k = ids.shape
    e = ids.reshape(-1).long()
    y = down64(act64(x.double()[torch.arange(T * k) // k], e, w), e, w) * tw.reshape(-1, 1).double()
    return y.view(T, k, -1).sum(1)


@settings(max_examples=4, deadline=None)
@given(ci=st.integers(0, len(CONFIGS) - 1), T=st.integers(0, 20), k=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_w8a16_matches_the_unquantised_ffn(ci, T, k, seed):
    x, ids, tw, w = make_case(T, k, 4, 256, 256, seed=seed)
    out = w8.fused_moe_w8a16(x.to(F16), ids, tw, *w, config=CONFIGS[ci], validate=True)
    assert out.dtype == F16 and out.shape == (T, 256)
    if T:
        assert rel(out, ffn64(x.to(F16), ids, tw, w)) < F16_TOL


def test_w8a16_layouts():
    counts, E, H, I = [5, 0, 19, 1], 4, 256, 256
    _, _, _, w = make_case(0, 1, E, H, I, seed=1)
    g = torch.Generator().manual_seed(2)
    n = sum(counts)
    rows = torch.randn(n + 2, H, generator=g).to(F16)
    cnt = torch.tensor(counts)
    e_of = torch.repeat_interleave(torch.arange(E), cnt)[:, None].to(torch.int32)
    want = ffn64(rows[:n], e_of, torch.ones(n, 1), w)
    out = w8.fused_moe_w8a16_contiguous(rows, cnt, *w, config=CFG, validate=True)
    assert out.shape == (n + 2, H) and rel(out[:n], want) < F16_TOL
    index = torch.randint(0, 9, (n,), generator=g)
    want_g = ffn64(rows[index], e_of, torch.ones(n, 1), w)
    assert rel(w8.fused_moe_w8a16_gathered(rows[:9], index, cnt, *w, config=CFG, validate=True), want_g) < F16_TOL
    xm = torch.randn(E, 21, H, generator=g).to(F16)
    starts = [sum(counts[:e]) for e in range(E)]
    for e, c in enumerate(counts):
        xm[e, :c] = rows[starts[e]:starts[e] + c]
    ym = w8.fused_moe_w8a16_masked(xm, cnt, *w, config=CFG, validate=True)
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts)]), want) < F16_TOL


def test_w8a16_refusals_name_the_argument():
    x, ids, tw, w = make_case(4, 2, 3, 128, 128, seed=5)
    with pytest.raises(ValueError, match="x must be a 2-dim bfloat16/float16 tensor"):
        w8.fused_moe_w8a16(x, ids, tw, *w, config=CFG)
    with pytest.raises(TypeError, match="w13_q must be float8_e4m3fn"):
        w8.fused_moe_w8a16(x.to(F16), ids, tw, w[0].float(), *w[1:], config=CFG)
    with pytest.raises(ValueError, match="rows must be a 2-dim bfloat16/float16"):
        w8.fused_moe_w8a16_contiguous(x.to(torch.float8_e4m3fn), torch.tensor([4, 0, 0]), *w, config=CFG)
    assert w8.fused_moe_w8a16(x[:0].to(F16), ids[:0], tw[:0], *w, config=CFG).shape == (0, 128)
