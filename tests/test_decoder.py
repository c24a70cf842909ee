"""The DeepSeek-V3 decoder layer as stages: sequential == the hand-written composition == the float64
reference, and every schedule (shared-expert overlap, two-batch overlap, both) == sequential, outputs and
caches alike, for prefill (one sequence cut inside, ragged sequences split by tokens) and decode (one
sequence: an empty micro-batch; several), contiguous and paged caches, MoE and dense layers.

Dimension legend: B sequences, S new tokens per sequence, H hidden.
"""

from __future__ import annotations

import nanomoe_reference as reference
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nanomoe_reference import mla as ref_mla

from nanomoe_fn import MLAConfig, MoEConfig, init_contiguous_cache, init_mla_params, init_moe_params, mla, moe_layer
from nanomoe_fn.attention.cache import init_paged_cache
from nanomoe_fn.attention.mla import rms_norm
from nanomoe_fn.decoder import (
    DECODER_DENSE_PROGRAM,
    DECODER_MOE_PROGRAM,
    DecoderParams,
    decoder_context,
    decoder_layer,
    split_sequences,
)
from nanomoe_fn.moe.params import SharedMLP
from nanomoe_fn.pipeline import sequential, shared_expert_overlap, two_batch_overlap
from tests.helpers import route_kwargs

H = 32
MLA = MLAConfig(hidden_size=H, num_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8)
MOE = MoEConfig(hidden=H, intermediate=16, num_experts=8, top_k=2, n_shared_experts=1, score_func="sigmoid",
                correction_bias=True)


def _params(seed: int, dense: bool = False) -> DecoderParams:
    g = torch.Generator().manual_seed(seed)
    attn = init_mla_params(MLA, torch.float64, generator=g)
    norms = [1 + 0.1 * torch.randn(H, generator=g, dtype=torch.float64) for _ in range(2)]
    if dense:
        w13 = torch.randn(2 * 24, H, generator=g, dtype=torch.float64) * H ** -0.5
        return DecoderParams(norms[0], attn, norms[1], dense=SharedMLP(w13, torch.randn(H, 24, generator=g,
                                                                                        dtype=torch.float64) / 5))
    return DecoderParams(norms[0], attn, norms[1], moe=init_moe_params(MOE, torch.float64, generator=g))


def _cache(B: int, paged: bool):
    if paged:
        return init_paged_cache(B, 32, MLA.cache_dim, torch.float64, page_size=4,
                                generator=torch.Generator().manual_seed(1))
    return init_contiguous_cache(B, 32, MLA.cache_dim, torch.float64)


def _prefill_inputs(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, S = len(lengths), max(lengths)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pos = torch.full((B, S), -1, dtype=torch.int64)
    for b, n in enumerate(lengths):
        pos[b, :n] = torch.arange(n)
    return x, pos


PLANS = {"shared_overlap": lambda p: sequential(shared_expert_overlap(p)) if p is DECODER_MOE_PROGRAM else None,
         "tbo": lambda p: two_batch_overlap(p),
         "tbo+shared": lambda p: two_batch_overlap(shared_expert_overlap(p)) if p is DECODER_MOE_PROGRAM else None,
         "shared_stream": lambda p: sequential(shared_expert_overlap(p, window=None, stream=True))
         if p is DECODER_MOE_PROGRAM else None}


def test_sequential_equals_the_composition_and_the_reference():
    params = _params(0)
    x, pos = _prefill_inputs([5, 3], 1)
    ctx = decoder_context(MLA, moe_cfg=MOE)
    out, cache = decoder_layer(params, x, pos, _cache(2, False), ctx)
    # by hand: the same functions in the same order
    a, c2 = mla(params.attn, rms_norm(x, params.attn_norm, MLA.rms_norm_eps), pos, _cache(2, False), MLA)
    x1 = x + a
    f = moe_layer(params.moe, rms_norm(x1, params.ffn_norm, MLA.rms_norm_eps).reshape(-1, H), MOE).view(x1.shape)
    assert torch.equal(out, x1 + f * (pos >= 0)[..., None]) and torch.equal(cache.kv, c2.kv)
    assert cache.lens.tolist() == [5, 3]
    # float64 reference: reference.mla, then reference.moe_layer on the normed tokens
    ref_a, _ = ref_mla.mla(params.attn, ref_mla.rms_norm(x, params.attn_norm, MLA.rms_norm_eps), [5, 3], MLA)
    ref_x1 = x + ref_a
    ref_f, _ = reference.moe_layer(ref_mla.rms_norm(ref_x1, params.ffn_norm, MLA.rms_norm_eps).reshape(-1, H),
                                   params.moe.gate.weight, (params.moe.experts.w13, params.moe.experts.w2),
                                   MOE.top_k, MOE.expert_type, (params.moe.shared.w13, params.moe.shared.w2),
                                   **route_kwargs(MOE, params.moe))
    ref = ref_x1 + ref_f.view(ref_x1.shape) * (pos >= 0)[..., None]
    valid = pos >= 0
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)  # the router runs in float32


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_every_schedule_equals_sequential_at_prefill_and_decode(lengths, paged, dense, seed):
    if max(lengths) < 2:  # S == 1 is a decode step: no padding there
        lengths = [1] * len(lengths)
    params = _params(seed, dense)
    program = DECODER_DENSE_PROGRAM if dense else DECODER_MOE_PROGRAM
    ctx = decoder_context(MLA, moe_cfg=None if dense else MOE)
    x, pos = _prefill_inputs(lengths, seed + 1)
    step = torch.randn(len(lengths), 1, H, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    want_cache = _cache(len(lengths), paged)
    want, want_cache = decoder_layer(params, x, pos, want_cache, ctx)  # prefill, then one decode step
    dpos = want_cache.lens.long()[:, None]
    want_d, want_cache = decoder_layer(params, step, dpos, want_cache, ctx)
    for name, make in PLANS.items():
        plan = make(program)
        if plan is None:
            continue
        cache = _cache(len(lengths), paged)
        got, cache = decoder_layer(params, x, pos, cache, ctx, plan)
        got_d, cache = decoder_layer(params, step, dpos, cache, ctx, plan)
        valid = pos >= 0
        torch.testing.assert_close(got[valid], want[valid], rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got_d, want_d, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n} decode: {m}")
        assert torch.equal(cache.lens, want_cache.lens), name
        torch.testing.assert_close(cache.kv, want_cache.kv, rtol=1e-6, atol=1e-6)


def test_the_split_balances_tokens_and_cuts_one_sequence_inside():
    cache = _cache(3, False)
    x, pos = _prefill_inputs([6, 1, 1], 0)
    a, b = split_sequences({"x": x, "positions": pos, "cache": cache, "part": None}, 2)
    assert a["x"].shape[0] == 1 and b["x"].shape[0] == 2  # 6 tokens | 2 tokens
    assert a["cache"].kv.data_ptr() == cache.kv.data_ptr()  # views of the one buffer
    one = _cache(1, False)
    x, pos = _prefill_inputs([7], 0)
    a, b = split_sequences({"x": x, "positions": pos, "cache": one, "part": None}, 2)
    assert a["positions"].tolist() == [[0, 1, 2, 3]] and b["positions"].tolist() == [[4, 5, 6]]
    assert b["cache"].lens.tolist() == [4]  # the second half starts where the first half's rows end
    with pytest.raises(ValueError, match="2 micro-batches"):
        split_sequences({"x": x, "positions": pos, "cache": one, "part": None}, 3)


def test_decoder_layer_refuses_mismatched_params_and_plans():
    params = _params(0)
    ctx = decoder_context(MLA, moe_cfg=MOE)
    x, pos = _prefill_inputs([2], 0)
    with pytest.raises(ValueError, match="exactly one of moe"):
        decoder_layer(DecoderParams(params.attn_norm, params.attn, params.ffn_norm), x, pos, _cache(1, False), ctx)
    with pytest.raises(ValueError, match="plan must be a plan of decoder_moe"):
        decoder_layer(params, x, pos, _cache(1, False), ctx, sequential(DECODER_DENSE_PROGRAM))
    with pytest.raises(ValueError, match="ctx.moe must be a MoEContext"):
        decoder_layer(params, x, pos, _cache(1, False), decoder_context(MLA))
