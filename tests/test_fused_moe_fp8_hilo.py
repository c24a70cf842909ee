"""Two-term FP8 activations (act_terms=2, backend `triton_fp8_hilo`), the swapped MMA (config SWAP_AB) and the
block layout of the weights (tile_weights) of kernels/fused_moe_fp8*.py, on the CPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate (multiples of 128), P = T*k pairs,
R aligned rows, K quantised columns, v = x / scale (the quantiser's scaled value).
The two-term scheme as kernels/fp8_quant.py documents and implements it: q [M, 2K] = [hi | lo],
hi = e4m3(v), lo = e4m3(v - hi), value (hi + lo) * scale (lo is not rescaled: below |v - hi| = 2^-6 it is
subnormal, spacing 2^-9, so the absolute error floor is 2^-10 of the scale).
References: float64 math on the dequantised two-term values (GEMMs to 1e-5), and the float64 FFN on the
dequantised weights with unquantised activations (tests/test_fused_moe_fp8.py's ffn_unquantised): two
terms land within HILO_BOUND of it where one term is ~4e-2. Runs under TRITON_INTERPRET=1.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# the kernel modules come from tests.test_fused_moe_fp8, which turns on the interpreter on CPU-only machines and
# decorates them again when they were imported before it was set
from tests.test_fused_moe_fp8 import (
    CFG,
    act64,
    check_quantised,
    down64,
    expert_rows_ref,
    f8,
    f8k,
    ffn_unquantised,
    fmk,
    fq,
    ma,
    make_case,
    rel,
)

pytestmark = pytest.mark.skipif(not fmk.runs_interpreted(),
                                reason="CPU kernel tests run under TRITON_INTERPRET=1 (GPU: tests/gpu/)")
FP8 = torch.float8_e4m3fn
HILO_BOUND = 4e-3  # two terms vs the unquantised float64 FFN (measured ~1e-3 at these dims; one term ~4.6e-2)
SWAPPED = [{**CFG, "SWAP_AB": True},
           {"up": {**CFG, "SWAP_AB": True, "USE_TMA": True},
            "down": {**CFG, "BLOCK_M": 32, "BLOCK_N": 256, "SWAP_AB": True, "USE_TMA": True}},
           {**CFG, "BLOCK_M": 32, "SPLIT_M": 16, "MERGE_TAIL": True, "SWAP_AB": True, "K_STEPS": 2}]
# tiles vs rows: pointer loads; TMA at BLOCK_N 128/64; BLOCK_N 256 + TMA (tiles fall back to pointer loads)
TILE_CONFIGS = [CFG,
                {"up": {**CFG, "USE_TMA": True}, "down": {**CFG, "BLOCK_N": 64, "USE_TMA": True}},
                {"up": {**CFG, "USE_TMA": True, "K_STEPS": 2},
                 "down": {**CFG, "BLOCK_M": 32, "BLOCK_N": 256, "USE_TMA": True}},
                {"up": {**CFG, "BLOCK_M": 32, "SPLIT_M": 16, "MERGE_TAIL": True, "SWAP_AB": True},
                 "down": {**CFG, "BLOCK_N": 256}}]


def deq2(q, s):
    """Two-term q [R, 2K] fp8 ([hi | lo]) and s [R, K/128] -> float64 [R, K]."""
    K = q.shape[1] // 2
    v = q[:, :K].double() + q[:, K:].double()
    return (v.view(q.shape[0], -1, 128) * s.double()[..., None]).view(q.shape[0], K)


def check_two_terms(x, q, s):
    """q, s = the two-term quantisation of x [M, K] (K any): shapes, and each value's reconstruction error."""
    M, K = x.shape
    assert q.dtype == FP8 and q.shape == (M, 2 * K) and s.shape == (M, -(-K // 128))
    v = x.double() / s.double().repeat_interleave(128, 1)[:, :K]
    err = (v - (q[:, :K].double() + q[:, K:].double())).abs()
    bound = 2 ** -8 * v.abs() + 2 ** -10  # e4m3's 3 bits twice; lo's subnormal spacing 2^-9
    assert not (err > bound).any(), f"two-term error {float((err - bound).max()):.3g} over the bound"


def bits(q):
    return q.view(torch.uint8)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.sampled_from([128, 256, 384]), st.floats(1e-3, 1e3),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2 ** 16))
def test_quant_two_terms_matches_twin_and_bound(M, K, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * scale).to(dtype)
    x[0] = 0  # an all-zero row: scale 1, both terms 0
    q, s = fq.quant_fp8_groups(x, terms=2)
    qt, st_ = fq.quant_fp8_groups_torch(x, terms=2)
    assert torch.equal(bits(q), bits(qt)) and torch.equal(s, st_)
    q1, s1 = fq.quant_fp8_groups(x)
    assert torch.equal(bits(q[:, :K]), bits(q1)) and torch.equal(s, s1)
    assert (q[0].float() == 0).all() and (s[0] == 1).all()
    check_two_terms(x, q, s)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 20), st.integers(1, 400).filter(lambda K: K % 128), st.integers(0, 2 ** 16))
def test_quant_two_terms_partial_last_group(M, K, seed):
    """K not a multiple of 128: the last group is partial (its scale from the elements it has)."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * 5
    q, s = fq.quant_fp8_groups(x, terms=2)
    qt, st_ = fq.quant_fp8_groups_torch(x, terms=2)
    assert torch.equal(bits(q), bits(qt)) and torch.equal(s, st_)
    assert torch.equal(bits(q[:, :K]), bits(fq.quant_fp8_groups(x)[0]))
    check_two_terms(x, q, s)


@pytest.mark.parametrize("cfg", [CFG, {"up": {**CFG, "SWAP_AB": True, "K_STEPS": 2, "USE_TMA": True},
                                       "down": {**CFG, "BLOCK_M": 32, "BLOCK_N": 256, "SWAP_AB": True}}])
def test_gemms_two_terms(cfg):
    """Up GEMM (float32 out, then [hi | lo] fp8 out) and down GEMM with terms=2 on the dequantised two-term
    values in float64."""
    T, k, E, H, I = 20, 2, 4, 256, 256
    x, ids, tw, w = make_case(T, k, E, H, I, seed=21)
    up, down, bm = f8.fp8_configs(cfg, E, H, I, T * k, x.device, act_terms=2)
    align = ma.moe_align(ids, E, bm)
    xq, xs = fq.quant_fp8_groups_torch(x, terms=2)
    e_of = ids.reshape(-1).long()
    want_act = act64(deq2(xq, xs)[torch.arange(T * k) // k], e_of, w)
    act32 = f8k.moe_gemm_fp8(xq, xs, w[0], w[1], torch.empty(T * k, I), align, {**up, "BLOCK_N": 64},
                             gather_a=True, scatter_c=True, a_div=k, swiglu=True, terms=2)
    assert rel(act32, want_act) < 1e-5  # the lo term is in (hi alone is percents off)
    R = align.sorted_ids.numel()
    inter, inter_s = torch.empty(R, 2 * I, dtype=FP8), torch.empty(R, I // 128)
    f8k.moe_gemm_fp8(xq, xs, w[0], w[1], inter, align, up, gather_a=True, scatter_c=False, a_div=k, swiglu=True,
                     out_scale=inter_s, terms=2)
    sid = align.sorted_ids[:int(align.num_padded)].long()
    pos = torch.nonzero(sid < T * k).flatten()
    want = want_act[sid[pos]]
    check_quantised(inter[pos, :I], inter_s[pos], want)  # hi: the one-term quantisation, scales amax / 448
    v = want / inter_s[pos].double().repeat_interleave(128, 1)
    err = (v - (inter[pos, :I].double() + inter[pos, I:].double())).abs()
    assert not (err > (2 ** -8 + 1e-5) * v.abs() + 2 ** -10).any(), "lo term off"
    assert rel(deq2(inter[pos], inter_s[pos]), want) < HILO_BOUND
    out = torch.full((T * k, H), float("nan"))
    f8k.moe_gemm_fp8(inter, inter_s, w[2], w[3], out, align, down, gather_a=False, scatter_c=True,
                     row_weights=tw.reshape(-1).float(), terms=2)
    a = torch.zeros(T * k, I, dtype=torch.float64)
    a[sid[pos]] = deq2(inter[pos], inter_s[pos])
    assert rel(out, down64(a, e_of, w) * tw.reshape(-1, 1).double()) < 1e-5


FFN_CONFIGS = [CFG, {**CFG, "SWAP_AB": True}, {**CFG, "K_STEPS": 2, "USE_TMA": True},
               {**CFG, "BLOCK_M": 32, "SPLIT_M": 16, "MERGE_TAIL": True, "GROUP_M": 4}]


@pytest.mark.parametrize("ci", range(len(FFN_CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_two_terms_accuracy(ci, dtype):
    T, k, E, H, I = 24, 2, 4, 256, 256
    x, ids, tw, w = make_case(T, k, E, H, I, seed=30 + ci, dtype=dtype)
    ids[: T // 2] = torch.tensor([0, 1], dtype=torch.int32)  # a hot expert pair
    want = ffn_unquantised(x, ids, tw, w)
    out = f8.fused_moe_fp8(x, ids, tw, *w, config=FFN_CONFIGS[ci], act_terms=2)
    assert out.dtype == dtype and out.shape == (T, H)
    err, one = rel(out, want), rel(f8.fused_moe_fp8(x, ids, tw, *w, config=FFN_CONFIGS[ci]), want)
    assert err < HILO_BOUND and err < one / 5, f"two terms {err:.3g}, one term {one:.3g}"


def rows_ref(rows, counts, w):
    """The unquantised float64 reference per row (tests/test_fused_moe_fp8.py's expert_rows_ref)."""
    return expert_rows_ref(rows, counts, w, ffn_unquantised)


@pytest.mark.parametrize("ci", [0, 3])
def test_layouts_two_terms(ci):
    counts, E, H, I = [5, 0, 19, 1], 4, 256, 128
    _, _, _, w = make_case(0, 1, E, H, I, seed=40 + ci)
    g = torch.Generator().manual_seed(8)
    n, cnt, cfg = sum(counts), torch.tensor(counts), FFN_CONFIGS[ci]
    rows = torch.randn(n + 2, H, generator=g)  # 2 rows past sum(counts): unowned
    want = rows_ref(rows[:n], counts, w)
    out = f8.fused_moe_fp8_contiguous(rows, cnt, *w, config=cfg, validate=True, act_terms=2)
    assert out.shape == (n + 2, H) and rel(out[:n], want) < HILO_BOUND
    index = torch.randint(0, 9, (n,), generator=g)
    out = f8.fused_moe_fp8_gathered(rows[:9], index, cnt, *w, config=cfg, validate=True, act_terms=2)
    assert rel(out, rows_ref(rows[index], counts, w)) < HILO_BOUND
    cap = 21
    xm = torch.randn(E, cap, H, generator=g)
    for e, c in enumerate(counts):
        xm[e, :c] = rows[sum(counts[:e]):sum(counts[:e]) + c]
    ym = f8.fused_moe_fp8_masked(xm, cnt, *w, config=cfg, validate=True, act_terms=2)
    assert ym.shape == (E, cap, H)
    assert rel(torch.cat([ym[e, :c] for e, c in enumerate(counts)]), want) < HILO_BOUND


def unswapped(cfg):
    return {op: {**c, "SWAP_AB": False} for op, c in cfg.items()} if "up" in cfg else {**cfg, "SWAP_AB": False}


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("ci", range(len(SWAPPED)))
def test_swap_ab_matches_unswapped(ci, terms):
    """Under the interpreter SWAP_AB changes the float32 accumulation order only."""
    T, k, E, H, I = 20, 2, 4, 256, 256
    x, ids, tw, w = make_case(T, k, E, H, I, seed=50 + ci)
    got = f8.fused_moe_fp8(x, ids, tw, *w, config=SWAPPED[ci], act_terms=terms)
    plain = f8.fused_moe_fp8(x, ids, tw, *w, config=unswapped(SWAPPED[ci]), act_terms=terms)
    assert rel(got, plain.double()) < 1e-6
    assert rel(got, ffn_unquantised(x, ids, tw, w)) < (HILO_BOUND if terms == 2 else 5e-2)


def tiled(w):
    return f8k.tile_weights(w[0]), w[1], f8k.tile_weights(w[2]), w[3]


def test_tile_weights_round_trip():
    w = make_case(0, 1, 3, 256, 384, seed=60)[3]
    t13, t2 = f8k.tile_weights(w[0]), f8k.tile_weights(w[2])
    assert t13.shape == (3, 6, 2, 128, 128) and t2.shape == (3, 2, 3, 128, 128) and t13.is_contiguous()
    assert torch.equal(bits(t13[1, 4, 1]), bits(w[0][1, 512:640, 128:256]))  # block (4, 1) of expert 1
    assert torch.equal(bits(f8k.untile_weights(t13)), bits(w[0]))
    assert torch.equal(bits(f8k.untile_weights(t2)), bits(w[2]))
    assert f8k.is_tiled(t13) and not f8k.is_tiled(w[0]) and not f8k.is_tiled(t13.float().sum(-1))
    assert f8k.weight_dims(t13) == (3, 768, 256) == f8k.weight_dims(w[0])
    assert f8k.weight_dims(t2) == (3, 256, 384)


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("ci", range(len(TILE_CONFIGS)))
def test_tiles_bit_equal_rows(ci, terms):
    T, k, E, H, I = 20, 2, 4, 256, 256
    x, ids, tw, w = make_case(T, k, E, H, I, seed=70 + ci)
    cfg, wt = TILE_CONFIGS[ci], tiled(w)
    got = f8.fused_moe_fp8(x, ids, tw, *wt, config=cfg, act_terms=terms)
    assert torch.equal(got, f8.fused_moe_fp8(x, ids, tw, *w, config=cfg, act_terms=terms))
    assert rel(got, ffn_unquantised(x, ids, tw, w)) < (HILO_BOUND if terms == 2 else 5e-2)
    if ci not in (1, 2):
        return
    counts = [7, 0, 12, 3]
    n, cnt = sum(counts), torch.tensor(counts)
    rows = x[:n]
    a, b = (f8.fused_moe_fp8_contiguous(rows, cnt, *wx, config=cfg, act_terms=terms) for wx in (w, wt))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(ci)
    index = torch.randint(0, T, (n,), generator=g)
    a, b = (f8.fused_moe_fp8_gathered(x, index, cnt, *wx, config=cfg, act_terms=terms) for wx in (w, wt))
    assert torch.equal(a, b)
    xm = torch.randn(4, 12, H, generator=g)
    a, b = (f8.fused_moe_fp8_masked(xm, cnt, *wx, config=cfg, act_terms=terms) for wx in (w, wt))
    assert torch.equal(torch.cat([a[e, :c] for e, c in enumerate(counts)]),
                       torch.cat([b[e, :c] for e, c in enumerate(counts)]))


def test_bad_inputs():
    x, ids, tw, w = make_case(4, 2, 3, 128, 128, seed=5)
    w13, s13, w2, s2 = w
    for quant in (fq.quant_fp8_groups, fq.quant_fp8_groups_torch):
        with pytest.raises(ValueError, match="terms must be 1 or 2"):
            quant(x, terms=3)
    with pytest.raises(ValueError, match="act_terms must be 1 or 2"):
        f8.fused_moe_fp8(x, ids, tw, *w, config=CFG, act_terms=3)
    xq, xs = fq.quant_fp8_groups_torch(x)
    with pytest.raises(ValueError, match="act_terms=2 quantises rows itself"):
        f8.fused_moe_fp8_contiguous(xq, torch.tensor([2, 1, 1]), *w, config=CFG, rows_scale=xs, act_terms=2)
    align = ma.moe_align(ids, 3, 16)
    R = align.sorted_ids.numel()
    with pytest.raises(ValueError, match="USE_TMA with block-layout weights needs BLOCK_N <= 128, got 256"):
        f8k.moe_gemm_fp8(torch.zeros(R, 128, dtype=FP8), torch.ones(R, 1), f8k.tile_weights(w2), s2,
                         torch.empty(8, 128), align, {**CFG, "BLOCK_N": 256, "USE_TMA": True}, gather_a=False,
                         scatter_c=True)
    with pytest.raises(ValueError, match=r"a must be .*\[rows, 256\]"):  # terms=2 needs [hi | lo] rows
        f8k.moe_gemm_fp8(xq, xs, w13, s13, torch.empty(8, 128), align, CFG, gather_a=True, scatter_c=True,
                         a_div=2, swiglu=True, terms=2)
    for bad in (torch.zeros(2, 192, 128, dtype=FP8), torch.zeros(2, 128, 64, dtype=FP8),
                torch.zeros(128, 128, dtype=FP8)):
        with pytest.raises(ValueError, match="multiples of 128"):
            f8k.tile_weights(bad)
    with pytest.raises(ValueError, match="t must be"):
        f8k.untile_weights(w13)
    with pytest.raises(ValueError, match="w13_q and w2_q must both be"):
        f8.fused_moe_fp8(x, ids, tw, f8k.tile_weights(w13), s13, w2, s2, config=CFG)
    with pytest.raises(ValueError, match="w13_q and w2_q must both be"):
        f8.fused_moe_fp8_contiguous(x, torch.tensor([2, 1, 1]), w13, s13, f8k.tile_weights(w2), s2, config=CFG)
    from nanomoe_kernels.fused_moe_w8a16 import fused_moe_w8a16

    with pytest.raises(ValueError, match="block layout of tile_weights runs on fused_moe_fp8's entry points only"):
        fused_moe_w8a16(x.half(), ids, tw, *tiled(w), config=CFG)


def test_table_suffixes():
    assert f8.table_suffixes() == [""]
    assert f8.table_suffixes(tiles=True) == ["_tiles", ""]
    assert f8.table_suffixes(act_terms=2) == ["_hilo", ""]
    assert f8.table_suffixes(act_terms=2, tiles=True) == ["_hilo_tiles", "_hilo", "_tiles", ""]
    assert f8.table_suffixes(w8a16=True) == ["_w8a16"]


@pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")  # the backend's default configs
def test_backend_triton_fp8_hilo():
    from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch, expert_ffn, preset
    from nanomoe_fn.moe.fp8_params import quantize_experts, tile_experts
    from nanomoe_fn.moe.params import SwiGLUExperts

    be = EXPERT_BACKENDS["triton_fp8_hilo"]
    cfg = preset("tiny").with_(hidden=128, intermediate=128, num_experts=4)
    assert be.fp8 and be.supports(cfg, torch.device("cpu")) == (True, "")
    g = torch.Generator().manual_seed(9)
    ex = quantize_experts(SwiGLUExperts(torch.randn(4, 256, 128, generator=g) * 128 ** -0.5,
                                        torch.randn(4, 128, 128, generator=g) * 128 ** -0.5))
    w = (ex.w13, ex.w13_scale, ex.w2, ex.w2_scale)
    counts = [3, 0, 9, 2]
    rows = torch.randn(sum(counts), 128, generator=g)
    batch = ExpertBatch(rows, torch.tensor(counts))
    y = expert_ffn(ex, batch, "triton_fp8_hilo").x
    assert rel(y, rows_ref(rows, counts, w)) < HILO_BOUND
    assert torch.equal(expert_ffn(tile_experts(ex), batch, "triton_fp8_hilo").x, y)
    q, s = fq.quant_fp8_groups_torch(rows)
    fp8_batch = ExpertBatch(q, torch.tensor(counts), x_scale=s)
    with pytest.raises(TypeError, match="'triton_fp8_hilo' quantises bf16/fp16/fp32 rows itself"):
        expert_ffn(ex, fp8_batch, "triton_fp8_hilo")
    assert expert_ffn(ex, fp8_batch, "triton_fp8").x.dtype == torch.bfloat16  # the one-term backend takes it
