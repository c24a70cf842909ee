"""Triton MLA kernels (decode over the compressed cache, expanded prefill) against the float64 oracle.

Dimension legend: B sequences, S queries per sequence, R = B * S rows, N heads, C latent, Dr rope,
Dc = C + Dr, L context, G page size. Runs under TRITON_INTERPRET=1 on CPU (float32/float16; the
interpreter gets bfloat16 wrong); bfloat16 on the GPU lives in tests/gpu/test_mla_gpu.py.
"""

import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.mla_decode as _decode  # noqa: E402
import nanomoe_kernels.mla_decode_keymajor as _km  # noqa: E402
import nanomoe_kernels.mla_prefill as _prefill  # noqa: E402
import nanomoe_kernels.mla_tile_rows as _rows  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not _decode.runs_interpreted():
    # another module imported kernels/ before the variable was set: decorate the kernels again, callees first
    for _mod in (_rows, _km, _decode, _prefill):
        importlib.reload(_mod)

import nanomoe_reference.mla as ref  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode, pick_splits, reduce_blocks  # noqa: E402
from nanomoe_kernels.mla_prefill import mla_prefill  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU kernel tests run under TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def assert_close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    err = float((out.double() - want).norm() / want.norm().clamp_min(1e-30))
    assert err < TOL[dtype], f"relative error {err:.3g} over {TOL[dtype]} for {dtype}"


def paginate(kv: torch.Tensor, page: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous kv [B, L, Dc] -> (pages [P, G, Dc] in a shuffled order, block_table [B, L/G] int32)."""
    B, L, dc = kv.shape
    m = L // page
    perm = torch.randperm(B * m + 3, generator=g)                  # 3 spare pages nobody uses
    pages = torch.randn(B * m + 3, page, dc, generator=g).to(kv.dtype)
    table = perm[: B * m].reshape(B, m)
    pages[table.reshape(-1)] = kv.reshape(B * m, page, dc)
    return pages, table.to(torch.int32)


def decode_case(dtype, B, S, N, C, DR, L, ctx, splits, tuning, paged, seed=0, page=8):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, L, C + DR, generator=g).to(dtype)
    q = torch.randn(B * S, N, C + DR, generator=g).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    scale = (C + DR) ** -0.5
    if paged:
        pages, table = paginate(kv, page, g)
        out = mla_decode(q, pages, lens, C, scale, block_table=table, num_splits=splits, tuning=tuning)
    else:
        out = mla_decode(q, kv, lens, C, scale, num_splits=splits, tuning=tuning)
    want = ref.latent_decode(q, kv.repeat_interleave(S, 0), ctx, C, scale)
    assert out.shape == (B * S, N, C) and out.dtype == dtype
    assert_close(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference(dtype, paged, splits):
    decode_case(dtype, B=3, S=1, N=5, C=32, DR=16, L=40, ctx=[40, 1, 23], splits=splits,
                tuning=DecodeTuning(block_h=16, block_n=16, num_warps=4), paged=paged)


@pytest.mark.parametrize("tuning", [DecodeTuning(16, 16, 2, 4, 2), DecodeTuning(32, 32, 1, 4, 2)])
def test_decode_tunings_and_multi_query(tuning):
    """Value slices, wider head blocks, S = 2 queries per sequence with their own lengths, ctx 0."""
    decode_case(torch.float32, B=2, S=2, N=19, C=24, DR=8, L=48, ctx=[47, 48, 0, 9], splits=2,
                tuning=tuning, paged=True, seed=1)


@pytest.mark.parametrize("key_major", [False, True])
def test_decode_pdl_tuning_off_the_gpu(key_major):
    """tuning.pdl asks for a launch the interpreter cannot make: off Hopper GPUs it is ignored (same results);
    the GPU side, where it runs, is tests/gpu/test_mla_gpu.py::test_decode_bf16_pdl."""
    from nanomoe_kernels.mla_decode_tuning import pdl_supported

    assert not pdl_supported(torch.device("cpu"), interpreted=True)
    decode_case(torch.float32, B=2, S=1, N=16, C=32, DR=16, L=48, ctx=[48, 13], splits=3,
                tuning=DecodeTuning(16, 16, 1, 4, 2, key_major=key_major, pdl=True), paged=True, seed=3)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("value_splits", [1, 2])
def test_decode_tma_tiles(paged, value_splits):
    """TMA descriptor loads for full tiles (ragged tails still masked), paged with BN dividing G."""
    decode_case(torch.float32, B=3, S=1, N=17, C=24, DR=8, L=64, ctx=[64, 37, 5], splits=2,
                tuning=DecodeTuning(16, 16, value_splits, 4, 2, tma=True), paged=paged, seed=2, page=32)


@pytest.mark.parametrize("capacity", [64, 48])
@pytest.mark.parametrize("batch", [2, 17])
def test_decode_default_many_heads(capacity, batch):
    """The many-head defaults (value halves, TMA: 64-head programs over 64-row tiles for <= 16 rows,
    128-head programs over 32-row tiles above) and their plain-load fallback when the tile does not
    divide the capacity."""
    tuning = _decode.default_tuning(32, batch)
    assert tuning.tma and tuning.block_n == (64 if batch <= 16 else 32)
    assert (_decode.tma_unsupported(torch.zeros(2, capacity, 48), 32, tuning) == "") == (capacity == 64)
    ctx = ([capacity, 33] * 9)[:batch]
    decode_case(torch.float32, B=batch, S=1, N=32, C=32, DR=16, L=capacity, ctx=ctx, splits=None,
                tuning=None, paged=False, seed=4)


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 20), c=st.sampled_from([16, 20, 32]), dr=st.sampled_from([8, 16]),
       ctx=st.lists(st.integers(0, 32), min_size=1, max_size=3), splits=st.sampled_from([None, 1, 2, 5]),
       paged=st.booleans(), seed=st.integers(0, 999))
def test_decode_property(n, c, dr, ctx, splits, paged, seed):
    decode_case(torch.float32, B=len(ctx), S=1, N=n, C=c, DR=dr, L=32, ctx=ctx, splits=splits,
                tuning=DecodeTuning(16, 16, 1, 4, 1), paged=paged, seed=seed)


def test_pick_splits():
    """The wave model against the H200 sweeps (bench/results/mla_notes.md; the few-row choices are the
    measured best of K in 4..256, bench_mla.py --small-batch): partial_tiles as default_splits prices
    float32 partials of C = 512 against 576-wide bf16 cache rows."""
    def part(rows, heads, block_n, slots):
        return rows * heads * 512 * 8 / (slots * block_n * 1152)

    assert pick_splits(rows=1, head_programs=1, max_len=64, slots=132, block_n=64) == 1
    assert pick_splits(rows=32, head_programs=1, max_len=16384, slots=264, block_n=32) == 8
    assert pick_splits(rows=128, head_programs=1, max_len=16384, slots=264, block_n=32) == 2
    assert pick_splits(rows=32, head_programs=2, max_len=16384, slots=132, block_n=32) == 2
    assert pick_splits(rows=128, head_programs=2, max_len=4096, slots=132, block_n=32) == 1
    for rows, max_len, want in [(1, 16384, 256), (1, 4096, 64), (4, 16384, 64), (4, 4096, 64)]:  # 16 heads
        assert pick_splits(rows, 1, max_len, 264, 32, part(rows, 16, 32, 264)) == want
    for rows, max_len, want in [(1, 16384, 32), (1, 4096, 32), (4, 16384, 8), (4, 4096, 8)]:     # 128 heads
        assert pick_splits(rows, 4, max_len, 132, 64, part(rows, 128, 64, 132)) == want
    for rows, max_len, want in [(32, 16384, 16), (64, 32768, 8), (128, 16384, 4), (4, 16384, 128)]:  # paged 16
        assert pick_splits(rows, 1, max_len, 528, 32, part(rows, 16, 32, 528)) == want
    assert pick_splits(1, 1, 256, 264, 32) == 4                    # >= 2 tiles of the capacity a split
    assert pick_splits(1, 1, 16384, 132, 32, partial_tiles=1e3) == 1   # partials dearer than the cache


def test_default_splits_paged_residency():
    """The 16-head default assumes 4 programs per SM for a paged cache and 2 for a contiguous one (on the CPU,
    device_sms is 4): default_splits is pick_splits with those slots."""
    t = _decode.default_tuning(16, 4)
    assert (t.ctas_per_sm, t.paged_ctas_per_sm) == (2, 4)
    cpu = torch.device("cpu")
    got = {}
    for paged, slots in ((False, 8), (True, 16)):
        part = 4 * 16 * 512 * 8 / (slots * 32 * 1152)
        got[paged] = _decode.default_splits(4, 16, 1024, t, cpu, paged=paged)
        assert got[paged] == pick_splits(4, 1, 1024, slots, 32, part)
    assert got[True] > got[False]


def test_reduce_blocks():
    """Few rows spread the reduction over heads and value columns; many rows keep wide blocks."""
    assert reduce_blocks(rows=1, heads=16, latent=512, splits=256, sms=132) == (1, 32, 128)
    assert reduce_blocks(rows=1, heads=128, latent=512, splits=32, sms=132) == (1, 64, 32)
    assert reduce_blocks(rows=128, heads=16, latent=512, splits=2, sms=132) == (8, 128, 2)
    assert reduce_blocks(3, 7, 40, 70, 4, DecodeTuning(reduce_h=4, reduce_c=16)) == (4, 16, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,ctx,splits", [(1, [256], 64), (1, [200], 96), (3, [256, 0, 77], 70)])
@pytest.mark.parametrize("page", [0, 32, 8])
def test_decode_many_splits(dtype, B, ctx, splits, page):
    """Few rows over many splits (16 tiles of 16 rows: K > tiles leaves splits empty), a zero-length
    row, N = 7 heads over 4-head reduce blocks and C = 40 over 16-column ones; contiguous, paged with
    one page id per tile (G = 32) and with one per row (G = 8 < BN)."""
    decode_case(dtype, B=B, S=1, N=7, C=40, DR=8, L=256, ctx=ctx, splits=splits, paged=page > 0,
                tuning=DecodeTuning(16, 16, 1, 4, 1, reduce_h=4, reduce_c=16), page=page or 8, seed=B)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 9), c=st.sampled_from([16, 24, 40]), ctx=st.lists(st.integers(0, 128), min_size=1,
       max_size=3), splits=st.sampled_from([None, 9, 33, 64, 100]), page=st.sampled_from([0, 4, 16, 32]),
       red=st.sampled_from([(0, 0), (1, 16), (2, 32), (4, 16)]), half=st.booleans(), seed=st.integers(0, 999))
def test_decode_split_reduce_property(n, c, ctx, splits, page, red, half, seed):
    decode_case(torch.float16 if half else torch.float32, B=len(ctx), S=1, N=n, C=c, DR=8, L=128, ctx=ctx,
                splits=splits, tuning=DecodeTuning(16, 16, 1, 4, 1, reduce_h=red[0], reduce_c=red[1]),
                paged=page > 0, seed=seed, page=page or 8)


def prefill_case(dtype, B, S, N, DN, DR, DV, L, q_pos, seed=0, block_m=16, block_n=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, N, DN + DR, generator=g).to(dtype)
    k_nope = torch.randn(B, L, N, DN, generator=g).to(dtype)
    k_pe = torch.randn(B, L, DR, generator=g).to(dtype)
    v = torch.randn(B, L, N, DV, generator=g).to(dtype)
    pos = torch.tensor(q_pos, dtype=torch.int32)
    scale = 0.7 * (DN + DR) ** -0.5
    out = mla_prefill(q[..., :DN], q[..., DN:], k_nope, k_pe, v, pos, scale, block_m=block_m, block_n=block_n,
                      num_warps=4, num_stages=1)
    for b in range(B):
        k = torch.cat([k_nope[b], k_pe[b][:, None].expand(L, N, DR)], -1)
        want = ref.attention(q[b], k, v[b], q_pos[b], scale)
        assert_close(out[b], want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(dtype):
    """Fresh prompt, a chunk after a cached prefix, and a short padded sequence in one launch."""
    S, L = 37, 50
    fresh = list(range(S))
    chunk = list(range(L - S, L))
    short = list(range(5)) + [-1] * (S - 5)
    prefill_case(dtype, B=3, S=S, N=3, DN=16, DR=16, DV=16, L=L, q_pos=[fresh, chunk, short])


def test_prefill_odd_dims_and_tiles():
    prefill_case(torch.float32, B=1, S=20, N=2, DN=12, DR=8, DV=20, L=20, q_pos=[list(range(20))], seed=3,
                 block_m=32, block_n=16)


def test_wrapper_errors():
    q = torch.zeros(2, 4, 48)
    kv = torch.zeros(2, 16, 48)
    lens = torch.ones(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        mla_decode(q.half(), kv, lens, 32, 1.0)
    with pytest.raises(ValueError, match="ctx_lens"):
        mla_decode(q, kv, lens.long(), 32, 1.0)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode(q, kv, lens, 48, 1.0)
    with pytest.raises(ValueError, match="unit stride"):
        mla_decode(torch.zeros(2, 48, 4).transpose(1, 2), kv, lens, 32, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        mla_decode(torch.zeros(3, 4, 48), kv, torch.ones(3, dtype=torch.int32), 32, 1.0)
    with pytest.raises(ValueError, match="block_table"):
        mla_decode(q, kv, lens, 32, 1.0, block_table=torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(q, kv, lens, 32, 1.0, num_splits=0)
    qn, qp, kn, kp, v = (torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 6, 2, 8),
                         torch.zeros(1, 6, 8), torch.zeros(1, 6, 2, 8))
    pos = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_pe"):
        mla_prefill(qn, qp, kn, kp[:, :5], v, pos, 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        mla_prefill(qn, qp, kn, kp, v, pos.long(), 1.0)
    with pytest.raises(TypeError, match="v must be"):
        mla_prefill(qn, qp, kn, kp, v.double(), pos, 1.0)
    with pytest.raises(TypeError, match=r"q_nope must be float16/bfloat16/float32, got torch.float64"):
        mla_prefill(qn.double(), qp, kn, kp, v, pos, 1.0)
    with pytest.raises(TypeError, match=r"q_pe must have q_nope's dtype \(torch.float32\), got torch.float16"):
        mla_prefill(qn, qp.half(), kn, kp, v, pos, 1.0)


@pytest.mark.parametrize("batch", [0, 2])
def test_decode_zero_rows(batch):
    """No query rows (S = 0, or no sequences at all): an empty [0, N, C] output, no launch."""
    out = mla_decode(torch.zeros(0, 4, 48), torch.zeros(batch, 16, 48), torch.zeros(0, dtype=torch.int32), 32, 1.0)
    assert out.shape == (0, 4, 32) and out.dtype == torch.float32


def test_wgmma_tuning_off_the_gpu():
    """The Gluon wgmma stage 1 runs on compute-capability 9.0 GPUs only: here the default keeps the Triton kernels
    (every head count, the same result as asking for them), and asking for it names what it needs; the GPU side is
    tests/gpu/test_mla_wgmma_gpu.py."""
    from nanomoe_kernels import mla_decode_wgmma
    from nanomoe_kernels.mla_decode_tuning import FEW_ROWS, FEW_ROWS_WGMMA, ONE_ROW_WGMMA, WGMMA, default_tuning

    # up to FEW_ROWS rows: bf16 partials by TMA store, first tile alone (warp-specialised stage 1 only), one row also
    # PDL; else the plain tuning
    few, one_row = (FEW_ROWS_WGMMA, ONE_ROW_WGMMA) if WGMMA.warp_specialize else (WGMMA, WGMMA)
    assert few.store_tma == few.input_dtype_partials == few.first_tile_alone == WGMMA.warp_specialize
    assert one_row.pdl == WGMMA.warp_specialize and one_row == replace(few, pdl=one_row.pdl)
    assert default_tuning(128, 1, wgmma=True) == one_row == default_tuning(64, 1, wgmma=True)
    assert default_tuning(256, FEW_ROWS, wgmma=True) == few and default_tuning(64, 2, wgmma=True) == few
    assert default_tuning(128, FEW_ROWS + 1, wgmma=True) == WGMMA and default_tuning(64, 32, wgmma=True) == WGMMA
    assert not default_tuning(16, 1, wgmma=True).wgmma and not default_tuning(128, 1).wgmma
    q, kv = torch.zeros(1, 64, 48), torch.zeros(1, 64, 48)
    assert "9.0" in mla_decode_wgmma.unsupported(q, kv, 32, interpreted=True)
    lens = torch.full((1,), 64, dtype=torch.int32)
    with pytest.raises(ValueError, match="9.0"):
        mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(wgmma=True))
    with pytest.raises(ValueError, match="block_h = block_n = 64"):
        mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(block_h=16, wgmma=True))
    for name in ("store_tma", "first_tile_alone", "q_first"):
        with pytest.raises(ValueError, match=f"{name} needs tuning.warp_specialize"):
            mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(**{name: True}))
    with pytest.raises(ValueError, match="reduce_warps must be 1, 2, 4 or 8, got 3"):
        mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(reduce_warps=3))
    with pytest.raises(ValueError, match="warp_specialize needs tuning.wgmma"):
        mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(warp_specialize=True))
    decode_case(torch.float32, B=1, S=1, N=64, C=32, DR=16, L=64, ctx=[50], splits=2, tuning=None, paged=False,
                seed=4)
