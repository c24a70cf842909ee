"""The key-major MLA decode stage 1 (kernels/mla_decode_keymajor.py) against the float64 oracle and the
head-major kernel, under TRITON_INTERPRET=1 on CPU (float32/float16).

Dimension legend: B sequences, S queries per sequence, R = B * S rows, N heads, C latent, Dr rope,
Dc = C + Dr, L cache capacity, G page size, K splits.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib  # noqa: E402

import nanomoe_kernels.mla_decode as _decode  # noqa: E402
import nanomoe_kernels.mla_decode_keymajor as _km  # noqa: E402
import nanomoe_kernels.mla_tile_rows as _rows  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not _decode.runs_interpreted():
    for _mod in (_rows, _km, _decode):   # decorated before the variable was set: decorate again, callees first
        importlib.reload(_mod)

import nanomoe_reference.mla as ref  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU kernel tests run under TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def run_case(dtype, B, S, N, C, DR, L, ctx, splits, tuning, page, seed):
    """Decode B * S rows (row lengths ctx) over a contiguous (page 0) or paged cache; returns
    (output, float64 oracle, the head-major kernel's output for the same call)."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, L, C + DR, generator=g).to(dtype)
    q = torch.randn(B * S, N, C + DR, generator=g).to(dtype)
    lens = torch.tensor(ctx, dtype=torch.int32)
    scale = (C + DR) ** -0.5
    cache, table = kv, None
    if page:
        m = L // page
        perm = torch.randperm(B * m + 2, generator=g)                   # 2 spare pages, never read
        cache = torch.randn(B * m + 2, page, C + DR, generator=g).to(dtype)
        table = perm[: B * m].reshape(B, m).to(torch.int32)
        cache[table.reshape(-1).long()] = kv.reshape(B * m, page, C + DR)
    out = mla_decode(q, cache, lens, C, scale, block_table=table, num_splits=splits, tuning=tuning)
    head_major = DecodeTuning(tuning.block_h, tuning.block_n, 1, tuning.num_warps, tuning.num_stages,
                              tma=tuning.tma)
    other = mla_decode(q, cache, lens, C, scale, block_table=table, num_splits=splits, tuning=head_major)
    want = ref.latent_decode(q, kv.repeat_interleave(S, 0), ctx, C, scale)
    return out, want, other


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "output holds NaN/Inf"
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("page", [0, 32, 8])
def test_key_major_matches_reference(dtype, tma, page):
    """Full tiles, a ragged tail, a zero-length row, N = 19 heads over 16-head blocks, C = 40 (two
    halves of 32 value rows, the second partly masked); TMA needs the tile to divide the page."""
    tuning = DecodeTuning(16, 16, 1, 4, 2, tma=tma and page != 8, key_major=True)
    out, want, other = run_case(dtype, B=3, S=1, N=19, C=40, DR=8, L=64, ctx=[64, 37, 0], splits=2,
                                tuning=tuning, page=page, seed=page)
    assert out.shape == (3, 19, 40) and out.dtype == dtype
    assert rel(out, want) < TOL[dtype]
    assert rel(out, other) < TOL[dtype]
    assert (out[2] == 0).all()                                       # length 0 gives 0


def test_key_major_multi_query_and_single_split():
    """S = 2 queries per sequence with their own lengths; K = 1 writes the output directly."""
    for splits in (1, 3):
        out, want, _ = run_case(torch.float32, B=2, S=2, N=5, C=24, DR=8, L=48, ctx=[47, 48, 0, 9], splits=splits,
                                tuning=DecodeTuning(16, 16, 1, 4, 1, key_major=True), page=16, seed=splits)
        assert rel(out, want) < TOL[torch.float32]


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 20), c=st.sampled_from([16, 24, 32, 40]), dr=st.sampled_from([8, 16]),
       ctx=st.lists(st.integers(0, 64), min_size=1, max_size=3), splits=st.sampled_from([None, 1, 2, 5, 9]),
       page=st.sampled_from([0, 4, 16, 32]), block_h=st.sampled_from([16, 32]), tma=st.booleans(),
       seed=st.integers(0, 999))
def test_key_major_property(n, c, dr, ctx, splits, page, block_h, tma, seed):
    tuning = DecodeTuning(block_h, 16, 1, 4, 2, tma=tma and page != 4, key_major=True)
    out, want, other = run_case(torch.float32, B=len(ctx), S=1, N=n, C=c, DR=dr, L=64, ctx=ctx, splits=splits,
                                tuning=tuning, page=page, seed=seed)
    if float(want.norm()) > 0:
        assert rel(out, want) < TOL[torch.float32]
        assert rel(out, other) < TOL[torch.float32]
    else:
        assert (out == 0).all()


@pytest.mark.parametrize("key_major", [True, False])
def test_input_dtype_partials(key_major):
    """Split partials stored in q's dtype (float16 here): within float16's tolerance of the float64 oracle, and
    not the float32-partials output bit for bit (the partials really were rounded)."""
    base = DecodeTuning(16, 16, 1, 4, 2, key_major=key_major)
    low = dataclasses.replace(base, input_dtype_partials=True)
    out, want, _ = run_case(torch.float16, B=2, S=1, N=5, C=40, DR=8, L=64, ctx=[64, 37], splits=3, tuning=low,
                            page=16, seed=11)
    full, _, _ = run_case(torch.float16, B=2, S=1, N=5, C=40, DR=8, L=64, ctx=[64, 37], splits=3, tuning=base,
                          page=16, seed=11)
    assert rel(out, want) < TOL[torch.float16]
    assert not torch.equal(out, full)


def test_key_major_refuses_value_splits():
    q, kv, lens = torch.zeros(1, 4, 48), torch.zeros(1, 16, 48), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="value_splits"):
        mla_decode(q, kv, lens, 32, 1.0, tuning=DecodeTuning(16, 16, 2, key_major=True))


def test_block_v():
    assert [_km.block_v(c) for c in (512, 448, 40, 16, 8)] == [256, 256, 32, 16, 16]


def test_single_row_16_head_default_is_key_major():
    """One query row with <= 16 heads runs key-major 64-row tiles by default (split counts as measured:
    K = 32 at 4k and 128 at 16k on 132 SMs); a paged and a contiguous cache, ragged and empty rows."""
    t = _decode.default_tuning(16, 1)
    assert t.key_major and t.block_n == 64 and not _decode.default_tuning(16, 2).key_major
    for max_len, want in ((4096, 32), (16384, 128)):
        part = 16 * 512 * 8 / (132 * 64 * 1152)
        assert _decode.pick_splits(1, 1, max_len, 132, 64, part) == want
    for page, ctx in ((0, [200]), (64, [256]), (32, [0]), (0, [63])):
        out, want, _ = run_case(torch.float32, B=1, S=1, N=16, C=32, DR=16, L=256, ctx=ctx, splits=None,
                                tuning=t, page=page, seed=page)
        if ctx[0]:
            assert rel(out, want) < TOL[torch.float32]
        else:
            assert (out == 0).all()
