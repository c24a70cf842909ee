"""Block-scaled FP8 fused MoE (kernels/fused_moe_fp8*.py) against float64 references, on the CPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate (multiples of 128), P = T*k
(token, k) pairs, R rows of a batch, cap rows per expert (masked), G = 128 the scale group.
Two references: (1) the same quantised inputs (dequantised x and weights, float64 matmuls, the SwiGLU
output quantised per 128 columns the same way): the kernels differ from it only by float32
accumulation order, so each GEMM is checked to 1e-5 (the fp8 intermediate through its ties, see
`check_quantised`); (2) the float64 FFN on the dequantised weights with unquantised activations: the
scheme's own error (~4.3% relative Frobenius, see ACCURACY_BOUND), which the kernel must not add to.
Runs under TRITON_INTERPRET=1 (float32/float16 x).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.fp8_quant as fq  # noqa: E402
import nanomoe_kernels.fused_moe as fm  # noqa: E402
import nanomoe_kernels.fused_moe_fp8 as f8  # noqa: E402
import nanomoe_kernels.fused_moe_fp8_kernel as f8k  # noqa: E402
import nanomoe_kernels.fused_moe_fp8_tile as f8t  # noqa: E402
import nanomoe_kernels.fused_moe_kernel as fmk  # noqa: E402
import nanomoe_kernels.moe_align as ma  # noqa: E402
import nanomoe_kernels.moe_blocks as mb  # noqa: E402
import nanomoe_kernels.moe_sum as ms  # noqa: E402
import nanomoe_kernels.moe_swap_blocks as msb  # noqa: E402
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not fmk.runs_interpreted():
    for mod in (ma, mb, ms, msb, fq, fmk, fm, f8t, f8k, f8):  # imported before the variable was set: decorate again
        importlib.reload(mod)

pytestmark = pytest.mark.skipif(not fmk.runs_interpreted(),
                                reason="CPU kernel tests run under TRITON_INTERPRET=1 (GPU: tests/gpu/)")
FP8 = torch.float8_e4m3fn
# vs the unquantised FFN. The issue asks 3e-2, which no implementation of this scheme meets on Gaussian
# inputs: e4m3 (3 mantissa bits) per-128 rounding is ~2.6% RMS per quantised tensor; x's error passes
# through gate and up into silu(gate) * up (~3.7%), the activation's own adds ~2.3%: ~4.3% in float64
# simulation at these dims and at DeepSeek-V3's (H=7168, I=2048). The kernel must add nothing to it.
ACCURACY_BOUND = 5e-2
CFG = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=2)
CONFIGS = [CFG,
           {"up": {**CFG, "BLOCK_M": 32, "GROUP_M": 2}, "down": {**CFG, "BLOCK_N": 64}},
           # 64-row main blocks + 16-row tails (moe_blocks), two launches; the down tile spans 2 weight blocks
           {"up": {**CFG, "BLOCK_M": 64, "SPLIT_M": 16}, "down": {**CFG, "BLOCK_M": 32, "BLOCK_N": 256}},
           {**CFG, "BLOCK_M": 32, "SPLIT_M": 16, "MERGE_TAIL": True, "GROUP_M": 4},
           # weights through TMA (the interpreter emulates the descriptors)
           {"up": {**CFG, "USE_TMA": True}, "down": {**CFG, "BLOCK_M": 32, "BLOCK_N": 256, "USE_TMA": True}},
           # two scale groups per K iteration (needs K % 256 == 0: the up GEMM at H=256, not the down at I=128)
           {"up": {**CFG, "K_STEPS": 2, "USE_TMA": True}, "down": CFG}]


def deq_rows(q, s):
    """q [R, K] fp8 * s [R, K/128] -> float64."""
    return (q.double().view(q.shape[0], -1, 128) * s.double()[..., None]).view(q.shape)


def quant_ref(v):
    """float64 v [.., K] quantised per 128 columns as the scheme does (float64 amax): (q as float64, scale)."""
    g = v.view(*v.shape[:-1], -1, 128)
    amax = g.abs().amax(-1)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    return (g / s[..., None]).clamp(-448, 448).to(FP8).double().view(v.shape), s


def make_case(T, k, E, H, I, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, s13 = fq.quant_fp8_blocks(torch.randn(E, 2 * I, H, generator=g) * H ** -0.5)
    w2, s2 = fq.quant_fp8_blocks(torch.randn(E, H, I, generator=g) * I ** -0.5)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    return x, ids.to(torch.int32).reshape(T, k), torch.rand(T, k, generator=g) + 0.1, (w13, s13, w2, s2)


def act64(xd, e, w):
    """float64 silu(gate) * up of rows xd [R, H] through expert ids e [R] (weights dequantised)."""
    h = torch.einsum("rh,rnh->rn", xd, fq.dequant_fp8_blocks(w[0], w[1]).double()[e])
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def down64(a, e, w):
    return torch.einsum("ri,rhi->rh", a, fq.dequant_fp8_blocks(w[2], w[3]).double()[e])


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def check_quantised(q, s, v):
    """q fp8 [R, I] and s [R, I/128] quantise float64 v [R, I]: scales to 1e-6, each value the nearest
    e4m3 of v / s except at ties within float32 accumulation error (then either neighbour)."""
    _, s_ref = quant_ref(v)
    assert torch.allclose(s.double(), s_ref, rtol=1e-6, atol=0), "output scales differ from amax / 448"
    y = v / s.double().repeat_interleave(128, 1)
    want = y.clamp(-448, 448).to(FP8).double()
    bad = q.double() != want
    near = (y - (q.double() + want) / 2).abs() <= 1e-5 * y.abs() + 1e-30
    assert not (bad & ~near).any(), f"{int((bad & ~near).sum())} fp8 outputs are not the nearest e4m3 value"
    return int(bad.sum())


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_each_gemm_matches_same_quant_reference(ci):
    """Up GEMM (float32 out, then fp8 out with scales) and down GEMM (weights, scatter), one by one."""
    T, k, E, H, I = 20, 2, 4, 256, 128
    x, ids, tw, w = make_case(T, k, E, H, I, seed=ci)
    up, down, bm = f8.fp8_configs(CONFIGS[ci], E, H, I, T * k, x.device)
    align = ma.moe_align(ids, E, bm)
    xq, xs = fq.quant_fp8_groups_torch(x)
    e_of = ids.reshape(-1).long()
    want_act = act64(deq_rows(xq, xs)[torch.arange(T * k) // k], e_of, w)
    act32 = f8k.moe_gemm_fp8(xq, xs, w[0], w[1], torch.empty(T * k, I), align, {**up, "BLOCK_N": 64},
                             gather_a=True, scatter_c=True, a_div=k, swiglu=True)
    assert rel(act32, want_act) < 1e-5
    R = align.sorted_ids.numel()
    inter, inter_s = torch.empty(R, I, dtype=FP8), torch.empty(R, I // 128)
    f8k.moe_gemm_fp8(xq, xs, w[0], w[1], inter, align, up, gather_a=True, scatter_c=False, a_div=k, swiglu=True,
                     out_scale=inter_s)
    sid = align.sorted_ids[:int(align.num_padded)].long()
    pos = torch.nonzero(sid < T * k).flatten()  # aligned position of each pair
    check_quantised(inter[pos], inter_s[pos], want_act[sid[pos]])
    out = torch.full((T * k, H), float("nan"))
    f8k.moe_gemm_fp8(inter, inter_s, w[2], w[3], out, align, down, gather_a=False, scatter_c=True,
                     row_weights=tw.reshape(-1).float())
    a = torch.zeros(T * k, I, dtype=torch.float64)
    a[sid[pos]] = deq_rows(inter[pos], inter_s[pos])
    assert rel(out, down64(a, e_of, w) * tw.reshape(-1, 1).double()) < 1e-5


def ffn_same_quant(x, ids, tw, w):
    """Reference (1) for fused_moe_fp8: x quantised per token, float64 GEMMs, the activation quantised."""
    T, k = ids.shape
    xq, xs = fq.quant_fp8_groups_torch(x)
    e_of = ids.reshape(-1).long()
    q, s = quant_ref(act64(deq_rows(xq, xs)[torch.arange(T * k) // k], e_of, w))
    y = down64((q.view(T * k, -1, 128) * s[..., None]).view(q.shape), e_of, w) * tw.reshape(-1, 1).double()
    return y.view(T, k, -1).sum(1)


def ffn_unquantised(x, ids, tw, w):
    """Reference (2): the float64 FFN on the dequantised weights, x and the activation unquantised."""
    T, k = ids.shape
    y = down64(act64(x.double()[torch.arange(T * k) // k], ids.reshape(-1).long(), w), ids.reshape(-1).long(), w)
    return (y * tw.reshape(-1, 1).double()).view(T, k, -1).sum(1)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_fp8_matches_references(ci, dtype):
    T, k, E, H, I = 24, 3, 4, 256, 128
    x, ids, tw, w = make_case(T, k, E, H, I, seed=10 + ci, dtype=dtype)
    ids[: T // 2, 0] = 0  # a hot expert; expert 3 may still be empty for some seeds
    ids[: T // 2, 1:] = torch.tensor([1, 2], dtype=torch.int32)
    out = f8.fused_moe_fp8(x, ids, tw, *w, config=CONFIGS[ci])
    assert out.dtype == dtype and out.shape == (T, H)
    # float16 output rounds each pair's row (~5e-4); float32 keeps the 1e-5 of the accumulation order (no
    # activation of these fixed, interpreter-deterministic cases sits on an e4m3 tie: a flipped one would
    # show as ~1e-4 here; test_each_gemm_matches_same_quant_reference accepts ties explicitly)
    assert rel(out, ffn_same_quant(x, ids, tw, w)) < (1e-5 if dtype == torch.float32 else 1e-3)
    want = ffn_unquantised(x, ids, tw, w)
    err, scheme = rel(out, want), rel(ffn_same_quant(x, ids, tw, w), want)
    assert abs(err - scheme) < 1e-3 * scheme + 1e-4, f"kernel error {err:.4g} != the scheme's own {scheme:.4g}"
    assert err < ACCURACY_BOUND, f"FP8 FFN error {err:.3g} vs the unquantised float64 FFN > {ACCURACY_BOUND}"


def expert_rows_ref(rows, counts, w, ref=None):
    """Reference (1) (or `ref`, e.g. ffn_unquantised) per row: row i of expert e (counts in order) ->
    expert_e(rows[i])."""
    e_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return (ref or ffn_same_quant)(rows, e_of[:, None].to(torch.int32), torch.ones(len(e_of), 1), w)


@pytest.mark.parametrize("ci", [0, 3])
def test_layouts_contiguous_gathered_masked(ci):
    counts, E, H, I = [5, 0, 19, 1], 4, 128, 128
    _, _, _, w = make_case(0, 1, E, H, I, seed=ci)
    g = torch.Generator().manual_seed(7)
    n = sum(counts)
    rows = torch.randn(n + 2, H, generator=g)  # 2 rows past sum(counts): unowned, unwritten
    cnt = torch.tensor(counts)
    want = expert_rows_ref(rows[:n], counts, w)
    out = f8.fused_moe_fp8_contiguous(rows, cnt, *w, config=CONFIGS[ci], validate=True)
    assert out.shape == (n + 2, H) and rel(out[:n], want) < 1e-5
    index = torch.randint(0, 9, (n,), generator=g)
    out = f8.fused_moe_fp8_gathered(rows[:9], index, cnt, *w, config=CONFIGS[ci], validate=True)
    assert rel(out, expert_rows_ref(rows[index], counts, w)) < 1e-5
    cap = 21
    xm = torch.randn(E, cap, H, generator=g)
    starts = [sum(counts[:e]) for e in range(E)]
    for e, c in enumerate(counts):
        xm[e, :c] = rows[starts[e]:starts[e] + c]
    ym = f8.fused_moe_fp8_masked(xm, cnt, *w, config=CONFIGS[ci], validate=True)
    assert ym.shape == (E, cap, H)
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts)]), want) < 1e-5


def test_empty_inputs_and_empty_experts():
    x, ids, tw, w = make_case(6, 2, 4, 128, 128, seed=3)
    assert f8.fused_moe_fp8(x[:0], ids[:0], tw[:0], *w, config=CFG).shape == (0, 128)
    none = torch.zeros(4, dtype=torch.int64)
    assert f8.fused_moe_fp8_contiguous(x[:0], none, *w, config=CFG).shape == (0, 128)
    assert f8.fused_moe_fp8_gathered(x, ids[:0, 0], none, *w, config=CFG).shape == (0, 128)
    assert f8.fused_moe_fp8_masked(x.view(1, 6, 128).expand(4, 6, 128), none, *w, config=CFG).shape == (4, 6, 128)
    ids = torch.tensor([[1, 2]] * 6, dtype=torch.int32)  # experts 0 and 3 receive nothing
    assert rel(f8.fused_moe_fp8(x, ids, tw, *w, config=CFG), ffn_same_quant(x, ids, tw, w)) < 1e-5


def test_bad_inputs_name_the_argument():
    x, ids, tw, w = make_case(4, 2, 3, 128, 128, seed=5)
    w13, s13, w2, s2 = w
    call = f8.fused_moe_fp8
    with pytest.raises(TypeError, match="w13_q must be float8_e4m3fn"):
        call(x, ids, tw, w13.float(), s13, w2, s2, config=CFG)
    with pytest.raises(TypeError, match="w2_q must be float8_e4m3fn"):
        call(x, ids, tw, w13, s13, w2.to(torch.float16), s2, config=CFG)
    with pytest.raises(ValueError, match=r"w13_scale must be float32 \[3, 2, 1\]"):
        call(x, ids, tw, w13, s13[:, :1].contiguous(), w2, s2, config=CFG)
    with pytest.raises(ValueError, match="w2_scale must be float32"):
        call(x, ids, tw, w13, s13, w2, s2.double(), config=CFG)
    q96, s96 = fq.quant_fp8_blocks(torch.randn(3, 192, 96))  # H = 96
    q2, s2b = fq.quant_fp8_blocks(torch.randn(3, 96, 96))
    with pytest.raises(ValueError, match="hidden size H=96 must be a multiple of 128"):
        call(torch.randn(4, 96), ids, tw, q96, s96, q2, s2b, config=CFG)
    qi, si = fq.quant_fp8_blocks(torch.randn(3, 128, 128))  # I = 64
    qd, sd = fq.quant_fp8_blocks(torch.randn(3, 128, 64))
    with pytest.raises(ValueError, match="intermediate size I=64 must be a multiple of 128"):
        call(x, ids, tw, qi, si, qd, sd, config=CFG)
    with pytest.raises(ValueError, match="w13_q must be"):
        call(x, ids, tw, w13, s13, w2[:, :, :64].contiguous(), s2, config=CFG)
    with pytest.raises(ValueError, match="w13_q must be contiguous"):
        call(x, ids, tw, w13.transpose(1, 2).contiguous().transpose(1, 2), s13, w2, s2, config=CFG)
    with pytest.raises(TypeError, match="x must be one of"):
        call(x.to(FP8), ids, tw, *w, config=CFG)
    with pytest.raises(ValueError, match="BLOCK_K.. must be 128"):
        call(x, ids, tw, *w, config={**CFG, "BLOCK_K": 64})
    with pytest.raises(ValueError, match="BLOCK_N.. must be 128 .the quantised output"):
        call(x, ids, tw, *w, config={**CFG, "BLOCK_N": 64})
    with pytest.raises(ValueError, match="K_STEPS=2 needs K=128 to be a multiple of 256"):
        call(x, ids, tw, *w, config={**CFG, "K_STEPS": 2})
    with pytest.raises(ValueError, match="K_STEPS.*must be 1, 2 or 4"):
        call(x, ids, tw, *w, config={**CFG, "K_STEPS": 3})
    for key in ("A_TMA", "PERMUTE_A"):
        with pytest.raises(ValueError, match="A_TMA and PERMUTE_A are not implemented by the FP8 kernel"):
            call(x, ids, tw, *w, config={**CFG, key: True})
    with pytest.raises(ValueError, match="topk_weights"):
        call(x, ids, tw[:, :1], *w, config=CFG)
    with pytest.raises(ValueError, match="expert ids outside"):
        call(x, ids + 3, tw, *w, config=CFG, validate=True)
    with pytest.raises(ValueError, match="counts must"):
        f8.fused_moe_fp8_contiguous(x, torch.tensor([3, 3, 3]), *w, config=CFG, validate=True)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 4\)"):
        f8.fused_moe_fp8_gathered(x, torch.tensor([0, 9]), torch.tensor([2, 0, 0]), *w, config=CFG, validate=True)
    with pytest.raises(ValueError, match="a_scale must be float32"):
        f8k.moe_gemm_fp8(x.to(FP8), torch.ones(4, 2), w13, s13, torch.empty(8, 128), ma.moe_align(ids, 3, 16), CFG,
                         gather_a=True, scatter_c=True, a_div=2, swiglu=True)


def test_default_configs_are_valid():
    for M in (1, 64, 512, 8192, 65536):
        for op in ("up", "down"):
            f8k.check_fp8_config(f8.default_config_fp8(op, M, 32), quant_out=op == "up")



@pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")  # the backend's default configs
def test_backend_triton_fp8_runs_fp8_records_only():
    from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch, expert_ffn, preset
    from nanomoe_fn.moe.fp8_params import quantize_experts
    from nanomoe_fn.moe.params import SwiGLUExperts

    be, cpu = EXPERT_BACKENDS["triton_fp8"], torch.device("cpu")
    cfg = preset("tiny").with_(hidden=128, intermediate=128, num_experts=4)
    assert be.fp8 and be.supports(cfg, cpu) == (True, "")
    ok, why = be.supports(preset("tiny"), cpu)  # hidden 32
    assert not ok and "hidden (32)" in why and "multiples of 128" in why
    assert "SwiGLU" in be.supports(cfg.with_(expert_type="linear"), cpu)[1]
    g = torch.Generator().manual_seed(4)
    bf = SwiGLUExperts(torch.randn(4, 256, 128, generator=g) * 128 ** -0.5,
                       torch.randn(4, 128, 128, generator=g) * 128 ** -0.5)
    ex = quantize_experts(bf)
    w = (ex.w13, ex.w13_scale, ex.w2, ex.w2_scale)
    counts = [3, 0, 9, 2]
    rows = torch.randn(sum(counts), 128, generator=g)
    want = expert_rows_ref(rows, counts, w)
    batch = ExpertBatch(rows, torch.tensor(counts))
    assert rel(expert_ffn(ex, batch, "triton_fp8").x, want) < 1e-5
    index = torch.randint(0, 5, (sum(counts),), generator=g)
    y = expert_ffn(ex, ExpertBatch(rows[:5], torch.tensor(counts), "gathered", index), "triton_fp8")
    assert rel(y.x, expert_rows_ref(rows[index], counts, w)) < 1e-5
    xm = torch.zeros(4, 9, 128)
    for e, (s, c) in enumerate(zip([0, 3, 3, 12], counts)):
        xm[e, :c] = rows[s:s + c]
    ym = expert_ffn(ex, ExpertBatch(xm, torch.tensor(counts), "masked"), "triton_fp8").x
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts)]), want) < 1e-5
    for name in ("loop", "bmm", "triton"):
        with pytest.raises(TypeError, match=f"expert backend '{name}' runs bf16/fp16/fp32 experts, got "
                                            f"SwiGLUExpertsFP8.*triton_fp8"):
            expert_ffn(ex, batch, name)
    with pytest.raises(TypeError, match="expert backend 'triton_fp8' runs SwiGLUExpertsFP8.*got SwiGLUExperts"):
        expert_ffn(bf, batch, "triton_fp8")
    with pytest.raises(ValueError, match="x_scale must be given exactly when x is float8_e4m3fn"):
        expert_ffn(ex, ExpertBatch(rows.to(FP8), torch.tensor(counts)), "triton_fp8")
