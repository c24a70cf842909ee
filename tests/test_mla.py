"""MLA block tests: both paths, both cache layouts, both backends against the float64 oracle.

Dimension legend: B sequences, S new tokens per sequence, H hidden, N heads, C latent, Dc cache row.
CPU only: the triton backend runs under TRITON_INTERPRET=1 (set before kernels are imported; the
interpreter gets bfloat16 wrong, so float32/float16 here and bfloat16 in tests/gpu).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib  # noqa: E402

import nanomoe_kernels.mla_decode as _decode  # noqa: E402
import nanomoe_kernels.mla_prefill as _prefill  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not _decode.runs_interpreted():
    # another module imported kernels/ before the variable was set: decorate the kernels again
    importlib.reload(_decode)
    importlib.reload(_prefill)


import nanomoe_reference.mla as ref  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

from nanomoe_fn.attention.backends import MLA_BACKENDS, get_mla_backend  # noqa: E402
from nanomoe_fn.attention.cache import ContiguousCache, PagedCache, init_contiguous_cache, init_paged_cache  # noqa: E402
from nanomoe_fn.attention.config import MLAConfig  # noqa: E402
from nanomoe_fn.attention.mla import mla  # noqa: E402
from nanomoe_fn.attention.params import MLAParams, check_mla_params, init_mla_params  # noqa: E402
from nanomoe_fn.attention.rope import rope_cos_sin, yarn_inv_freq  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERPRET, reason="CPU triton tests run under TRITON_INTERPRET=1")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    err = float((out.double().cpu() - want).norm() / want.norm().clamp_min(1e-30))
    assert err < TOL[dtype], f"relative error {err:.3g} over {TOL[dtype]} for {dtype}"


def setup(cfg: MLAConfig, lens: list[int], dtype=torch.float32, seed=0, perturb=True):
    g = torch.Generator().manual_seed(seed)
    p = init_mla_params(cfg, dtype, generator=g)
    if perturb:  # norms away from 1 so a missing norm weight shows
        bump = [0.3 * torch.rand(n, generator=g).to(dtype) for n in (cfg.q_lora_rank or 1, cfg.kv_lora_rank)]
        p = dataclasses.replace(p, kv_a_norm=p.kv_a_norm + bump[1])
        if p.q_a_norm is not None:
            p = dataclasses.replace(p, q_a_norm=p.q_a_norm + bump[0])
    S = max(lens)
    x = torch.randn(len(lens), S, cfg.hidden_size, generator=g).to(dtype)
    pos = torch.full((len(lens), S), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        pos[b, :n] = torch.arange(n)
    return p, x, pos, g


def make_cache(kind: str, cfg: MLAConfig, batch: int, capacity: int, dtype, g):
    if kind == "contiguous":
        return init_contiguous_cache(batch, capacity, cfg.cache_dim, dtype)
    return init_paged_cache(batch, capacity, cfg.cache_dim, dtype, page_size=cfg.page_size, generator=g)


def run_incremental(p, x, pos, cfg, cache, backend, prefix: int):
    """Prefill the first `prefix` tokens, then decode the rest one token per step; out [B, S, H]."""
    B, S, _ = x.shape
    outs = []
    if prefix:
        pre = torch.where(pos[:, :prefix] >= 0, pos[:, :prefix], -1)
        o, cache = mla(p, x[:, :prefix], pre, cache, cfg, backend)
        outs.append(o)
    for s in range(prefix, S):
        # every sequence steps; a finished one re-decodes its last token (same row, same answer)
        last = (pos >= 0).sum(1) - 1
        step = torch.minimum(torch.full((B,), s), last)[:, None]
        o, cache = mla(p, torch.gather(x, 1, step[:, :, None].expand(-1, -1, x.shape[2])), step, cache, cfg,
                       backend)
        outs.append(torch.where((pos[:, s:s + 1] >= 0)[:, :, None], o, 0))
    return torch.cat(outs, 1), cache


def test_presets_and_scale():
    v3 = MLAConfig.preset("deepseek-v3")
    assert (v3.hidden_size, v3.num_heads, v3.q_lora_rank, v3.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim, v3.cache_dim) == (128, 64, 128, 576)
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert v3.softmax_scale == pytest.approx(192 ** -0.5 * m * m)
    assert v3.softmax_scale == pytest.approx(ref.softmax_scale(v3))
    assert hash(v3) == hash(MLAConfig.preset("deepseek-v3"))
    assert torch.allclose(yarn_inv_freq(v3), torch.tensor(ref.inv_freq(v3), dtype=torch.float64))
    inv = yarn_inv_freq(v3)        # V3's ramp runs over pairs 10..23: original below, theta/40 above
    assert inv[5] == pytest.approx(10000 ** (-10 / 64)) and inv[30] == pytest.approx(10000 ** (-60 / 64) / 40)
    assert 10000 ** (-30 / 64) / 40 < inv[15] < 10000 ** (-30 / 64)
    cos, sin = rope_cos_sin(torch.tensor([0, 163839]), v3)
    assert cos.shape == (2, 32) and torch.isfinite(sin).all()
    assert torch.allclose(cos[0], torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="preset"):
        MLAConfig.preset("nope")
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig.preset("tiny", qk_rope_head_dim=7)


def test_params_are_pytrees():
    cfg = MLAConfig.preset("tiny")
    p = init_mla_params(cfg, torch.float32, generator=torch.Generator().manual_seed(0))
    half = tree_map(lambda t: t.to(torch.float16), p)
    assert isinstance(half, MLAParams) and half.kv_b_proj.dtype == torch.float16
    assert p.kv_b_proj.shape == (cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    c = tree_map(lambda t: t, init_paged_cache(2, 16, cfg.cache_dim, torch.float32, page_size=8))
    assert isinstance(c, PagedCache) and c.capacity == 16


@pytest.mark.parametrize("path", ["prefill", "decode"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_torch_matches_reference(path, kind):
    cfg = MLAConfig.preset("tiny")
    lens = [11, 6, 1]
    p, x, pos, g = setup(cfg, lens)
    want, want_rows = ref.mla(p, x, lens, cfg)
    cache = make_cache(kind, cfg, 3, 24, torch.float32, g)
    out, cache = mla(p, x, pos, cache, cfg, "torch", path=path)
    assert_close(out, want, torch.float32)
    assert cache.lens.tolist() == lens
    rows = cache.kv if kind == "contiguous" else None
    if rows is not None:
        for b, n in enumerate(lens):
            assert_close(rows[b, :n], want_rows[b, :n], torch.float32)


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_decode_equals_prefill_incremental(kind):
    """Prefill a prefix then absorbed decode steps == one reference pass over all tokens."""
    cfg = MLAConfig.preset("tiny")
    lens = [9, 5, 7]
    p, x, pos, g = setup(cfg, lens, seed=1)
    want, _ = ref.mla(p, x, lens, cfg)
    out, cache = run_incremental(p, x, pos, cfg, make_cache(kind, cfg, 3, 16, torch.float32, g), "torch", 3)
    assert_close(out, want, torch.float32)
    assert cache.lens.tolist() == lens


def test_paged_equals_contiguous():
    cfg = MLAConfig.preset("tiny")
    lens = [13, 4]
    p, x, pos, g = setup(cfg, lens, seed=2)
    outs = []
    for kind in ("contiguous", "paged"):
        cache = make_cache(kind, cfg, 2, 20, torch.float32, g)
        outs.append(run_incremental(p, x, pos, cfg, cache, "torch", 5)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backend_matches_reference(dtype):
    cfg = MLAConfig.preset("tiny")
    lens = [8, 3, 1]
    p, x, pos, g = setup(cfg, lens, dtype=dtype, seed=3)
    want, _ = ref.mla(p, x, lens, cfg)
    for kind in ("contiguous", "paged"):
        out, _ = mla(p, x, pos, make_cache(kind, cfg, 3, 16, dtype, g), cfg, "triton")
        assert_close(out, want, dtype)
        out, _ = run_incremental(p, x, pos, cfg, make_cache(kind, cfg, 3, 16, dtype, g), "triton", 2)
        assert_close(out, want, dtype)


def test_context_of_one():
    cfg = MLAConfig.preset("tiny")
    p, x, pos, g = setup(cfg, [1, 1])
    want, _ = ref.mla(p, x, [1, 1], cfg)
    for backend in (("torch", "triton") if INTERPRET else ("torch",)):
        out, cache = mla(p, x, pos, make_cache("paged", cfg, 2, 8, torch.float32, g), cfg, backend)
        assert_close(out, want, torch.float32)
        assert cache.lens.tolist() == [1, 1]


@settings(max_examples=12, deadline=None)
@given(heads=st.integers(1, 5), c=st.sampled_from([8, 16, 24]), dr=st.sampled_from([4, 8]),
       dn=st.sampled_from([4, 8]), dv=st.sampled_from([4, 12]), lens=st.lists(st.integers(1, 7), min_size=1,
                                                                             max_size=3),
       path=st.sampled_from(["prefill", "decode"]), seed=st.integers(0, 2 ** 16))
def test_property_torch_paths(heads, c, dr, dn, dv, lens, path, seed):
    cfg = MLAConfig(hidden_size=24, num_heads=heads, q_lora_rank=12, kv_lora_rank=c, qk_nope_head_dim=dn,
                    qk_rope_head_dim=dr, v_head_dim=dv, original_max_position_embeddings=16, page_size=4)
    p, x, pos, g = setup(cfg, lens, dtype=torch.float64, seed=seed)
    want, _ = ref.mla(p, x, lens, cfg)
    cache = make_cache("paged", cfg, len(lens), 8, torch.float64, g)
    out, _ = mla(p, x, pos, cache, cfg, "torch", path=path)
    assert_close(out, want, torch.float64)


def test_errors():
    cfg = MLAConfig.preset("tiny")
    p, x, pos, g = setup(cfg, [4, 4])
    cache = init_contiguous_cache(2, 8, cfg.cache_dim, torch.float32)
    with pytest.raises(ValueError, match=r"^MLA backend must be one of \['torch', 'triton'\], got 'cuda'$"):
        mla(p, x, pos, cache, cfg, "cuda")
    with pytest.raises(ValueError, match="x must be"):
        mla(p, x[..., :10], pos, cache, cfg)
    with pytest.raises(ValueError, match="cache holds 3"):
        mla(p, x, pos, init_contiguous_cache(3, 8, cfg.cache_dim, torch.float32), cfg)
    with pytest.raises(ValueError, match="Dc="):
        mla(p, x, pos, init_contiguous_cache(2, 8, cfg.cache_dim + 1, torch.float32), cfg)
    with pytest.raises(ValueError, match="positions must be"):
        mla(p, x, pos.float(), cache, cfg)
    with pytest.raises(ValueError, match="capacity"):
        mla(p, x, pos + 5, init_contiguous_cache(2, 8, cfg.cache_dim, torch.float32), cfg)
    with pytest.raises(ValueError, match="gap"):
        mla(p, x, pos + 1, cache, cfg)                      # cache empty, tokens start at 1
    with pytest.raises(ValueError, match="consecutive"):
        mla(p, x, pos.flip(1), cache, cfg)
    with pytest.raises(ValueError, match="no padding"):
        mla(p, x[:, :1], torch.tensor([[0], [-1]]), cache, cfg)
    bad_table = init_paged_cache(2, 8, cfg.cache_dim, torch.float32, page_size=4)
    bad_table = PagedCache(bad_table.kv, bad_table.block_table + 100, bad_table.lens)
    with pytest.raises(ValueError, match="block_table"):
        mla(p, x, pos, bad_table, cfg)
    with pytest.raises(TypeError, match="ContiguousCache or PagedCache"):
        mla(p, x, pos, {"kv": cache.kv}, cfg)
    with pytest.raises(ValueError, match="num_pages"):
        init_paged_cache(2, 8, cfg.cache_dim, torch.float32, page_size=4, num_pages=3)
    assert isinstance(cache, ContiguousCache)


def test_backend_registry():
    """MLA backends by name, as the expert backends: each says whether it can run here and why not."""
    cfg = MLAConfig.preset("tiny")
    assert sorted(MLA_BACKENDS) == ["torch", "triton"]
    for name, backend in MLA_BACKENDS.items():
        assert backend.name == name
        ok, reason = backend.supports(cfg, torch.device("cpu"))
        assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason)
    assert MLA_BACKENDS["torch"].supports(cfg, torch.device("cpu")) == (True, "")
    assert MLA_BACKENDS["triton"].supports(cfg, torch.device("cpu"))[0] == INTERPRET
    if not INTERPRET:
        with pytest.raises(ValueError, match=r"^MLA backend 'triton' cannot run here: it needs CUDA tensors"):
            get_mla_backend("triton", cfg, "cpu")
    assert get_mla_backend("torch", cfg, "cpu") is MLA_BACKENDS["torch"]
    with pytest.raises(ValueError, match=r"^MLA backend must be one of \['torch', 'triton'\], got 'flash'$"):
        get_mla_backend("flash", cfg, "cpu")


# DeepSeek-V2 / HF features (tests/test_hf_modules.py compares them with transformers itself)
FEATURES = {
    "v2-lite": dict(q_lora_rank=None, mscale=0.707, mscale_all_dim=0.707),
    "bias-rotate-half": dict(attention_bias=True, rope_interleave=False),
    "no-q-lora-bias-default-rope": dict(q_lora_rank=None, attention_bias=True, rope_type="default"),
    "linear-rope": dict(rope_type="linear", rope_factor=2.0, mscale_all_dim=0.5, latent_norm_eps=1e-3),
    "yarn-untruncated-factor": dict(yarn_truncate=False, rope_attention_factor=1.2, original_max_position_embeddings=40,
                                    rope_theta=100.0, beta_fast=4.0),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_match_reference(name):
    cfg = MLAConfig.preset("tiny", **FEATURES[name])
    lens = [7, 4]
    p, x, pos, g = setup(cfg, lens, dtype=torch.float64, seed=5)
    want, want_rows = ref.mla(p, x, lens, cfg)
    backends = ("torch", "triton") if INTERPRET else ("torch",)
    for backend in backends:
        dtype = torch.float64 if backend == "torch" else torch.float32
        pc, xc = tree_map(lambda t, d=dtype: t.to(d), p), x.to(dtype)
        out, cache = mla(pc, xc, pos, make_cache("contiguous", cfg, 2, 12, dtype, g), cfg, backend, path="prefill")
        assert_close(out, want, dtype)
        for b, n in enumerate(lens):
            assert_close(cache.kv[b, :n], want_rows[b, :n], dtype)
        out, _ = run_incremental(pc, xc, pos, cfg, make_cache("paged", cfg, 2, 12, dtype, g), backend, 2)
        assert_close(out, want, dtype)


def test_optional_params_and_their_check():
    cfg = MLAConfig.preset("tiny", q_lora_rank=None, attention_bias=True)
    p = init_mla_params(cfg, torch.float32, generator=torch.Generator().manual_seed(0))
    assert p.q_a_proj is None and p.q_a_norm is None and p.q_b_proj is None and p.q_a_bias is None
    assert p.q_proj.shape == (4 * 32, 64) and p.kv_a_bias.shape == (48,) and p.o_bias.shape == (64,)
    half = tree_map(lambda t: t.half(), p)
    assert isinstance(half, MLAParams) and half.q_proj.dtype == torch.float16 and half.q_a_proj is None
    low = MLAConfig.preset("tiny")
    check_mla_params(init_mla_params(low, torch.float32), low)
    with pytest.raises(ValueError, match=r"^attn_params\.q_a_proj must be a \[32, 64\] tensor for this config, got "
                                         r"None"):
        check_mla_params(p, dataclasses.replace(cfg, q_lora_rank=32))
    with pytest.raises(ValueError, match=r"^attn_params\.q_a_bias must be None for this config"):
        check_mla_params(init_mla_params(dataclasses.replace(low, attention_bias=True), torch.float32), low)
    x, pos = torch.randn(1, 2, 64), torch.arange(2)[None]
    with pytest.raises(ValueError, match=r"attn_params\.o_bias must be a \[64\] tensor"):
        mla(dataclasses.replace(p, o_bias=None), x, pos, init_contiguous_cache(1, 4, cfg.cache_dim, torch.float32), cfg)
    default = MLAConfig.preset("tiny", rope_type="default")
    assert default.softmax_scale == 32 ** -0.5 and default.rope_mscale == 1.0
    assert MLAConfig.preset("tiny", mscale=0.5, mscale_all_dim=0.0).rope_mscale == pytest.approx(0.1 * 3.6888794541 + 1)
