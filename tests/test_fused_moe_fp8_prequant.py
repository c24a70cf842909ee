"""FP8 expert kernels on rows that arrive already quantised (an FP8 dispatch's packed receive rows).

Dimension legend: E experts, H hidden, I intermediate, n batch rows, cap rows per expert (masked), HG = H/128.
The kernels take float8_e4m3fn rows plus their float32 scales [.., HG], as strided views of one packed
buffer (H fp8 bytes, then HG float32 scales per row, as the nvlink comm receives them), and must give
exactly what they give when they quantise the same rows themselves (the same fp8 values and scales enter
the same GEMMs). Runs under TRITON_INTERPRET=1 (CPU); GPU runs live in tests/gpu/.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fused_moe_fp8 import CFG, f8, fmk, make_case  # noqa: E402 (also reloads the kernels)

pytestmark = pytest.mark.skipif(not fmk.runs_interpreted(),
                                reason="CPU kernel tests run under TRITON_INTERPRET=1 (GPU: tests/gpu/)")
FP8 = torch.float8_e4m3fn


def packed(rows: torch.Tensor, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [.., H] float32 -> strided (fp8 view [.., H], scale view [.., HG]) of one packed uint8 buffer
    (+ pad spare bytes per row, a multiple of 4), values from the kernels' own quantiser."""
    H = rows.shape[-1]
    q, s = f8.quant_rows(rows.reshape(-1, H))
    width = H + 4 * (H // 128) + pad
    buf = torch.zeros((q.shape[0], width), dtype=torch.uint8)
    buf[:, :H] = q.view(torch.uint8)
    buf[:, H:H + 4 * (H // 128)] = s.contiguous().view(torch.uint8)
    lead = rows.shape[:-1]
    return buf[:, :H].view(FP8).view(*lead, H), buf[:, H:H + 4 * (H // 128)].view(torch.float32).view(*lead, H // 128)


@settings(max_examples=6, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=4), pad=st.sampled_from([0, 4, 60]),
       seed=st.integers(0, 2**16))
def test_prequantised_rows_equal_rows_quantised_inside(counts, pad, seed):
    E, H, I = len(counts), 256, 128
    _, _, _, w = make_case(0, 1, E, H, I, seed=seed)
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    cnt = torch.tensor(counts)
    rows = torch.randn(n, H, generator=g)
    q, s = packed(rows, pad)
    assert q.stride(0) == H + 4 * (H // 128) + pad  # really strided views
    want = f8.fused_moe_fp8_contiguous(rows, cnt, *w, config=CFG)
    got = f8.fused_moe_fp8_contiguous(q, cnt, *w, config=CFG, rows_scale=s, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    index = torch.randint(0, max(n, 1), (n,), generator=g)
    want = f8.fused_moe_fp8_gathered(rows, index, cnt, *w, config=CFG)
    got = f8.fused_moe_fp8_gathered(q, index, cnt, *w, config=CFG, rows_scale=s, out_dtype=torch.float32)
    assert torch.equal(got, want)
    cap = max(counts) + 1
    xm = torch.randn(E, cap, H, generator=g)
    qm, sm = packed(xm, pad)
    want = f8.fused_moe_fp8_masked(xm, cnt, *w, config=CFG)
    got = f8.fused_moe_fp8_masked(qm, cnt, *w, config=CFG, rows_scale=sm, out_dtype=torch.float32)
    for e, c in enumerate(counts):
        assert torch.equal(got[e, :c], want[e, :c])


def test_prequantised_rows_default_to_bfloat16_and_bad_pairs_are_named():
    E, H, I = 2, 128, 128
    _, _, _, w = make_case(0, 1, E, H, I, seed=1)
    rows = torch.randn(3, H)
    q, s = f8.quant_rows(rows)
    cnt = torch.tensor([1, 2])
    assert f8.fused_moe_fp8_contiguous(q[:0], torch.zeros(2, dtype=torch.int64), *w, config=CFG,
                                       rows_scale=s[:0]).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"float8_e4m3fn rows need rows_scale float32 \[3, 1\]"):
        f8.fused_moe_fp8_contiguous(q, cnt, *w, config=CFG)
    with pytest.raises(ValueError, match=r"rows_scale float32 \[3, 1\]"):
        f8.fused_moe_fp8_contiguous(q, cnt, *w, config=CFG, rows_scale=s[:2])
    with pytest.raises(ValueError, match="rows_scale is for float8_e4m3fn rows only"):
        f8.fused_moe_fp8_contiguous(rows, cnt, *w, config=CFG, rows_scale=s)
    with pytest.raises(ValueError, match="x must have 3 dims and unit stride in the last"):
        f8.fused_moe_fp8_masked(q.t().contiguous().t()[None].expand(2, 3, 128), cnt, *w, config=CFG,
                                rows_scale=s[None].expand(2, 3, 1))
    with pytest.raises(ValueError, match="out_dtype must be"):
        f8.fused_moe_fp8_contiguous(rows, cnt, *w, config=CFG, out_dtype=torch.int32)


def test_fp8_tables_keep_the_fp8_keys(tmp_path, monkeypatch):
    """kernels.fused_moe.load_tables checks FP8 tables with the FP8 kernel's rules (K_STEPS kept, BLOCK_N 128
    for the up GEMM) and fp8_configs picks them by rows."""
    import json

    import nanomoe_kernels.fused_moe as fm

    up = {**CFG, "K_STEPS": 2, "USE_TMA": True}
    for op, cfg in (("up", up), ("down", {**CFG, "BLOCK_N": 256, "K_STEPS": 2})):
        n, k = (128, 256) if op == "up" else (256, 128)
        name = fm.config_name(op, 4, n, k, FP8, "cpu")
        (tmp_path / name).write_text(json.dumps({"_meta": {}, "64": cfg}))
    monkeypatch.setattr(fm, "TABLES", fm.load_tables(tmp_path))
    monkeypatch.setattr(f8, "TABLES", fm.TABLES)
    got_up, got_down, _ = f8.fp8_configs(None, 4, 256, 128, 64, torch.device("cpu"))
    assert got_up["K_STEPS"] == 2 and got_up["USE_TMA"] and got_down["K_STEPS"] == 2 and got_down["BLOCK_N"] == 256
    (tmp_path / fm.config_name("up", 4, 128, 256, FP8, "cpu")).write_text(json.dumps({"64": {**CFG, "BLOCK_N": 64}}))
    with pytest.raises(ValueError, match="BLOCK_N.. must be 128"):
        fm.load_tables(tmp_path)
    for name, table in fm.load_tables(fm.TUNED_DIR).items():  # the shipped FP8 tables load and keep K_STEPS
        if "float8" in name:
            assert all("K_STEPS" in c for c in table.values()), name
