"""The deepgemm_fp8 expert backend (kernels/deepgemm_fp8.py, glue in kernels/fp8_glue.py) on a Hopper GPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, HG = H / 128, cap rows per expert
(masked), S sampled tokens. References in float64 on the GPU, one expert at a time (tokens are independent,
so large T is checked on S sampled tokens): "same quant" = x quantised per token as the kernels do
(quant_fp8_groups_torch), float64 GEMMs on the dequantised weights, h rounded to bf16 (DeepGEMM's output;
triton_fp8 keeps it in float32: h_bf16=False), the activation quantised per 128 columns; "unquantised" =
the FFN on the dequantised weights with x and the activation unquantised (the scheme's ~4.3% error, which
neither backend may add to). Checked: DeepGEMM's acceptance of our MN-major scale layout (bit-equal to
row-major scales) and its row independence (NaN padding rows inside a live block), deepgemm_fp8 vs the
reference and vs triton_fp8 at small and DeepSeek-V3 dims (H=7168, I=2048, E=32, top-8, T=64 and 4096),
contiguous / gathered / masked batches, pre-quantised fp8 rows as strided views of a packed receive
buffer, zero tokens, CUDA-graph capture. Marked `gpu`; skipped with supports_fp8()'s reason.
"""

import pytest
import torch
import torch.nn.functional as F
from nanomoe_kernels import deepgemm_fp8 as dg8
from nanomoe_kernels.fp8_quant import dequant_fp8_blocks, quant_fp8_blocks, quant_fp8_groups, quant_fp8_groups_torch
from nanomoe_kernels.fused_moe_fp8 import fused_moe_fp8, fused_moe_fp8_contiguous
from nanomoe_kernels.moe_align import moe_align
from nanomoe_reference.expert_rows import make_routing

from tests.helpers import capture_graph

OK, WHY = dg8.supports_fp8() if torch.cuda.is_available() else (False, "needs CUDA")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"DeepGEMM FP8 unavailable: {WHY}"),
              pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")]
FP8 = torch.float8_e4m3fn
SAME_QUANT_TOL = 1e-2  # bf16 output rounding, Hopper's fp8 MMA accumulation in a 128-deep step, and fp8 ties of the
# activation (one flipped tie moves an element by 1/16: 5.1e-3 seen on a 1-token sample at small dims, run 41)
CROSS_TOL = 3e-2  # deepgemm_fp8 vs triton_fp8: DeepGEMM's bf16 h moves activation values across fp8 ties
ACCURACY_BOUND = 5e-2
SMALL, V3 = (8, 4, 512, 256), (32, 8, 7168, 2048)  # E, k, H, I


def make_experts(E, H, I, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (*quant_fp8_blocks(torch.randn(E, 2 * I, H, generator=g, device="cuda") * H ** -0.5),
            *quant_fp8_blocks(torch.randn(E, H, I, generator=g, device="cuda") * I ** -0.5))


def deq_rows(q, s):
    return (q.double().unflatten(-1, (-1, 128)) * s.double()[..., None]).flatten(-2)


def quant64(v):
    g = v.unflatten(-1, (-1, 128))
    amax = g.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return ((g / s).clamp(-448, 448).to(FP8).double() * s).flatten(-2)


def reference(xd, ids, tw, w, same_quant=True, h_bf16=True):
    """float64 [T, H] = sum_j tw[t, j] * expert_{ids[t, j]}(xd[t]); xd float64 (already dequantised rows, or
    the raw rows with same_quant=False)."""
    out = torch.zeros(xd.shape[0], xd.shape[1], dtype=torch.float64, device=xd.device)
    for e in range(w[0].shape[0]):
        tok, j = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xd[tok] @ dequant_fp8_blocks(w[0][e], w[1][e]).double().T
        gate, up = (h.to(torch.bfloat16).double() if h_bf16 and same_quant else h).chunk(2, dim=-1)
        act = F.silu(gate) * up
        y = (quant64(act) if same_quant else act) @ dequant_fp8_blocks(w[2][e], w[3][e]).double().T
        out.index_add_(0, tok, y * tw[tok, j].double()[:, None])
    return out


def xq64(x):
    return deq_rows(*quant_fp8_groups_torch(x))


def rel(out, want):
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    return float((out.double() - want).norm() / want.norm().clamp_min(1e-30))


def test_dg_takes_our_scale_layout_and_rows_are_independent():
    """The assumptions the adapter rests on: DeepGEMM reads MN-major TMA-aligned LHS scales (ours) exactly as
    row-major ones; a NaN padding row inside a live block (what silu_mul_quant leaves) touches only itself."""
    dg = dg8._deep_gemm_fp8()[0]
    A = dg8.alignment_fp8()
    E, H, N = 3, 512, 256
    b, bs, _, _ = make_experts(E, H, N // 2)
    m = torch.full((4 * A,), -1, dtype=torch.int32, device="cuda")
    m[:A - 5], m[A:2 * A], m[3 * A:3 * A + 7] = 0, 2, 1
    a = torch.randn(4 * A, H, device="cuda")
    outs = []
    for layout in ("row", "col_tma"):
        q, s = quant_fp8_groups(a, scale_layout=layout)
        d = torch.empty(4 * A, N, dtype=torch.bfloat16, device="cuda")
        dg.m_grouped_fp8_gemm_nt_contiguous((q, s), (b, bs), d, m)
        outs.append(d)
    live = m >= 0
    assert torch.equal(outs[0][live], outs[1][live])
    want = torch.einsum("rk,rnk->rn", xq64(a[live]), dequant_fp8_blocks(b, bs).double()[m[live].long()])
    assert rel(outs[1][live], want) < SAME_QUANT_TOL
    q.view(torch.uint8)[A - 5:A] = 0x7F  # NaN bytes and scales in padding rows of block 0
    s[A - 5:A] = float("nan")
    dg.m_grouped_fp8_gemm_nt_contiguous((q, s), (b, bs), d, m)
    assert torch.equal(d[live], outs[1][live])
    xm = torch.randn(E, A, H, device="cuda")
    counts = torch.tensor([A, 3, 0], dtype=torch.int32, device="cuda")
    qm, sm = quant_fp8_groups(xm.view(-1, H))
    for scales in (sm.view(E, A, -1), dg8.pack_masked_fp8(xm, counts, A)[1]):  # row-major, then ours
        d = torch.empty(E, A, N, dtype=torch.bfloat16, device="cuda")
        dg.fp8_m_grouped_gemm_nt_masked((qm.view(E, A, H), scales), (b, bs), d, counts, A)
        outs.append(torch.cat([d[0], d[1, :3]]))
    assert torch.equal(outs[-2], outs[-1])


@pytest.mark.parametrize("dims, T", [(SMALL, 1), (SMALL, 300), (V3, 64), (V3, 4096)])
def test_fused_vs_reference_and_triton_fp8(dims, T):
    E, k, H, I = dims
    w = make_experts(E, H, I, seed=T)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=T)
    out = dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    tri = fused_moe_fp8(x, ids, tw, *w)
    S = torch.linspace(0, T - 1, min(T, 64), device="cuda").long().unique()
    xd, ids_s, tw_s = xq64(x[S]), ids[S], tw[S]
    assert rel(out[S], reference(xd, ids_s, tw_s, w)) < SAME_QUANT_TOL
    assert rel(tri[S], reference(xd, ids_s, tw_s, w, h_bf16=False)) < SAME_QUANT_TOL
    assert rel(out, tri.double()) < CROSS_TOL
    raw = reference(x[S].double(), ids_s, tw_s, w, same_quant=False)
    err, err_tri = rel(out[S], raw), rel(tri[S], raw)
    assert err < ACCURACY_BOUND and abs(err - err_tri) < 5e-3, f"deepgemm_fp8 {err:.4g} vs triton_fp8 {err_tri:.4g}"
    al = moe_align(ids, E, dg8.alignment_fp8())  # a pre-made alignment gives the same result
    assert torch.equal(dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w, align=al), out)


def packed(rows):
    """rows [n, H] -> (fp8 rows, scales) as strided views of one packed uint8 receive buffer [n, H + 4 * HG]
    (each row's fp8 bytes, then its float32 scales), as an FP8 comm delivers them."""
    q, s = quant_fp8_groups(rows)
    n, H = q.shape
    buf = torch.zeros(n, H + 4 * s.shape[1], dtype=torch.uint8, device=rows.device)
    buf[:, :H] = q.view(torch.uint8)
    buf[:, H:] = s.contiguous().view(torch.uint8)
    return buf[:, :H].view(FP8), buf[:, H:].view(torch.float32)


@pytest.mark.parametrize("fp8_rows", [False, True])
def test_layouts(fp8_rows):
    E, H, I = 6, 512, 256
    w = make_experts(E, H, I, seed=1)
    counts = torch.tensor([5, 0, 70, 1, 133, 0], device="cuda")
    n = int(counts.sum())
    rows = torch.randn(n, H, device="cuda").to(torch.bfloat16)
    e_of = torch.repeat_interleave(torch.arange(E, device="cuda"), counts)[:, None]
    ones = torch.ones(n, 1, device="cuda")
    want = reference(xq64(rows), e_of, ones, w)
    arg, scale = packed(rows) if fp8_rows else (rows, None)
    assert arg.stride(0) > H or not fp8_rows
    got = dg8.deepgemm_fp8_moe_contiguous(arg, counts, *w, rows_scale=scale)
    assert got.dtype == torch.bfloat16 and rel(got, want) < SAME_QUANT_TOL
    tri = fused_moe_fp8_contiguous(arg, counts, *w, rows_scale=scale)
    assert rel(got, tri.double()) < CROSS_TOL
    index = torch.randint(0, 40, (n,), device="cuda")
    got = dg8.deepgemm_fp8_moe_gathered(arg[:40], index, counts, *w,
                                        rows_scale=None if scale is None else scale[:40])
    assert rel(got, reference(xq64(rows[index]), e_of, ones, w)) < SAME_QUANT_TOL
    cap = 140  # not a multiple of the alignment: the masked path pads it
    src = torch.zeros(E, cap, dtype=torch.long, device="cuda")
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    for e, (s0, c) in enumerate(zip(starts, counts.tolist())):
        src[e, :c] = torch.arange(s0, s0 + c, device="cuda")
    xm, sm = (arg.view(torch.uint8)[src].view(FP8), scale[src]) if fp8_rows else (rows[src], None)
    ym = dg8.deepgemm_fp8_moe_masked(xm, counts, *w, expected_m=32, rows_scale=sm)
    assert ym.shape == (E, cap, H) and ym.dtype == torch.bfloat16
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts.tolist())]), want) < SAME_QUANT_TOL


def test_zero_tokens_and_empty_experts():
    E, k, H, I = 4, 2, 256, 128
    w = make_experts(E, H, I, seed=2)
    x = torch.randn(0, H, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(0, E, k, "cuda")
    assert dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w).shape == (0, H)
    zeros = torch.zeros(E, dtype=torch.int64, device="cuda")
    assert dg8.deepgemm_fp8_moe_contiguous(x, zeros, *w).shape == (0, H)
    assert dg8.deepgemm_fp8_moe_masked(torch.randn(E, 8, H, device="cuda"), zeros, *w).shape == (E, 8, H)
    assert dg8.deepgemm_fp8_moe_masked(torch.randn(E, 0, H, device="cuda"), zeros, *w).shape == (E, 0, H)


def test_expert_ffn_backends():
    from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch, expert_ffn, preset
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    cfg = preset("tiny").with_(hidden=512, intermediate=256, num_experts=6)
    assert EXPERT_BACKENDS["deepgemm_fp8"].supports(cfg, torch.device("cuda")) == (True, "")
    ex = SwiGLUExpertsFP8(*make_experts(6, 512, 256, seed=4))
    counts = torch.tensor([3, 0, 17, 1, 9, 4], device="cuda")
    rows = torch.randn(int(counts.sum()), 512, device="cuda").to(torch.bfloat16)
    y = expert_ffn(ex, ExpertBatch(rows, counts), "deepgemm_fp8").x
    assert rel(y, expert_ffn(ex, ExpertBatch(rows, counts), "triton_fp8").x.double()) < CROSS_TOL
    q, s = packed(rows)  # an FP8 batch (run directly: expert_ffn's checks are another stage's)
    yq = EXPERT_BACKENDS["deepgemm_fp8"].run(ex, ExpertBatch(q, counts, x_scale=s)).x
    assert yq.dtype == torch.bfloat16 and torch.equal(yq, y)


@pytest.mark.parametrize("mode", ["masked", "masked_fp8", "fused"])
def test_cuda_graph_capture(mode):
    """No host sync: the masked path (quantisation/pack, both GEMMs, silu_mul_quant) and the fused path
    with its alignment inside the graph capture, then replay on new inputs."""
    E, k, H, I, cap = 8, 4, 512, 256, 48
    w = make_experts(E, H, I, seed=3)
    x = torch.randn(64, H, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(64, E, k, "cuda", seed=3)
    counts = torch.tensor([40, 0, 7, 48, 1, 30, 12, 5], device="cuda")
    xm = torch.randn(E, cap, H, device="cuda").to(torch.bfloat16)
    qm, sm = (t.view(E, cap, -1) for t in quant_fp8_groups(xm.view(-1, H)))

    def run():
        if mode == "fused":
            return dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w)
        if mode == "masked_fp8":
            return dg8.deepgemm_fp8_moe_masked(qm, counts, *w, rows_scale=sm)
        return dg8.deepgemm_fp8_moe_masked(xm, counts, *w)

    graph, out = capture_graph(run)
    ids2, tw2 = make_routing(64, E, k, "cuda", seed=4)
    x.copy_(torch.randn_like(x)), ids.copy_(ids2), tw.copy_(tw2), xm.copy_(torch.randn_like(xm))
    for t, new in zip((qm, sm), (t.view(E, cap, -1) for t in quant_fp8_groups(xm.view(-1, H)))):
        t.copy_(new)
    counts.copy_(torch.tensor([3, 48, 0, 9, 20, 0, 33, 2], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    if mode == "fused":
        assert rel(out, reference(xq64(x), ids, tw, w)) < SAME_QUANT_TOL
        return
    c = counts.tolist()
    rows = torch.cat([xm[e, :n] for e, n in enumerate(c)])
    e_of = torch.repeat_interleave(torch.arange(E, device="cuda"), counts)[:, None]
    want = reference(xq64(rows), e_of, torch.ones(len(e_of), 1, device="cuda"), w)
    assert rel(torch.cat([out[e, :n] for e, n in enumerate(c)]), want) < SAME_QUANT_TOL
