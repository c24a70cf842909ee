"""Edge cases of the public API: zero and one token, strided inputs, extreme routing configs, caches with stale
rows or unallocated pages, two-batch overlap on nearly empty sequences, pytrees of sparse records, and bad
arguments that must be refused by name (TypeError/ValueError, one line) instead of failing deep inside torch.

Dimension legend: T tokens, B sequences, S new tokens per sequence, H hidden.
CPU only: the triton backends run under TRITON_INTERPRET=1 (float32 here).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.mla_decode as _decode  # noqa: E402
import nanomoe_kernels.mla_prefill as _prefill  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not _decode.runs_interpreted():
    importlib.reload(_decode)  # kernels/ was imported before the variable was set: decorate the kernels again
    importlib.reload(_prefill)

import nanomoe_reference.mla as ref_mla  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from nanomoe_fn import (  # noqa: E402
    DECODER_MOE_PROGRAM,
    MOE_PROGRAM,
    ExpertBatch,
    GateParams,
    Handle,
    MLAConfig,
    MoEConfig,
    Placement,
    cast_params,
    decoder_context,
    decoder_layer,
    expert_ffn,
    init_contiguous_cache,
    init_mla_params,
    init_moe_params,
    init_paged_cache,
    mla,
    moe_layer,
    preset,
    route,
    run_moe,
    sequential,
    shared_mlp,
    two_batch_overlap,
)
from nanomoe_fn.attention.cache import ContiguousCache, PagedCache  # noqa: E402
from nanomoe_fn.batch import to_masked  # noqa: E402
from nanomoe_fn.decoder import DecoderParams  # noqa: E402
from nanomoe_fn.model.config import model_preset  # noqa: E402
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward  # noqa: E402
from nanomoe_fn.model.generate import generate  # noqa: E402
from nanomoe_fn.model.params import init_model_params  # noqa: E402
from nanomoe_fn.model.sampling import SamplingConfig  # noqa: E402
from nanomoe_fn.moe.params import SharedMLP  # noqa: E402
from nanomoe_fn.tree import register_dataclass  # noqa: E402
from tests.helpers import assert_close_to_ref, reference_layer  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXPERT_BACKENDS = ["loop", "bmm"] + (["triton"] if INTERPRET else [])
MLA_BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])
TINY = preset("tiny")
P = init_moe_params(TINY, generator=torch.Generator().manual_seed(0))
H = TINY.hidden


def _x(T: int, seed: int = 1, hidden: int = H) -> torch.Tensor:
    return torch.randn(T, hidden, generator=torch.Generator().manual_seed(seed))


# ---- the MoE layer: zero and one token, strided inputs, extreme routing configs == the float64 reference ------

@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
@pytest.mark.parametrize("capacity", [None, 3])
def test_moe_layer_zero_and_one_token_equal_the_reference(backend, capacity):
    for T in (0, 1):
        x = _x(T)
        ref, _ = reference_layer(P, x, TINY)
        out = moe_layer(P, x, TINY, backend=backend, capacity=capacity)
        assert out.shape == (T, H) and out.dtype == torch.float32
        assert_close_to_ref(out, ref, torch.float32, f"T={T} {backend}")
    for plan in (two_batch_overlap(MOE_PROGRAM), sequential(MOE_PROGRAM)):  # a micro-batch of 0 tokens
        for T in (0, 1):
            ref, _ = reference_layer(P, _x(T), TINY)
            assert_close_to_ref(run_moe(plan, P, _x(T), TINY, backend=backend), ref, torch.float32, plan.name)


def test_route_of_zero_tokens():
    r = route(P.gate, _x(0), TINY)
    assert r.topk_ids.shape == (0, TINY.top_k) and r.topk_ids.dtype == torch.int32
    assert r.topk_weights.shape == (0, TINY.top_k) and r.topk_weights.dtype == torch.float32


@pytest.mark.parametrize("backend", EXPERT_BACKENDS)
def test_expert_ffn_on_empty_batches_of_every_layout(backend):
    counts = torch.zeros(TINY.num_experts, dtype=torch.int64)
    empty = ExpertBatch(_x(0), counts)
    gathered = ExpertBatch(_x(3), counts, "gathered", torch.empty(0, dtype=torch.int64))  # rows nobody reads
    for batch in (empty, to_masked(empty, 2), gathered):
        y = expert_ffn(P.experts, batch, backend)
        assert y.layout == ("masked" if batch.layout == "masked" else "contiguous")
        assert y.num_rows == (TINY.num_experts if batch.layout == "masked" else 0) and y.x.shape[-1] == H


@settings(max_examples=8, deadline=None)
@given(layout=st.sampled_from(["transposed", "row_step", "col_step"]), T=st.integers(2, 6),
       backend=st.sampled_from(EXPERT_BACKENDS))
def test_strided_x_equals_the_reference(layout, T, backend):
    base = _x(2 * T, seed=T, hidden=2 * H)
    x = {"transposed": base[:T, :H].t().contiguous().t(), "row_step": base[::2, :H], "col_step": base[:T, ::2]}[layout]
    assert not x.is_contiguous()
    ref, _ = reference_layer(P, x, TINY)
    assert_close_to_ref(moe_layer(P, x, TINY, backend=backend), ref, torch.float32, layout)


@pytest.mark.parametrize("changes", [dict(top_k=8, n_group=1, topk_group=1), dict(n_group=8, topk_group=8, top_k=2),
                                     dict(n_group=8, topk_group=1, top_k=1),
                                     dict(n_group=8, topk_group=3, top_k=3, group_score="max"),
                                     dict(num_experts=1, top_k=1, n_group=1, topk_group=1)],
                         ids=["top_k=E", "n_group=E all kept", "n_group=E one kept", "n_group=E max", "one expert"])
def test_extreme_routing_configs_equal_the_reference(changes):
    cfg = TINY.with_(**changes)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(2))
    ref, _ = reference_layer(params, _x(5), cfg)
    for backend in EXPERT_BACKENDS:
        assert_close_to_ref(moe_layer(params, _x(5), cfg, backend=backend), ref, torch.float32, backend)


# ---- MLA: no tokens, stale cache rows, unallocated pages ------------------------------------------------------

MLA_CFG = MLAConfig.preset("tiny")
MLA_P = init_mla_params(MLA_CFG, torch.float32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", MLA_BACKENDS)
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_mla_with_no_tokens_returns_empty_and_leaves_the_cache(backend, path):
    cache = init_contiguous_cache(2, 8, MLA_CFG.cache_dim, torch.float32)
    x = torch.randn(2, 3, MLA_CFG.hidden_size)
    out, new = mla(MLA_P, x[:, :0], torch.zeros(2, 0, dtype=torch.int64), cache, MLA_CFG, backend, path=path)
    assert out.shape == (2, 0, MLA_CFG.hidden_size) and new.lens.tolist() == [0, 0] and not new.kv.any()
    none = ContiguousCache(torch.zeros(0, 8, MLA_CFG.cache_dim), torch.zeros(0, dtype=torch.int32))
    for S in (1, 3):
        out, new = mla(MLA_P, x[:0, :S], torch.zeros(0, S, dtype=torch.int64), none, MLA_CFG, backend, path=path)
        assert out.shape == (0, S, MLA_CFG.hidden_size) and new.lens.shape == (0,)


def _stale_cache(kind: str) -> ContiguousCache | PagedCache:
    """A cache whose unwritten rows hold NaN (torch.empty, a recycled page); paged: sequence 0 owns one page,
    sequence 1 two, and their other block-table entries are unallocated (ids out of range)."""
    if kind == "contiguous":
        c = init_contiguous_cache(2, 16, MLA_CFG.cache_dim, torch.float32)
        return ContiguousCache(torch.full_like(c.kv, float("nan")), c.lens)
    c = init_paged_cache(2, 16, MLA_CFG.cache_dim, torch.float32, page_size=4, num_pages=8)
    table = c.block_table.clone()
    table[0, 1:], table[1, 2:] = 99, -1
    return PagedCache(torch.full_like(c.kv, float("nan")), table, c.lens)


@pytest.mark.parametrize("backend", MLA_BACKENDS)
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_stale_rows_and_unallocated_pages_never_reach_the_output(backend, kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, MLA_CFG.hidden_size, generator=g)
    want, _ = ref_mla.mla(MLA_P, x, [2, 6], MLA_CFG)
    pos = torch.full((2, 5), -1, dtype=torch.int64)
    pos[0, :1], pos[1] = 0, torch.arange(5)                   # prefill 1 and 5 tokens
    out, cache = mla(MLA_P, x[:, :5], pos, _stale_cache(kind), MLA_CFG, backend)
    valid = pos >= 0
    assert_close_to_ref(out[valid], want[:, :5][valid], torch.float32, "prefill")
    step = torch.tensor([[1], [5]])                           # one decode step each
    if backend == "torch":  # torch decode reads every row (weight 0 past a length): they must be finite
        cache = dataclasses.replace(cache, kv=cache.kv.nan_to_num(1e4))
    out, cache = mla(MLA_P, x[torch.arange(2), step[:, 0]][:, None], step, cache, MLA_CFG, backend)
    assert_close_to_ref(out[:, 0], torch.stack([want[0, 1], want[1, 5]]), torch.float32, "decode")
    assert cache.lens.tolist() == [2, 6]


# ---- the decoder layer: two-batch overlap on a sequence with fewer than two tokens; arguments -----------------

DEC_MLA = MLAConfig(hidden_size=32, num_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8)
DEC_MOE = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, n_shared_experts=1)


def _dec_params(dtype: torch.dtype = torch.float64) -> DecoderParams:
    g = torch.Generator().manual_seed(4)
    norm = 1 + 0.1 * torch.randn(32, generator=g, dtype=dtype)
    return DecoderParams(norm, init_mla_params(DEC_MLA, dtype, generator=g), norm,
                         moe=init_moe_params(DEC_MOE, dtype, generator=g))


@pytest.mark.parametrize("S, n", [(2, 1), (2, 0), (3, 0), (3, 1), (4, 2)])
def test_two_batch_overlap_of_one_short_sequence_equals_sequential(S, n):
    params, ctx = _dec_params(), decoder_context(DEC_MLA, moe_cfg=DEC_MOE)
    x = torch.randn(1, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(S + n))
    pos = torch.full((1, S), -1, dtype=torch.int64)
    pos[0, :n] = torch.arange(n)
    caches = [init_contiguous_cache(1, 8, DEC_MLA.cache_dim, torch.float64) for _ in range(2)]
    want, c0 = decoder_layer(params, x, pos, caches[0], ctx)
    got, c1 = decoder_layer(params, x, pos, caches[1], ctx, two_batch_overlap(DECODER_MOE_PROGRAM))
    torch.testing.assert_close(got, want)
    assert c1.lens.tolist() == c0.lens.tolist() == [n]
    torch.testing.assert_close(c1.kv, c0.kv)


def test_decoder_layer_with_no_tokens():
    params, ctx = _dec_params(), decoder_context(DEC_MLA, moe_cfg=DEC_MOE)
    for plan in (None, two_batch_overlap(DECODER_MOE_PROGRAM)):
        x, pos = torch.zeros(2, 0, 32, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.int64)
        out, cache = decoder_layer(params, x, pos, init_contiguous_cache(2, 8, DEC_MLA.cache_dim, torch.float64), ctx,
                                   plan)
        assert out.shape == (2, 0, 32) and cache.lens.tolist() == [0, 0]


# ---- the model: zero sequences, zero tokens, logits_at ------------------------------------------------------------

MODEL_CFG = model_preset("tiny")
MODEL = init_model_params(MODEL_CFG)


def test_model_forward_with_no_sequences_or_no_tokens():
    ctx = ModelContext(MODEL_CFG)
    none = tuple(ContiguousCache(torch.zeros(0, 8, MODEL_CFG.mla.cache_dim), torch.zeros(0, dtype=torch.int32))
                 for _ in range(MODEL_CFG.num_layers))
    for S in (1, 3):
        logits, _ = model_forward(MODEL, torch.zeros(0, S, dtype=torch.int64), torch.zeros(0, S, dtype=torch.int64),
                                  none, ctx, logits_at=torch.zeros(0, dtype=torch.int64))
        assert logits.shape == (0, MODEL_CFG.vocab_size)
    logits, _ = model_forward(MODEL, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.int64),
                              init_caches(MODEL_CFG, 2, 8, torch.float32), ctx)
    assert logits.shape == (2, 0, MODEL_CFG.vocab_size)
    assert generate(MODEL, [], ctx, SamplingConfig(max_new_tokens=2)) == []


def test_logits_at_must_pick_a_valid_row_of_each_sequence():
    ctx = ModelContext(MODEL_CFG)
    tokens, pos = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([[0, 1, 2], [0, 1, -1]])
    full, _ = model_forward(MODEL, tokens, pos, init_caches(MODEL_CFG, 2, 8, torch.float32), ctx)
    at, _ = model_forward(MODEL, tokens, pos, init_caches(MODEL_CFG, 2, 8, torch.float32), ctx,
                          logits_at=torch.tensor([2, 1]))
    torch.testing.assert_close(at, torch.stack([full[0, 2], full[1, 1]]))
    for bad, match in ((torch.tensor([2]), r"logits_at must be \[B=2\] int32/int64"),       # broadcast before
                       (torch.tensor([2.0, 1.0]), r"logits_at must be \[B=2\] int32/int64"),
                       (torch.tensor([3, 0]), r"logits_at must pick a valid row"),          # IndexError before
                       (torch.tensor([-1, 0]), r"logits_at must pick a valid row"),         # the last row before
                       (torch.tensor([0, 2]), r"logits_at must pick a valid row")):         # a padding row
        with pytest.raises(ValueError, match=match):
            model_forward(MODEL, tokens, pos, init_caches(MODEL_CFG, 2, 8, torch.float32), ctx, logits_at=bad)


# ---- pytrees of sparse records -------------------------------------------------------------------------------

def test_records_with_absent_optional_fields_round_trip_as_pytrees():
    w = torch.rand(3, 2)
    handle = Handle(None, w)                      # a token-row comm's handle: no send_order
    leaves, spec = pytree.tree_flatten(handle)
    back = pytree.tree_unflatten(leaves, spec)
    assert back.send_order is None and back.topk_weights is w and len(leaves) == 1
    dense = DecoderParams(torch.ones(4), init_mla_params(MLA_CFG, torch.float32), torch.ones(4),
                          dense=SharedMLP(torch.ones(6, 4), torch.ones(4, 3)))
    for params in (dense, _dec_params()):         # the absent FFN is no None leaf: tree_map sees tensors only
        clone = pytree.tree_map(lambda t: t.clone(), params)
        assert (clone.moe is None) == (params.moe is None) and (clone.dense is None) == (params.dense is None)
        assert all(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(params))


def test_register_dataclass_refuses_unknown_field_names():
    @dataclasses.dataclass(frozen=True)
    class Rec:
        a: torch.Tensor

    with pytest.raises(ValueError, match=r"register_dataclass\(Rec\): static and optional must name distinct fields"):
        register_dataclass(Rec, static=("b",))


# ---- bad arguments: refused by name (each failed deep inside torch, or passed silently, before) ----------------

def _mla_args(**changes):
    args = dict(attn_params=MLA_P, x=torch.randn(1, 2, MLA_CFG.hidden_size), positions=torch.tensor([[0, 1]]),
                cache=init_contiguous_cache(1, 4, MLA_CFG.cache_dim, torch.float32), cfg=MLA_CFG)
    return {**args, **changes}


def _dense_layer(w13: torch.Tensor | None = None) -> DecoderParams:
    dense = SharedMLP(torch.randn(48, 32) if w13 is None else w13, torch.randn(32, 24))
    return DecoderParams(torch.ones(32), init_mla_params(DEC_MLA, torch.float32), torch.ones(32), dense=dense)


def _decode(params, x, ctx=None):
    ctx = ctx if ctx is not None else decoder_context(DEC_MLA)
    return decoder_layer(params, x, torch.arange(x.shape[1])[None].expand(x.shape[0], -1),
                         init_contiguous_cache(x.shape[0], 8, DEC_MLA.cache_dim, x.dtype), ctx)


X32 = torch.randn(1, 3, 32)
BAD = {
    "capacity float": (lambda: moe_layer(P, _x(4), TINY, capacity=2.5), TypeError, r"moe_layer\.capacity must be an"),
    "capacity str": (lambda: moe_layer(P, _x(4), TINY, capacity="4"), TypeError, r"moe_layer\.capacity must be an"),
    "capacity bool": (lambda: moe_layer(P, _x(4), TINY, capacity=True), TypeError, r"capacity must be an int, got b"),
    "backend not a str": (lambda: moe_layer(P, _x(4), TINY, backend=["bmm"]), TypeError, r"expert backend must be a"),
    "comm not a comm": (lambda: moe_layer(P, _x(4), TINY, comm="local"), TypeError, r"comm must be a comm"),
    "no comm in the list": (lambda: run_moe(sequential(MOE_PROGRAM), P, _x(4), TINY, []), TypeError, r"comm must"),
    "placement not a Placement": (lambda: moe_layer(P, _x(4), TINY, placement="identity"), TypeError,
                                  r"placement must be a Placement, got str"),
    "route cfg a dict": (lambda: route(P.gate, _x(4), {"hidden": H}), TypeError, r"route takes \(GateParams, x, MoE"),
    "route gate a tensor": (lambda: route(P.gate.weight, _x(4), TINY), TypeError, r"route takes \(GateParams"),
    "route bias [3]": (lambda: route(GateParams(P.gate.weight, torch.zeros(3)), _x(4), TINY), ValueError,
                       r"gate_params\.bias must be \[8\], got \(3,\)"),
    "route bias [1, 8]": (lambda: route(GateParams(P.gate.weight, torch.zeros(1, 8)), _x(4), TINY), ValueError,
                          r"gate_params\.bias must be \[8\]"),
    "shared_mlp x float64": (lambda: shared_mlp(P.shared, _x(4).double()), TypeError,
                             r"x must have the dtype of params\.w13 \(torch\.float32"),
    "ExpertBatch x a list": (lambda: ExpertBatch([[0.0]], torch.zeros(1, dtype=torch.int64)), TypeError,
                             r"ExpertBatch\.x must be a torch\.Tensor, got list"),
    "init_moe_params int dtype": (lambda: init_moe_params(TINY, torch.int32), TypeError, r"init_moe_params dtype"),
    "init_moe_params cfg a dict": (lambda: init_moe_params({}), TypeError, r"cfg must be a MoEConfig, got dict"),
    "init_mla_params int dtype": (lambda: init_mla_params(MLA_CFG, torch.int64), TypeError, r"init_mla_params dtype"),
    "cache capacity float": (lambda: init_contiguous_cache(2, 4.5, 8, torch.float32), TypeError,
                             r"init_contiguous_cache\.capacity must be an int"),
    "cache int dtype": (lambda: init_contiguous_cache(2, 4, 8, torch.int32), TypeError,
                        r"init_contiguous_cache\.dtype must be a floating"),
    "page_size float": (lambda: init_paged_cache(2, 4, 8, torch.float32, page_size=2.5), TypeError,
                        r"init_paged_cache\.page_size must be an int"),
    "mla positions a list": (lambda: mla(**_mla_args(positions=[[0, 1]])), TypeError,
                             r"positions must be a torch\.Tensor, got list"),
    "mla cfg a dict": (lambda: mla(**_mla_args(cfg={})), TypeError, r"cfg must be an MLAConfig, got dict"),
    "mla triton float64 weights": (lambda: mla(**_mla_args(attn_params=init_mla_params(MLA_CFG, torch.float64)),
                                               backend="triton"), TypeError,
                                   r"MLA backend 'triton' runs float16/bfloat16/float32 on the prefill path, got "
                                   r"attn_params torch\.float64"),
    "decoder x float64, float32 dense": (lambda: _decode(_dense_layer(), X32.double()), TypeError,
                                         r"x must have the dtype of params\.dense\.w13"),
    "decoder x float64, float32 experts": (lambda: _decode(_dec_params(torch.float32), X32.double(),
                                                           decoder_context(DEC_MLA, moe_cfg=DEC_MOE)),
                                           TypeError, r"x must have the experts' dtype torch\.float32"),
    "decoder x of another hidden": (lambda: _decode(_dense_layer(), X32[..., :16]), ValueError,
                                    r"x must be a floating \[B, S, H=32\] tensor, got \(1, 3, 16\)"),
    "decoder dense w13 odd": (lambda: _decode(_dense_layer(torch.randn(47, 32)), X32), ValueError,
                              r"params\.dense\.w13 must be \[2\*intermediate, hidden=32\]"),
    "decoder norm of another size": (lambda: _decode(dataclasses.replace(_dense_layer(), ffn_norm=torch.ones(5)), X32),
                                     ValueError, r"params\.ffn_norm must be a \[32\] tensor, got \(5,\)"),
    "decoder ctx a str": (lambda: decoder_layer(_dense_layer(), X32, torch.zeros(1, 3, dtype=torch.int64),
                                                init_contiguous_cache(1, 8, DEC_MLA.cache_dim, torch.float32), "ctx"),
                          TypeError, r"ctx must be a DecoderContext"),
    "decoder params a dict": (lambda: decoder_layer({}, X32, None, None, decoder_context(DEC_MLA)), TypeError,
                              r"params must be a DecoderParams, got dict"),
    "model tokens a list": (lambda: model_forward(MODEL, [[1, 2]], torch.tensor([[0, 1]]),
                                                  init_caches(MODEL_CFG, 1, 4, torch.float32), ModelContext(MODEL_CFG)),
                            TypeError, r"tokens must be a torch\.Tensor, got list"),
    "generate prompts flat": (lambda: generate(MODEL, [2, 3], ModelContext(MODEL_CFG)), TypeError,
                              r"prompts\[0\] must be a list of token ids, got int"),
    "generate sampling a dict": (lambda: generate(MODEL, [[2]], ModelContext(MODEL_CFG), {"max_new_tokens": 2}),
                                 TypeError, r"sampling must be a SamplingConfig, got dict"),
    "max_new_tokens=0": (lambda: SamplingConfig(max_new_tokens=0), ValueError,
                         r"SamplingConfig\.max_new_tokens must be a positive int, got 0"),
    "capacity 0": (lambda: moe_layer(P, _x(4), TINY, capacity=0), ValueError,
                   r"moe_layer\.capacity must be a positive int, got 0"),
    "decoder capacity 0": (lambda: _decode(_dec_params(torch.float32), X32,
                                           decoder_context(DEC_MLA, moe_cfg=DEC_MOE, capacity=0)), ValueError,
                           r"ctx\.moe\.capacity must be a positive int, got 0"),
    "cast_params int dtype": (lambda: cast_params(P, torch.int8), TypeError, r"cast_params dtype must be one of"),
    "expert_ffn backend not a str": (lambda: expert_ffn(P.experts, ExpertBatch(_x(2), torch.tensor([2] + [0] * 7)),
                                                        backend=1), TypeError, r"expert backend must be one of"),
    "mla backend not a str": (lambda: mla(**_mla_args(), backend=None), TypeError, r"MLA backend must be a str"),
    "mla triton float64 cache on the decode path": (
        lambda: mla(**_mla_args(attn_params=init_mla_params(MLA_CFG, torch.float64), x=torch.randn(1, 1, 64).double(),
                                positions=torch.tensor([[0]]),
                                cache=init_contiguous_cache(1, 4, MLA_CFG.cache_dim, torch.float64)),
                    backend="triton"), TypeError,
        r"MLA backend 'triton' runs float16/bfloat16/float32 on the decode path, got cache\.kv torch\.float64"),
    "cache batch 0": (lambda: init_contiguous_cache(0, 4, 8, torch.float32), ValueError,
                      r"init_contiguous_cache\.batch must be a positive int, got 0"),
    "model ctx a dict": (lambda: model_forward(MODEL, torch.tensor([[1]]), torch.tensor([[0]]), (), {}), TypeError,
                         r"ctx must be a ModelContext, got dict"),
    "generate prompts a str": (lambda: generate(MODEL, "hi", ModelContext(MODEL_CFG)), TypeError,
                               r"prompts must be a list of token-id lists, got str"),
    "shared_mlp params a tensor": (lambda: shared_mlp(P.shared.w13, _x(4)), TypeError,
                                   r"params must be a SharedMLP, got Tensor"),
    "decoder x a list": (lambda: decoder_layer(_dense_layer(), [[0.0]], torch.zeros(1, 1, dtype=torch.int64),
                                               init_contiguous_cache(1, 8, DEC_MLA.cache_dim, torch.float32),
                                               decoder_context(DEC_MLA)),
                         TypeError, r"x must be a torch\.Tensor, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_by_name(case):
    call, exc, match = BAD[case]
    with pytest.raises(exc, match=match) as info:
        call()
    assert type(info.value) is exc and "\n" not in str(info.value)


def test_checked_calls_still_accept_what_they_should():
    # a placement object, a numpy int capacity, and a dense decoder layer of the right dtype all pass
    import numpy as np

    out = moe_layer(P, _x(4), TINY, placement=Placement.identity(TINY.num_experts, 1), capacity=np.int64(4))
    ref, _ = reference_layer(P, _x(4), TINY)
    assert_close_to_ref(out, ref, torch.float32)
    assert _decode(_dense_layer(), X32)[0].shape == X32.shape
