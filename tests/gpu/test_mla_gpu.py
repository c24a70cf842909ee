"""MLA on the GPU in bfloat16: Triton kernels at DeepSeek-V3 dims and the whole block vs the oracle.

Dimension legend: B sequences, R query rows, N heads, C latent (512), Dr rope (64), Dc = 576,
L context, S queries, Dn/Dv nope/value dims (128). Marked `gpu`; skipped without CUDA.
Large shapes are checked against float64 torch math written out here (the loop oracle in
reference/mla.py would take minutes); the whole block is checked against reference.mla itself.
"""

import nanomoe_reference.mla as ref
import pytest
import torch

from nanomoe_fn.attention.cache import init_contiguous_cache, init_paged_cache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.mla import mla
from nanomoe_fn.attention.params import init_mla_params

# kernels/ is imported inside the tests: importing it here, at collection on a CPU-only machine,
# would decorate the kernels before the CPU test modules ask for the interpreter
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2
TUNINGS = [None, dict(block_h=64, block_n=64, num_warps=8), dict(block_h=16, block_n=64, num_warps=8),
           dict(block_h=128, block_n=32, value_splits=2, tma=True), dict(block_h=64, block_n=32, tma=True),
           dict(block_h=32, block_n=64, num_warps=4, tma=True, key_major=True),
           dict(block_h=16, block_n=64, num_warps=4, key_major=True)]
# the bench's other key-major candidates (16-head TMA programs, 64 heads or 8 warps, 32-row tiles)
WIDE_KEY_MAJOR = [dict(block_h=16, block_n=64, num_warps=4, num_stages=2, tma=True, key_major=True),
                  dict(block_h=64, block_n=64, num_warps=8, num_stages=2, tma=True, key_major=True),
                  dict(block_h=32, block_n=64, num_warps=8, num_stages=2, tma=True, key_major=True),
                  dict(block_h=16, block_n=32, num_warps=4, num_stages=3, key_major=True)]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    return float((out.double() - want).norm() / want.norm())


def latent_decode_f64(q, kv, ctx, C, scale):
    """q [R, N, Dc], kv [R, L, Dc] per row, ctx [R]: float64 softmax(q.k) . v with v = kv[..., :C]."""
    q, kv = q.double(), kv.double()
    s = torch.einsum("rnd,rld->rnl", q, kv) * scale
    seen = torch.arange(kv.shape[1], device=q.device)[None, None, :] < ctx[:, None, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("rnl,rlc->rnc", p, kv[..., :C])


def paged_copy(kv: torch.Tensor, page: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """kv [B, L, Dc] -> (pages [B * L / G, G, Dc] in a shuffled order, block_table [B, L / G] int32)."""
    B, L, dc = kv.shape
    perm = torch.randperm(B * L // page, device=kv.device, generator=g)
    pages = torch.empty(B * L // page, page, dc, dtype=kv.dtype, device=kv.device)
    pages[perm] = kv.reshape(-1, page, dc)
    return pages, perm.reshape(B, L // page).int()


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("tuning", TUNINGS)
def test_decode_bf16(heads, paged, tuning):
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    tuning = None if tuning is None else DecodeTuning(**tuning)
    g = torch.Generator(device="cuda").manual_seed(heads)
    B, L, C, DR = 4, 4160, 512, 64
    kv = torch.randn(B, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(B, heads, C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([1, 63, 1000, 4160], dtype=torch.int32, device="cuda")
    scale = 0.1352
    want = latent_decode_f64(q, kv, ctx, C, scale)
    for splits in ((None, 1, 7) if tuning is None else (None, 7)):
        if paged:
            pages, table = paged_copy(kv, 64, g)
            out = mla_decode(q, pages, ctx, C, scale, block_table=table, num_splits=splits, tuning=tuning)
        else:
            out = mla_decode(q, kv, ctx, C, scale, num_splits=splits, tuning=tuning)
        assert rel_err(out, want) < BF16_TOL


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("tuning", WIDE_KEY_MAJOR)
def test_decode_bf16_key_major_wide(heads, paged, tuning):
    """Capacity 4096: full TMA tiles, ragged tails (a one-tile loop after the TMA loop), a length-0 row;
    page 128."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    g = torch.Generator(device="cuda").manual_seed(heads + 1)
    B, L, C, DR = 4, 4096, 512, 64
    kv = torch.randn(B, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(B, heads, C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([0, 130, 1000, 4096], dtype=torch.int32, device="cuda")
    want = latent_decode_f64(q, kv, ctx, C, 0.1352)
    pages, table = paged_copy(kv, 128, g) if paged else (kv, None)
    for splits in (None, 1, 7):
        out = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, num_splits=splits, tuning=DecodeTuning(**tuning))
        assert rel_err(out[1:], want[1:]) < BF16_TOL and (out[0] == 0).all()


def test_key_major_one_stage_refused():
    """One pipeline stage stages the key-major tile in registers, which Triton 3.6 computed wrongly (relative
    error ~7, then an illegal address: run 162): refused by name instead."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    q = torch.randn(1, 16, 576, device="cuda").bfloat16()
    kv = torch.randn(1, 256, 576, device="cuda").bfloat16()
    ctx = torch.tensor([256], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"tuning.num_stages must be >= 2 with key_major on a GPU, got 1"):
        mla_decode(q, kv, ctx, 512, 0.1, tuning=DecodeTuning(16, 64, 1, 4, 1, key_major=True))


@pytest.mark.parametrize("tuning", [dict(block_h=64, block_n=64, num_warps=8, num_stages=1),
                                    dict(block_h=16, block_n=64, num_warps=4, num_stages=1),
                                    dict(block_h=128, block_n=32, value_splits=2, num_stages=1)])
def test_decode_bf16_one_stage_head_major(tuning):
    """The head-major kernel with its tiles staged in registers (one stage) stays right."""
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    g = torch.Generator(device="cuda").manual_seed(5)
    kv = torch.randn(2, 4160, 576, device="cuda", generator=g).bfloat16()
    q = torch.randn(2, 128, 576, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([63, 4160], dtype=torch.int32, device="cuda")
    want = latent_decode_f64(q, kv, ctx, 512, 0.1352)
    pages, table = paged_copy(kv, 64, g)
    for splits in (1, 7):
        out = mla_decode(q, pages, ctx, 512, 0.1352, block_table=table, num_splits=splits,
                         tuning=DecodeTuning(**tuning))
        assert rel_err(out, want) < BF16_TOL


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_bf16_few_rows(heads, batch, paged):
    """Few sequences at L = 16k: the default tuning and split count (many splits, the parallel
    reduction), and split counts past the tiles (empty splits); page 64 takes the one-page-id tiles."""
    from nanomoe_kernels.mla_decode import mla_decode

    g = torch.Generator(device="cuda").manual_seed(batch * heads)
    L, C, DR = 16384, 512, 64
    kv = torch.randn(batch, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(batch, heads, C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([L, 9000, 77, 0][:batch], dtype=torch.int32, device="cuda")
    want = latent_decode_f64(q, kv, ctx, C, 0.1352)
    pages, table = paged_copy(kv, 64, g) if paged else (kv, None)
    for splits in (None, 3, 256):
        out = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, num_splits=splits)
        assert rel_err(out, want) < BF16_TOL
        assert batch == 1 or (out[3] == 0).all()


@pytest.mark.parametrize("heads,batch", [(16, 1), (16, 32), (128, 4)])
def test_decode_bf16_partials(heads, batch):
    """input_dtype_partials (split partials stored in bf16) on each shape's default tuning, L = 16k, paged, the
    default split count and 3: against float64."""
    from dataclasses import replace

    from nanomoe_kernels.mla_decode import default_tuning, mla_decode

    g = torch.Generator(device="cuda").manual_seed(heads + batch)
    L, C, DR = 16384, 512, 64
    kv = torch.randn(batch, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(batch, heads, C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([L, 9000, 77, 0] * (batch // 4) if batch >= 4 else [L], dtype=torch.int32, device="cuda")
    want = latent_decode_f64(q, kv, ctx, C, 0.1352)
    pages, table = paged_copy(kv, 64, g)
    tuning = replace(default_tuning(heads, batch), input_dtype_partials=True)
    for splits in (None, 3):
        out = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, num_splits=splits, tuning=tuning)
        live = ctx > 0
        assert rel_err(out[live], want[live]) < BF16_TOL and (out[~live] == 0).all()


@pytest.mark.parametrize("heads,batch,paged", [(16, 1, True), (16, 1, False), (16, 32, True), (128, 1, True),
                                               (128, 4, False)])
def test_decode_bf16_pdl(heads, batch, paged):
    """The split reduction launched with PDL (tuning.pdl) on each shape's default tuning, L = 16k: the same bits
    as without it, eagerly and replayed from a CUDA graph after the inputs change, and against float64."""
    from dataclasses import replace

    from nanomoe_kernels.mla_decode import default_tuning, mla_decode

    g = torch.Generator(device="cuda").manual_seed(7 * heads + batch)
    L, C, DR = 16384, 512, 64
    kv = torch.randn(batch, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(batch, heads, C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([L, 9000, 77, 0] * (batch // 4) if batch >= 4 else [L], dtype=torch.int32, device="cuda")
    pages, table = paged_copy(kv, 64, g) if paged else (kv, None)
    base = replace(default_tuning(heads, batch), pdl=False)
    tuning = replace(base, pdl=True)
    for splits in (None, 3):
        plain = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, num_splits=splits, tuning=base)
        out = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, num_splits=splits, tuning=tuning)
        assert torch.equal(out, plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mla_decode(q, pages, ctx, C, 0.1352, block_table=table, tuning=tuning)
    q.copy_(torch.randn(q.shape, device="cuda", generator=g).bfloat16())
    ctx.copy_(ctx.flip(0))
    graph.replay()
    want = latent_decode_f64(q, kv, ctx, C, 0.1352)
    live = ctx > 0
    assert torch.equal(captured, mla_decode(q, pages, ctx, C, 0.1352, block_table=table, tuning=base))
    assert rel_err(captured[live], want[live]) < BF16_TOL and (captured[~live] == 0).all()


def test_decode_matches_loop_oracle():
    from nanomoe_kernels.mla_decode import mla_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(2, 70, 576, device="cuda", generator=g).bfloat16()
    q = torch.randn(2, 3, 576, device="cuda", generator=g).bfloat16()
    ctx = [70, 5]
    out = mla_decode(q, kv, torch.tensor(ctx, dtype=torch.int32, device="cuda"), 512, 0.1)
    assert rel_err(out.cpu(), ref.latent_decode(q, kv, ctx, 512, 0.1)) < BF16_TOL


@pytest.mark.parametrize("heads", [16, 128])
def test_prefill_bf16(heads):
    from nanomoe_kernels.mla_prefill import mla_prefill

    g = torch.Generator(device="cuda").manual_seed(1)
    B, S, L, DN, DR, DV = 2, 700, 1000, 128, 64, 128
    q = torch.randn(B, S, heads, DN + DR, device="cuda", generator=g).bfloat16()
    k_nope = torch.randn(B, L, heads, DN, device="cuda", generator=g).bfloat16()
    k_pe = torch.randn(B, L, DR, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, L, heads, DV, device="cuda", generator=g).bfloat16()
    short = torch.where(torch.arange(S) < 400, torch.arange(S), -1)        # 400 tokens, then padding
    pos = torch.stack([torch.arange(L - S, L), short]).int().cuda()
    scale = 192 ** -0.5
    out = mla_prefill(q[..., :DN], q[..., DN:], k_nope, k_pe, v, pos, scale)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, heads, -1)], -1).double()
    s = torch.einsum("bsnd,blnd->bnsl", q.double(), k) * scale
    seen = torch.arange(L, device="cuda")[None, None, None, :] <= pos[:, None, :, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    want = torch.einsum("bnsl,blnd->bsnd", p, v.double())
    assert rel_err(out, want) < BF16_TOL
    assert (out[1, 400:] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("paged", [False, True])
def test_mla_block_bf16(backend, paged):
    cfg = MLAConfig.preset("tiny", page_size=64)
    g = torch.Generator().manual_seed(2)
    p = init_mla_params(cfg, torch.bfloat16, "cuda", generator=g)
    lens = [70, 9, 1]
    x = torch.randn(3, 70, cfg.hidden_size, generator=g).bfloat16().cuda()
    pos = torch.full((3, 70), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        pos[b, :n] = torch.arange(n)
    want, _ = ref.mla(p, x, lens, cfg)
    if paged:
        cache = init_paged_cache(3, 128, cfg.cache_dim, torch.bfloat16, "cuda", page_size=64, generator=g)
    else:
        cache = init_contiguous_cache(3, 128, cfg.cache_dim, torch.bfloat16, "cuda")
    out, cache = mla(p, x[:, :60], pos[:, :60].cuda(), cache, cfg, backend)
    outs = [out]
    for s in range(60, 70):
        step = torch.minimum(torch.full((3, 1), s), (pos >= 0).sum(1, keepdim=True) - 1)
        o, cache = mla(p, torch.gather(x.cpu(), 1, step[:, :, None].expand(-1, -1, cfg.hidden_size)).cuda(),
                       step.cuda(), cache, cfg, backend, check=False)
        outs.append(torch.where((pos[:, s:s + 1] >= 0)[:, :, None].cuda(), o, 0))
    assert rel_err(torch.cat(outs, 1).cpu(), want) < BF16_TOL
