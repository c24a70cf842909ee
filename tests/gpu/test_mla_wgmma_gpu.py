"""The Gluon wgmma MLA decode stage 1 (kernels/mla_decode_wgmma.py) on a compute-capability 9.0 GPU.

Dimension legend: B sequences, S query rows per sequence, R = B * S rows, N heads, C latent (512), Dr rope
(64), Dc = 576, L cache capacity, G page size. Marked `gpu`; skipped without an sm_90 GPU. Cache rows past each
sequence's context hold NaN, so a read of a row the kernel must not use shows up in the output.
"""

from dataclasses import replace

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")]
C, DR, SCALE = 512, 64, 0.1352


def _case(heads: int, dtype: torch.dtype, seed: int, lens: list[int], per_seq: int = 2, cap: int = 4224):
    """q [R, N, Dc], cache [B, L, Dc] (NaN past each sequence's longest row), ctx [R], the float64 answer."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    b = len(lens) // per_seq
    kv = torch.randn(b, cap, C + DR, device="cuda", generator=g).to(dtype)
    q = torch.randn(b * per_seq, heads, C + DR, device="cuda", generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for s in range(b):
        kv[s, max(lens[s * per_seq:(s + 1) * per_seq]):] = float("nan")
    return q, kv, ctx, _want(q, kv, ctx, per_seq)


def _want(q: torch.Tensor, kv: torch.Tensor, ctx: torch.Tensor, per_seq: int, c: int = C) -> torch.Tensor:
    """float64 softmax(q . k) . v over each row's first ctx cache rows (values: the first c dims)."""
    rows_kv = kv.nan_to_num(0.0).double().repeat_interleave(per_seq, 0)
    s = torch.einsum("rnd,rld->rnl", q.double(), rows_kv) * SCALE
    seen = torch.arange(kv.shape[1], device="cuda")[None, None, :] < ctx[:, None, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("rnl,rlc->rnc", p, rows_kv[..., :c])


def _paged(kv: torch.Tensor, page: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, cap, dc = kv.shape
    perm = torch.randperm(b * cap // page, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
    pages = torch.empty(b * cap // page, page, dc, dtype=kv.dtype, device="cuda")
    pages[perm] = kv.reshape(-1, page, dc)
    return pages, perm.reshape(b, cap // page).int()


def _check(out: torch.Tensor, want: torch.Tensor, ctx: torch.Tensor) -> None:
    live = ctx > 0
    assert torch.isfinite(out).all(), "output holds NaN/Inf: a cache row past the context was read"
    assert float((out[live].double() - want[live]).norm() / want[live].norm()) < 2e-2
    assert (out[~live] == 0).all()


def _replayed_after_change(q: torch.Tensor, kv: torch.Tensor, cache: torch.Tensor, table: torch.Tensor | None,
                           ctx: torch.Tensor, seed: int, tuning: object = None, eager: object = None) -> None:
    """mla_decode with `tuning` captured in a CUDA graph, replayed after q and the lengths change (within each
    sequence's written rows): the same bits as an eager call with `eager` (default: `tuning`) on the new inputs,
    and right against float64. None: the default tuning."""
    from nanomoe_kernels.mla_decode import mla_decode

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=tuning)
    q.copy_(torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
    ctx.copy_(torch.tensor([5000, 8999, 1, 0][:ctx.numel()], dtype=torch.int32, device="cuda"))
    graph.replay()
    assert torch.equal(captured, mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=eager or tuning))
    _check(captured, _want(q, kv, ctx, 1), ctx)


@pytest.mark.parametrize("heads", [64, 128])
@pytest.mark.parametrize("page", [0, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ws", [False, True])
def test_decode_wgmma(heads, page, dtype, ws):
    """Rows of length 0, 1 (a lone ragged tile), 63, 64 (one full tile), 1000 and the whole capacity, two query
    rows per sequence; split counts: the default, 1 (the final output straight from stage 1), 7, and 100
    (more splits than tiles: empty splits). Against float64 and next to the Triton tl.dot stage 1. ws: the
    warp-specialised form (kernels/mla_decode_wgmma_ws.py)."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    q, kv, ctx, want = _case(heads, dtype, heads + page, [0, 1, 63, 64, 1000, 4224])
    cache, table = _paged(kv, page, page) if page else (kv, None)
    wg = DecodeTuning(wgmma=True, warp_specialize=ws)
    for splits in (None, 1, 7, 100):
        out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, num_splits=splits, tuning=wg)
        _check(out, want, ctx)
    tl_out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=DecodeTuning(64, 64, num_warps=8))
    live = ctx > 0
    assert float((out[live].double() - tl_out[live].double()).norm() / tl_out[live].double().norm()) < 1e-2


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_wgmma_default_16k(batch):
    """128 heads at L = 16k, paged (the one-row latency case and a few rows): the default tuning is the wgmma
    kernel on sm_90 (warp-specialised on Triton >= 3.6; the same bits as asking for default_tuning's pick: at few
    rows bf16 partials by TMA store), right against float64;
    then captured in a CUDA graph and replayed after the query and the lengths change (within each sequence's
    written rows)."""
    from nanomoe_kernels.mla_decode import mla_decode
    from nanomoe_kernels.mla_decode_tuning import default_tuning

    tuning = default_tuning(128, batch, wgmma=True)
    assert tuning.store_tma and tuning.first_tile_alone and tuning.pdl == (batch == 1)   # batch <= FEW_ROWS
    lens = [16384, 9000, 77, 0][:batch]
    q, kv, ctx, want = _case(128, torch.bfloat16, 11 + batch, lens, per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, batch)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table)
    assert torch.equal(out, mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=tuning))
    _check(out, want, ctx)
    _replayed_after_change(q, kv, cache, table, ctx, 5)


def test_decode_wgmma_ws_graph_16k():
    """The warp-specialised form at 128 heads, L = 16k, paged, B = 4: against float64, then from a CUDA graph after
    q and the lengths change, the same bits as eager."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    ws = DecodeTuning(wgmma=True, warp_specialize=True)
    q, kv, ctx, want = _case(128, torch.bfloat16, 21, [16384, 9000, 77, 0], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 4)
    _check(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=ws), want, ctx)
    _replayed_after_change(q, kv, cache, table, ctx, 6, ws)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_wgmma_ws_pdl(batch):
    """The warp-specialised stage 1 with the split reduction launched with PDL (DecodeTuning.pdl): the reduction waits
    on the GPU for stage 1's end, so the bits are those without PDL; eager and replayed from a CUDA graph after q and
    the lengths change, against float64."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    ws, pdl = DecodeTuning(wgmma=True, warp_specialize=True), DecodeTuning(wgmma=True, warp_specialize=True, pdl=True)
    q, kv, ctx, want = _case(128, torch.bfloat16, 51 + batch, [16384, 9000, 77, 0][:batch], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 9 + batch)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=pdl)
    assert torch.equal(out, mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=ws))
    _check(out, want, ctx)
    _replayed_after_change(q, kv, cache, table, ctx, 9, pdl, eager=ws)


@pytest.mark.parametrize("batch, bf16_partials, paged", [(1, False, True), (4, False, True), (1, True, True),
                                                          (2, False, False)])
def test_decode_wgmma_ws_store_tma(batch, bf16_partials, paged):
    """Split partials written through shared memory and TMA stores (DecodeTuning.store_tma): the same values as the
    plain stores, so the same bits (float32 or bf16 partials), with and without PDL, and replayed from a CUDA graph
    after q and the lengths change; against float64."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    base = DecodeTuning(wgmma=True, warp_specialize=True, input_dtype_partials=bf16_partials)
    tma, tma_pdl = replace(base, store_tma=True), replace(base, store_tma=True, pdl=True)
    q, kv, ctx, want = _case(128, torch.bfloat16, 71 + batch, [16384, 9000, 77, 0][:batch], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 3 + batch) if paged else (kv, None)
    plain = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=base)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=tma)
    assert torch.equal(out, plain)
    assert torch.equal(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=tma_pdl), plain)
    _check(out, want, ctx)
    _replayed_after_change(q, kv, cache, table, ctx, 5, tma, eager=base)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_wgmma_ws_first_loads_ordered(batch):
    """The load warp's first loads ordered (DecodeTuning.first_tile_alone, q_first, both) change only when bytes
    arrive: the same bits as the default, eager and replayed from a CUDA graph; reduction programs of 1, 2 and 8 warps
    (reduce_warps) sum in another order, so against float64."""
    from nanomoe_kernels.mla_decode import decode_tuning_for, mla_decode

    q, kv, ctx, want = _case(128, torch.bfloat16, 91 + batch, [16384, 9000, 77, 0][:batch], per_seq=1, cap=16384)
    cache, table = _paged(kv, 64, 7 + batch)
    base = decode_tuning_for(q, cache, C)
    out = mla_decode(q, cache, ctx, C, SCALE, block_table=table)
    _check(out, want, ctx)
    for fields in ({"first_tile_alone": True}, {"q_first": True}, {"first_tile_alone": True, "q_first": True}):
        assert torch.equal(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=replace(base, **fields)), out)
    for warps in (1, 2, 8):
        _check(mla_decode(q, cache, ctx, C, SCALE, block_table=table, tuning=replace(base, reduce_warps=warps)),
               want, ctx)
    _replayed_after_change(q, kv, cache, table, ctx, 3, replace(base, first_tile_alone=True, q_first=True), eager=base)


def test_decode_wgmma_narrow_latent_falls_back():
    """A latent of 96 (halves of 48 columns: no TMA block width) is refused by name when the wgmma stage 1 is asked
    for, and served by the tl.dot kernels by default, right against float64."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    c, g = 96, torch.Generator(device="cuda").manual_seed(8)
    kv = torch.randn(2, 1024, c + DR, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(2, 64, c + DR, device="cuda", generator=g).to(torch.bfloat16)
    ctx = torch.tensor([1000, 65], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="powers of two"):
        mla_decode(q, kv, ctx, c, SCALE, tuning=DecodeTuning(wgmma=True, warp_specialize=True))
    _check(mla_decode(q, kv, ctx, c, SCALE), _want(q, kv, ctx, 1, c), ctx)


def test_decode_wgmma_refuses_clearly():
    """Head counts that are not a multiple of 64 and float32 name what the kernel needs."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    q, kv, ctx, _ = _case(16, torch.bfloat16, 3, [10, 20], per_seq=1, cap=256)
    with pytest.raises(ValueError, match="heads % 64"):
        mla_decode(q, kv, ctx, C, SCALE, tuning=DecodeTuning(wgmma=True))
    q, kv, ctx, _ = _case(64, torch.float32, 3, [10, 20], per_seq=1, cap=256)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        mla_decode(q, kv, ctx, C, SCALE, tuning=DecodeTuning(wgmma=True))


@pytest.mark.parametrize("paged", [False, True])
def test_mla_block_v3_dims(paged):
    """The whole MLA block at DeepSeek-V3's attention dims (128 heads, latent 512, rope 64) on the triton backend,
    whose decode then runs the wgmma stage 1 by default: prefill 64 tokens, then two decode steps (contexts of 65
    and 66 rows: a full tile and a ragged one), against reference.mla in float64."""
    import nanomoe_reference.mla as ref

    from nanomoe_fn.attention.cache import init_contiguous_cache, init_paged_cache
    from nanomoe_fn.attention.config import MLAConfig
    from nanomoe_fn.attention.mla import mla
    from nanomoe_fn.attention.params import init_mla_params

    cfg = MLAConfig.preset("deepseek-v3", page_size=64)
    g = torch.Generator().manual_seed(3)
    p = init_mla_params(cfg, torch.bfloat16, "cuda", generator=g)
    lens, steps = [66, 9, 1], 64
    x = torch.randn(3, 66, cfg.hidden_size, generator=g).bfloat16()
    pos = torch.full((3, 66), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        pos[b, :n] = torch.arange(n)
    want, _ = ref.mla(p, x.cuda(), lens, cfg)
    if paged:
        cache = init_paged_cache(3, 128, cfg.cache_dim, torch.bfloat16, "cuda", page_size=64, generator=g)
    else:
        cache = init_contiguous_cache(3, 128, cfg.cache_dim, torch.bfloat16, "cuda")
    out, cache = mla(p, x[:, :steps].cuda(), pos[:, :steps].cuda(), cache, cfg, "triton")
    outs = [out]
    for s in range(steps, 66):
        step = torch.minimum(torch.full((3, 1), s), (pos >= 0).sum(1, keepdim=True) - 1)
        o, cache = mla(p, torch.gather(x, 1, step[:, :, None].expand(-1, -1, cfg.hidden_size)).cuda(),
                       step.cuda(), cache, cfg, "triton", check=False)
        outs.append(torch.where((pos[:, s:s + 1] >= 0)[:, :, None].cuda(), o, 0))
    got = torch.cat(outs, 1).cpu()
    assert torch.isfinite(got).all()
    assert float((got.double() - want).norm() / want.norm()) < 2e-2
