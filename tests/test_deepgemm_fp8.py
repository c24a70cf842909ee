"""The deepgemm_fp8 adapter (kernels/deepgemm_fp8.py) and the FP8 expert backends on the CPU, DeepGEMM emulated.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, M batch rows, cap rows per expert.
DeepGEMM itself cannot run on a CPU: these tests swap the module's deep_gemm getter (and supports_fp8) for
a float64 torch emulation of its two FP8 GEMMs (FakeDeepGEMM), which also asserts the layouts DeepGEMM
requires (fp8 K-major operands, MN-major TMA-aligned LHS scales, groups starting at multiples of 128, an
aligned masked capacity) and writes NaN to every row it does not own, so a read of one shows. That checks
the glue and layout logic end to end (contiguous, gathered, masked; fp32/fp16 rows and pre-quantised fp8
rows as strided views; zero rows, empty experts) against a float64 reference of the same quantised scheme;
DeepGEMM itself is checked on an H200 by tests/gpu/test_deepgemm_fp8_gpu.py. Also: supports_fp8's reasons,
the import probe, argument errors, and both FP8 expert backends on an FP8 ExpertBatch (x + x_scale).
Kernels run under TRITON_INTERPRET=1, which truncates bf16 stores (unpermute_sum's output): see TOL.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from nanomoe_kernels import deepgemm_fp8 as dg8  # noqa: E402
from nanomoe_kernels import fp8_glue as fg  # noqa: E402
from nanomoe_kernels import fp8_quant as fq  # noqa: E402
from nanomoe_kernels import moe_align as ma  # noqa: E402

pytestmark = pytest.mark.skipif(not fg.runs_interpreted(), reason="CPU kernel tests run under TRITON_INTERPRET=1 "
                                "(set before kernels/ is imported; GPU: tests/gpu/test_deepgemm_fp8_gpu.py)")
FP8 = torch.float8_e4m3fn
TOL = 6e-3  # vs the same-scheme float64 reference: fp8 ties of the activation, the interpreter's truncating bf16 stores


def strided(t):
    """A copy of t inside a wider buffer (row stride larger than the row: a comm's packed receive rows)."""
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 16, dtype=t.dtype)
    buf[..., 8:8 + t.shape[-1]] = t
    return buf[..., 8:8 + t.shape[-1]]


class FakeDeepGEMM:
    """float64 emulation of DeepGEMM 0.1.4.post1's two FP8 GEMMs, asserting the layouts it requires."""

    __version__ = "0.1.4.post1"

    def get_mk_alignment_for_contiguous_layout(self):
        return 128

    @staticmethod
    def _operands(a, sa, b, sb):
        assert a.dtype == FP8 and a.is_contiguous() and b.dtype == FP8 and b.is_contiguous() and sb.is_contiguous()
        return (a.double().unflatten(-1, (-1, 128)) * sa.double()[..., None]).flatten(-2), \
            fq.dequant_fp8_blocks(b, sb).double()

    def m_grouped_fp8_gemm_nt_contiguous(self, a_pair, b_pair, d, m_indices):
        (a, sa), (b, sb) = a_pair, b_pair
        R, K = a.shape
        assert R % 128 == 0 and sa.shape == (R, K // 128) and sa.stride() == (1, R), "MN-major TMA-aligned a_sf"
        assert d.dtype == torch.bfloat16 and d.shape == (R, b.shape[1]) and m_indices.dtype == torch.int32
        m = m_indices.long()
        starts = torch.nonzero((m >= 0) & (m != torch.cat([m.new_full((1,), -1), m[:-1]]))).flatten()
        assert (starts % 128 == 0).all(), "every group must start at a multiple of the alignment"
        live = m >= 0
        a64, w = self._operands(a[live], sa[live], b, sb)
        d.fill_(float("nan"))
        d[live] = torch.einsum("rk,rnk->rn", a64, w[m[live]]).to(d.dtype)

    def fp8_m_grouped_gemm_nt_masked(self, a_pair, b_pair, d, masked_m, expected_m):
        (a, sa), (b, sb) = a_pair, b_pair
        E, cap, K = a.shape
        assert cap % 128 == 0 and sa.stride() == (cap * K // 128, 1, cap), "aligned capacity, MN-major a_sf"
        assert d.dtype == torch.bfloat16 and masked_m.dtype == torch.int32 and 1 <= expected_m <= cap
        d.fill_(float("nan"))
        a64, w = self._operands(a, sa, b, sb)
        for e, n in enumerate(masked_m.tolist()):
            d[e, :n] = (a64[e, :n] @ w[e].T).to(d.dtype)


@pytest.fixture
def fake_dg(monkeypatch):
    fake = FakeDeepGEMM()
    monkeypatch.setattr(dg8, "_deep_gemm_fp8", lambda: (fake, ""))
    monkeypatch.setattr(dg8, "supports_fp8", lambda x=None, weights=None: (True, ""))
    return fake


def make_weights(E, H, I, g):
    return (*fq.quant_fp8_blocks(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5),
            *fq.quant_fp8_blocks(torch.randn(E, H, I, generator=g) * I ** -0.5))


def ffn_ref(xq, xs, e_of, w, h_bf16=True):
    """float64 [M, H]: quantised rows (xq, xs) through expert e_of[m], h rounded to bf16 (DeepGEMM's output;
    h_bf16=False: triton_fp8 keeps it in float32), silu(gate) * up quantised per 128 columns (float64 amax),
    the down GEMM."""
    x64 = (xq.double().unflatten(-1, (-1, 128)) * xs.double()[..., None]).flatten(-2)
    h = torch.einsum("mh,mnh->mn", x64, fq.dequant_fp8_blocks(w[0], w[1]).double()[e_of])
    gate, up = (h.to(torch.bfloat16).double() if h_bf16 else h).chunk(2, dim=-1)
    act = (F.silu(gate) * up).unflatten(-1, (-1, 128))
    amax = act.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    act = ((act / s).clamp(-448, 448).to(FP8).double() * s).flatten(-2)
    return torch.einsum("mi,mhi->mh", act, fq.dequant_fp8_blocks(w[2], w[3]).double()[e_of])


def rel(out, want):
    assert torch.isfinite(out).all(), "output holds NaN/Inf: a padding row was read"
    return float((out.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_fused_moe_emulated(fake_dg, T, dtype):
    g = torch.Generator().manual_seed(T)
    E, k, H, I = 5, 2, 256, 128
    w = make_weights(E, H, I, g)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)]).to(torch.int32) if T else \
        torch.zeros(0, k, dtype=torch.int32)  # expert E-1 gets no rows
    tw = torch.rand(T, k, generator=g) + 0.1
    out = dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w)
    assert out.shape == (T, H) and out.dtype == dtype
    if T:
        xq, xs = fq.quant_fp8_groups_torch(x)
        pairs = ffn_ref(xq[torch.arange(T * k) // k], xs[torch.arange(T * k) // k], ids.reshape(-1).long(), w)
        assert rel(out, (pairs * tw.reshape(-1, 1).double()).view(T, k, H).sum(1)) < TOL
    with pytest.raises(ValueError, match="DeepGEMM's alignment"):
        dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w, align=ma.moe_align(ids, E, 16))


@pytest.mark.parametrize("fp8_rows", [False, True])
def test_batch_layouts_emulated(fake_dg, fp8_rows):
    """contiguous, gathered and masked (bf16 out for fp8 rows given as strided views with rows_scale)."""
    g = torch.Generator().manual_seed(7)
    E, H, I = 4, 256, 256
    w = make_weights(E, H, I, g)
    counts = torch.tensor([3, 0, 130, 9])
    n = int(counts.sum())
    rows = torch.randn(n, H, generator=g)
    rq, rs = fq.quant_fp8_groups_torch(rows)
    e_of = torch.repeat_interleave(torch.arange(E), counts)
    want = ffn_ref(rq, rs, e_of, w)
    out_dtype = torch.bfloat16 if fp8_rows else torch.float32
    arg, scale = (strided(rq), rs.t().contiguous().t()) if fp8_rows else (rows, None)
    got = dg8.deepgemm_fp8_moe_contiguous(arg, counts, *w, rows_scale=scale)
    assert got.dtype == out_dtype and rel(got, want) < TOL
    perm = torch.randperm(n, generator=g)
    index = torch.argsort(perm)
    arg_p, scale_p = (strided(rq[perm]), rs[perm]) if fp8_rows else (rows[perm], None)
    assert rel(dg8.deepgemm_fp8_moe_gathered(arg_p, index, counts, *w, rows_scale=scale_p), want) < TOL
    cap = 140
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    src = torch.zeros(E, cap, dtype=torch.long)
    for e, (s0, c) in enumerate(zip(starts, counts.tolist())):
        src[e, :c] = torch.arange(s0, s0 + c)
    xm, sm = (rq[src], rs[src]) if fp8_rows else (rows[src], None)
    ym = dg8.deepgemm_fp8_moe_masked(xm, counts, *w, expected_m=32, rows_scale=sm)
    assert ym.shape == (E, cap, H) and ym.dtype == out_dtype
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts.tolist())]), want) < TOL
    empty = dg8.deepgemm_fp8_moe_contiguous(arg[:0], torch.zeros(E, dtype=torch.int64), *w,
                                            rows_scale=None if scale is None else scale[:0])
    assert empty.shape == (0, H) and empty.dtype == out_dtype


def test_supports_fp8_reasons(monkeypatch):
    ok, why = dg8.supports_fp8()
    if not torch.cuda.is_available():
        assert not ok and "CUDA GPU" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "CUDA tensors, got cpu" in dg8.supports_fp8(torch.zeros(1))[1]
    for cap, text in (((10, 0), "UE8M0"), ((8, 9), "need Hopper (sm_90), got sm_89")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert text in dg8.supports_fp8()[1]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(dg8, "_deep_gemm_fp8", lambda: (None, "deep_gemm is not importable (x)"))
    assert dg8.supports_fp8() == (False, "deep_gemm is not importable (x)")
    monkeypatch.setattr(dg8, "_deep_gemm_fp8", lambda: (FakeDeepGEMM(), ""))
    assert dg8.supports_fp8() == (True, "")
    w = make_weights(2, 256, 128, torch.Generator().manual_seed(0))
    assert dg8.supports_fp8(weights=w) == (True, "")
    assert "I=64 must be a multiple of 128" in dg8.supports_fp8(weights=make_weights(2, 256, 64, torch.Generator()))[1]
    assert "float8_e4m3fn" in dg8.supports_fp8(weights=(w[0].float(), *w[1:]))[1]
    assert "(w13_q, w13_scale, w2_q, w2_scale)" in dg8.supports_fp8(weights=w[:2])[1]


def test_deep_gemm_probe(monkeypatch):
    import sys
    import types

    for version, attrs, text in (("0.2.0", dg8.FP8_FNS, "known to misread"), ("0.1.4.post1", (), "has no")):
        mod = types.ModuleType("deep_gemm")
        mod.__version__ = version
        for fn in attrs:
            setattr(mod, fn, print)
        monkeypatch.setitem(sys.modules, "deep_gemm", mod)
        dg8._deep_gemm_fp8.cache_clear()
        assert text in dg8._deep_gemm_fp8()[1]
    dg8._deep_gemm_fp8.cache_clear()


def test_adapter_argument_errors_and_backend(fake_dg):
    from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch, preset
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    w = make_weights(2, 256, 128, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"float8_e4m3fn rows need rows_scale float32 \[3, 2\]"):
        dg8.deepgemm_fp8_moe_contiguous(torch.zeros(3, 256, dtype=FP8), torch.tensor([3, 0]), *w)
    with pytest.raises(ValueError, match="rows_scale is for float8_e4m3fn rows only"):
        dg8.deepgemm_fp8_moe_contiguous(torch.zeros(3, 256), torch.tensor([3, 0]), *w, rows_scale=torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"counts must be \[E=2\]"):
        dg8.deepgemm_fp8_moe_contiguous(torch.zeros(3, 256), torch.tensor([3]), *w)
    with pytest.raises(ValueError, match="w13_q must be"):
        dg8.deepgemm_fp8_moe_masked(torch.zeros(2, 4, 128), torch.tensor([1, 1]), *w)
    with pytest.raises(ValueError, match="index must be a 1-dim int32/int64"):
        dg8.deepgemm_fp8_moe_gathered(torch.zeros(3, 256), torch.zeros(3), torch.tensor([3, 0]), *w)
    be, cpu = EXPERT_BACKENDS["deepgemm_fp8"], torch.device("cpu")
    cfg = preset("tiny").with_(hidden=256, intermediate=128, num_experts=4)
    assert be.fp8 and "CUDA device" in be.supports(cfg, cpu)[1]
    assert "multiples of 128" in be.supports(preset("tiny"), cpu)[1]
    assert "SwiGLU" in be.supports(cfg.with_(expert_type="linear"), cpu)[1]
    rows = torch.randn(5, 256)
    q, s = fq.quant_fp8_groups_torch(rows)
    batch = ExpertBatch(strided(q), torch.tensor([2, 3]), x_scale=s)
    y = be.run(SwiGLUExpertsFP8(*w), batch)
    assert y.x.dtype == torch.bfloat16 and y.x_scale is None
    assert rel(y.x, ffn_ref(q, s, torch.tensor([0, 0, 1, 1, 1]), w)) < TOL
    with pytest.raises(TypeError, match="expert backend 'deepgemm_fp8' runs SwiGLUExpertsFP8"):
        be.run(object(), batch)


@pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")  # triton_fp8's default configs
@pytest.mark.parametrize("layout", ["contiguous", "gathered", "masked"])
def test_fp8_batch_on_both_fp8_backends(fake_dg, layout):
    """An ExpertBatch of FP8 rows (x float8_e4m3fn + x_scale, strided views): triton_fp8 passes x_scale on as
    rows_scale, deepgemm_fp8 likewise; both give bfloat16 rows equal to the same-scheme reference."""
    from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    g = torch.Generator().manual_seed(11)
    E, H, I = 3, 256, 128
    w = make_weights(E, H, I, g)
    counts = torch.tensor([4, 0, 6])
    q, s = fq.quant_fp8_groups_torch(torch.randn(10, H, generator=g))
    e_of = torch.repeat_interleave(torch.arange(E), counts)
    if layout == "contiguous":
        batch = ExpertBatch(strided(q), counts, x_scale=s.t().contiguous().t())
    elif layout == "gathered":
        perm = torch.randperm(10, generator=g)
        batch = ExpertBatch(strided(q[perm]), counts, "gathered", index=torch.argsort(perm), x_scale=s[perm])
    else:
        src = torch.tensor([[0, 1, 2, 3, 0, 0, 0], [0] * 7, [4, 5, 6, 7, 8, 9, 0]])
        batch = ExpertBatch(strided(q[src]), counts, "masked", x_scale=s[src])
    for name in ("triton_fp8", "deepgemm_fp8"):
        y = EXPERT_BACKENDS[name].run(SwiGLUExpertsFP8(*w), batch)
        got = torch.cat([y.x[0, :4], y.x[2, :6]]) if layout == "masked" else y.x
        want = ffn_ref(q, s, e_of, w, h_bf16=name == "deepgemm_fp8")
        assert y.x.dtype == torch.bfloat16 and y.x_scale is None and rel(got, want) < TOL, name
