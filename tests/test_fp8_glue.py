"""FP8 glue for DeepGEMM (kernels/fp8_glue.py) on the CPU, against torch and kernels/fp8_quant.py.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, HG/IG their 128-column groups,
R aligned rows, BM block_m, N rows the alignment sorts, cap rows per expert (masked layout).
The kernels run under TRITON_INTERPRET=1 (GPU machines run them in tests/gpu/test_deepgemm_fp8_gpu.py):
permute_fp8_rows against torch indexing (bytes and scales, drawn shapes with zero rows, empty experts,
dropped ids, gathered indices, strided inputs, DeepGEMM's MN-major scale layout), silu_mul_quant and
pack_masked_fp8 bit for bit against quant_fp8_groups_torch on the same float32 values (the activation
computed with numpy as the interpreter does; skipped rows hold NaN, so a read of one shows), and the
argument errors. The adapter around them (kernels/deepgemm_fp8.py): tests/test_deepgemm_fp8.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels import fp8_glue as fg  # noqa: E402
from nanomoe_kernels import fp8_quant as fq  # noqa: E402
from nanomoe_kernels import moe_align as ma  # noqa: E402

pytestmark = pytest.mark.skipif(not fg.runs_interpreted(), reason="CPU kernel tests run under TRITON_INTERPRET=1 "
                                "(set before kernels/ is imported; GPU: tests/gpu/test_deepgemm_fp8_gpu.py)")
FP8 = torch.float8_e4m3fn


def as_bytes(q):
    return q.view(torch.uint8)


def strided(t, wide):
    """t itself, or a copy living inside a wider buffer (row stride larger than the row: a comm's packed rows)."""
    if not wide:
        return t
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 16, dtype=t.dtype)
    buf[..., 8:8 + t.shape[-1]] = t
    return buf[..., 8:8 + t.shape[-1]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 20), st.integers(1, 5), st.integers(1, 3), st.sampled_from([128, 384]),
       st.sampled_from([16, 32]), st.sampled_from([None, torch.int32, torch.int64]), st.booleans(),
       st.integers(0, 2 ** 16))
def test_permute_fp8_rows(T, E, k, H, bm, index_dtype, wide, seed):
    g = torch.Generator().manual_seed(seed)
    k = min(k, E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = torch.where(torch.rand(T, k, generator=g) < 0.15, E, ids).to(torch.int32)  # id E: dropped
    al = ma.moe_align(ids, E, bm)
    G = T + 2 if index_dtype else T
    q, s = fq.quant_fp8_groups_torch(torch.randn(G, H, generator=g))
    q, s = strided(q, wide), (s.t().contiguous().t() if wide else s)  # strided scales too
    a_index = torch.randperm(G, generator=g)[:T].to(index_dtype) if index_dtype else None
    a, a_s, m = fg.permute_fp8_rows(q, s, al, a_div=k, a_index=a_index)
    R = al.sorted_ids.numel()
    assert a.shape == (R, H) and a.dtype == FP8 and a_s.shape == (R, H // 128) and a_s.stride() == (1, R)
    n = int(al.num_padded)
    sid = al.sorted_ids[:n].long()
    live = sid < T * k
    src = sid[live] // k
    src = a_index.long()[src] if index_dtype else src
    assert torch.equal(as_bytes(a[:n][live]), as_bytes(q[src])) and torch.equal(a_s[:n][live], s[src])
    assert (as_bytes(a[:n][~live]) == 0).all() and (a_s[:n][~live] == 1).all(), "padding rows: zeros, scale 1"
    want_m = torch.where(live, al.expert_ids.long()[torch.arange(n) // bm], -1)
    assert torch.equal(m[:n].long(), want_m) and (m[n:] == -1).all()


def act_numpy(h):
    """silu(gate) * up in float32 the way the interpreter evaluates the kernel (numpy exp, IEEE division)."""
    hn = h.float().numpy()
    gate, up = np.split(hn, 2, axis=-1)
    return torch.from_numpy(gate / (np.float32(1.0) + np.exp(-gate)) * up)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.sampled_from([128, 256]), st.sampled_from([torch.float32, torch.float16]),
       st.sampled_from(["all", "m", "masked"]), st.integers(0, 2 ** 16))
def test_silu_mul_quant_is_quant_fp8_groups(R, I, dtype, mode, seed):
    g = torch.Generator().manual_seed(seed)
    E, cap = 3, max(1, R // 3)
    shape = (E, cap) if mode == "masked" else (R,)
    h = (torch.randn(*shape, 2 * I, generator=g) * 3).to(dtype)
    h[..., :1, :128] = 0  # an all-zero group: scale 1
    keep = torch.ones(shape, dtype=torch.bool)
    if mode == "m":
        m = torch.randint(-1, 4, (R,), generator=g, dtype=torch.int32)
        h[m < 0] = float("nan")  # skipped rows are never read
        q, s = fg.silu_mul_quant(h, m_indices=m)
        keep = m >= 0
    elif mode == "masked":
        counts = torch.randint(0, cap + 2, (E,), generator=g)
        keep = torch.arange(cap)[None, :] < counts[:, None]
        h[~keep] = float("nan")
        q, s = fg.silu_mul_quant(h, masked_m=counts)
    else:
        q, s = fg.silu_mul_quant(h)
    assert q.shape == (*shape, I) and q.dtype == FP8 and s.shape == (*shape, I // 128)
    Mp = -(-shape[-1] // 4) * 4
    assert s.stride() == ((I // 128 * Mp, 1, Mp) if mode == "masked" else (1, Mp)), "DeepGEMM's MN-major layout"
    rq, rs = fq.quant_fp8_groups_torch(act_numpy(h[keep]))
    assert torch.equal(as_bytes(q[keep]), as_bytes(rq)) and torch.equal(s[keep], rs)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(0, 20), st.integers(0, 40), st.sampled_from([128, 256]),
       st.sampled_from(["float32", "float16", "fp8"]), st.booleans(), st.integers(0, 2 ** 16))
def test_pack_masked_fp8(E, cap_x, pad, H, kind, wide, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, cap_x, H, generator=g)
    counts = torch.randint(0, cap_x + 3, (E,), generator=g)  # past cap_x: clamped
    keep = torch.arange(cap_x)[None, :] < counts[:, None]
    wq, ws = fq.quant_fp8_groups_torch(x.reshape(-1, H))
    wq, ws = wq.view(E, cap_x, H), ws.view(E, cap_x, H // 128)
    if kind == "fp8":
        q, s = fg.pack_masked_fp8(strided(wq, wide), counts, cap_x + pad, strided(ws, wide))
    else:
        xx = x.to(getattr(torch, kind))
        xx[~keep] = float("nan")  # rows past the counts are never read
        wq, ws = fq.quant_fp8_groups_torch(xx.reshape(-1, H))
        wq, ws = wq.view(E, cap_x, H), ws.view(E, cap_x, H // 128)
        q, s = fg.pack_masked_fp8(strided(xx, wide), counts, cap_x + pad)
    C = cap_x + pad
    Cp = -(-C // 4) * 4
    assert q.shape == (E, C, H) and q.is_contiguous() and s.shape == (E, C, H // 128)
    assert s.stride() == (H // 128 * Cp, 1, Cp)
    assert torch.equal(as_bytes(q[:, :cap_x][keep]), as_bytes(wq[keep])) and torch.equal(s[:, :cap_x][keep], ws[keep])


def test_glue_argument_errors():
    al = ma.moe_align(torch.tensor([[0]], dtype=torch.int32), 2, 16)
    q, s = fq.quant_fp8_groups_torch(torch.randn(1, 128))
    with pytest.raises(TypeError, match="q must be one of"):
        fg.permute_fp8_rows(q.float(), s, al)
    with pytest.raises(ValueError, match=r"q_scale must be float32 \[1, 1\]"):
        fg.permute_fp8_rows(q, s[:, :0], al)
    with pytest.raises(ValueError, match="a_div must be an int"):
        fg.permute_fp8_rows(q, s, al, a_div=0)
    with pytest.raises(ValueError, match="even last dim"):
        fg.silu_mul_quant(torch.randn(2, 255))
    with pytest.raises(ValueError, match="not both"):
        fg.silu_mul_quant(torch.randn(2, 256), m_indices=torch.zeros(2, dtype=torch.int32),
                          masked_m=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="capacity must be an int >= x.shape"):
        fg.pack_masked_fp8(torch.randn(2, 3, 128), torch.zeros(2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="x_scale is for float8_e4m3fn x only"):
        fg.pack_masked_fp8(torch.randn(2, 3, 128), torch.zeros(2, dtype=torch.int32), 3, torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="x_scale must be float32"):
        fg.pack_masked_fp8(torch.zeros(2, 3, 128, dtype=FP8), torch.zeros(2, dtype=torch.int32), 3)
