"""The split reduction inside stage 1's grid (DecodeTuning.merge_in_grid, kernels/mla_split_merge.py) on an sm_90 GPU.

Dimension legend: R query rows, N heads, C latent (512), K splits, G page size. Marked `gpu`; skipped without an
sm_90 GPU. Cache rows past each sequence's context hold NaN (tests/gpu/test_mla_wgmma_gpu.py's cases), so a read of a
row the kernel must not use shows up in the output; a unit merged twice, never or from unfinished partials shows up
against float64 and against the separate reduction.
"""

from dataclasses import replace

import pytest
import torch

from tests.gpu.test_mla_wgmma_gpu import SCALE, C, _case, _check, _paged, _replayed_after_change

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")]


def _tunings(bf16: bool = True):
    from nanomoe_kernels.mla_decode_tuning import FEW_ROWS_WGMMA

    base = replace(FEW_ROWS_WGMMA, input_dtype_partials=bf16)
    return base, replace(base, merge_in_grid=True)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two merges of the same partials, summed in another order: within a few float32 roundings, then one bf16."""
    assert float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)) < 4e-3


@pytest.mark.parametrize("heads, batch, paged, bf16", [(128, 1, True, True), (128, 2, True, True),
                                                        (64, 1, False, True), (128, 1, True, False),
                                                        (64, 4, True, True)])
def test_merge_in_grid(heads, batch, paged, bf16):
    """Merged in the grid: right against float64, next to the separate reduction, the same bits call after call
    (the counters reset themselves; which program merges a unit does not change its sums), left zeroed, and
    replayed from a CUDA graph after q and the lengths change."""
    from nanomoe_kernels.mla_decode import mla_decode
    from nanomoe_kernels.mla_split_merge import counters

    base, merge = _tunings(bf16)
    q, kv, ctx, want = _case(heads, torch.bfloat16, 11 + batch, [16384, 9000, 77, 0][:batch], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 5 + batch) if paged else (kv, None)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=merge)
    _check(out, want, ctx)
    _close(out, mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=base))
    for _ in range(3):
        assert torch.equal(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=merge), out)
    torch.cuda.synchronize()
    assert int(counters(q.device)[0]) == 0
    _replayed_after_change(q, kv, cache, table, ctx, 13 + batch, merge)


def test_merge_when_no_program_waits(monkeypatch):
    """With no wait at all (MERGE_SPIN 0) every program but the last to come gives up at once (unless all have come)
    and the last merges every unit alone: the same bits as with the waits."""
    from nanomoe_kernels import mla_split_merge
    from nanomoe_kernels.mla_decode import mla_decode

    _, merge = _tunings()
    q, kv, ctx, want = _case(128, torch.bfloat16, 21, [16384, 3000], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 23)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=merge)
    monkeypatch.setattr(mla_split_merge, "MERGE_SPIN", 0)
    assert torch.equal(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=merge), out)
    _check(out, want, ctx)


def test_merge_over_two_waves(monkeypatch):
    """More programs than SMs (forced past mla_decode's one-wave rule): the first wave's programs wait, give up and
    leave, the second wave's last program merges every unit; slow, but right and the count ends zeroed."""
    from nanomoe_kernels import mla_decode as md
    from nanomoe_kernels.mla_split_merge import counters

    base, merge = _tunings()
    q, kv, ctx, want = _case(128, torch.bfloat16, 31, [16384, 9000, 77, 0], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 33)
    splits = 2 * torch.cuda.get_device_properties(0).multi_processor_count // 8   # 4 rows x 2 head blocks: 2 waves
    monkeypatch.setattr(md, "device_sms", lambda device: 1 << 20)
    out = md.mla_decode(q, cache, ctx, C, SCALE, block_table=table, num_splits=splits, tuning=merge)
    _check(out, want, ctx)
    _close(out, md.mla_decode(q, cache, ctx, C, SCALE, block_table=table, num_splits=splits, tuning=base))
    torch.cuda.synchronize()
    assert int(counters(q.device)[0]) == 0


def test_merge_on_two_streams_at_once():
    """Two merged calls in flight at once on two streams take separate counters: both right."""
    from nanomoe_kernels.mla_decode import mla_decode

    _, merge = _tunings()
    cases = [_case(128, torch.bfloat16, 41 + i, [16384], per_seq=1, cap=16384) for i in range(2)]
    pages = [_paged(kv, 64, 43 + i) for i, (_, kv, _, _) in enumerate(cases)]
    streams = [torch.cuda.Stream() for _ in cases]
    outs = []
    torch.cuda.synchronize()
    for _ in range(5):
        for (q, _, ctx, _), (cache, table), s in zip(cases, pages, streams):
            with torch.cuda.stream(s):
                outs.append(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=merge))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        q, _, ctx, want = cases[i % 2]
        _check(out, want, ctx)
        assert torch.equal(out, outs[i % 2])

