"""dispatch/combine, expert_ffn backends and the whole layer vs the float64 reference (one rank)."""

import os

import nanomoe_reference as reference
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from nanomoe_fn import (
    EXPERT_BACKENDS,
    ExpertBatch,
    LocalComm,
    Placement,
    Routing,
    combine,
    dispatch,
    expert_ffn,
    expert_tensors,
    init_moe_params,
    moe_layer,
    preset,
    route,
)
from nanomoe_fn.batch import to_contiguous, to_masked
from tests.helpers import DTYPES, MIN_MARGIN, assert_close_to_ref, moe_configs, reference_layer

# every backend that can run on this machine (triton through its interpreter on the CPU)
BACKENDS = sorted(b for b, be in EXPERT_BACKENDS.items() if be.supports(preset("tiny"), torch.device("cpu"))[0])


def runnable(backend: str, dtype: torch.dtype) -> bool:
    """The Triton interpreter computes bfloat16 wrongly (a known limitation): bf16 Triton is a GPU test."""
    return not (backend == "triton" and dtype == torch.bfloat16)


def test_cpu_backends_include_triton():
    # the conftest turns the Triton interpreter on wherever there is no GPU
    expected = {"loop", "bmm"} | ({"triton"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    assert expected <= set(BACKENDS), BACKENDS


def random_routing(T: int, E: int, k: int, gen: torch.Generator, hot: bool = False) -> Routing:
    """Distinct experts per token; with `hot`, every token's first choice is expert 0."""
    def pick() -> torch.Tensor:
        if hot:
            return torch.cat([torch.zeros(1, dtype=torch.int64), torch.randperm(E - 1, generator=gen)[:k - 1] + 1])
        return torch.randperm(E, generator=gen)[:k]
    ids = torch.stack([pick() for _ in range(T)]) if T else torch.empty(0, k)
    return Routing(ids.to(torch.int32).reshape(T, k), torch.rand(T, k, generator=gen))


@given(T=st.integers(0, 64), E=st.integers(1, 64), k=st.integers(1, 8), H=st.integers(1, 96),
       seed=st.integers(0, 2**31 - 1), one_hot=st.booleans())
def test_dispatch_combine_roundtrip(T, E, k, H, seed, one_hot):
    k = min(k, E)
    gen = torch.Generator().manual_seed(seed)
    routing = random_routing(T, E, k, gen, hot=one_hot)
    x = torch.randn(T, H, generator=gen)
    comm, placement = LocalComm(), Placement.identity(E, 1)
    batch, handle = dispatch(x, routing, comm, placement)
    # every expert's rows are exactly the tokens routed to it
    assert batch.layout == "contiguous" and int(batch.counts.sum()) == T * k
    start = 0
    for e, c in enumerate(batch.counts.tolist()):
        tokens = (routing.topk_ids == e).any(1).nonzero().flatten()
        assert c == len(tokens)
        assert torch.equal(batch.x[start:start + c], x[tokens])
        start += c
    # an identity "expert" makes combine the weighted sum of copies of x
    out = combine(batch, handle, comm)
    assert_close_to_ref(out, x.double() * routing.topk_weights.double().sum(1, keepdim=True), torch.float32)


@given(cfg=moe_configs(), M=st.integers(0, 48), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       masked=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_expert_ffn_matches_reference(cfg, M, dtype, backend, masked, seed):
    assume(runnable(backend, dtype))
    gen = torch.Generator().manual_seed(seed)
    params = init_moe_params(cfg, dtype, generator=gen)
    E = cfg.num_experts
    counts = torch.bincount(torch.randint(0, E, (M,), generator=gen), minlength=E)
    rows = torch.randn(M, cfg.hidden, generator=gen).to(dtype)
    batch = ExpertBatch(rows, counts)
    if masked:
        y = to_contiguous(expert_ffn(params.experts, to_masked(batch, max(1, int(counts.max()))), backend),
                          batch)
    else:
        y = expert_ffn(params.experts, batch, backend)
    assert y.counts is batch.counts and y.x.dtype == dtype
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    ws = expert_tensors(params.experts)
    ref = torch.zeros(M, cfg.hidden, dtype=torch.float64)
    for i in range(M):
        e = int(expert_of_row[i])
        f = reference.swiglu if cfg.expert_type == "swiglu" else reference.linear
        ref[i] = f(rows[i:i + 1], *(w[e] for w in ws))[0]
    assert_close_to_ref(y.x, ref, dtype, f"expert_ffn[{backend}]")


@given(cfg=moe_configs(), T=st.integers(0, 48), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       capacity=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_moe_layer_matches_reference(cfg, T, dtype, backend, capacity, seed):
    assume(runnable(backend, dtype))
    gen = torch.Generator().manual_seed(seed)
    params = init_moe_params(cfg, dtype, generator=gen)
    x = torch.randn(T, cfg.hidden, generator=gen).to(dtype)
    ref, margin = reference_layer(params, x, cfg)
    assume(margin > MIN_MARGIN)
    out = moe_layer(params, x, cfg, backend=backend, capacity=T if capacity and T else None)
    assert out.dtype == dtype
    assert_close_to_ref(out, ref, dtype, f"moe_layer[{backend}]")


def test_capacity_overflow_is_an_error_not_a_drop():
    cfg = preset("tiny").with_(n_group=1, topk_group=1)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, cfg.hidden)
    with pytest.raises(ValueError, match="capacity"):
        moe_layer(params, x, cfg, capacity=2)


def test_layer_errors_name_the_argument():
    cfg = preset("tiny")
    params = init_moe_params(cfg)
    x = torch.randn(4, cfg.hidden)
    routing = route(params.gate, x, cfg)
    bad = Routing(routing.topk_ids.clone(), routing.topk_weights)
    bad.topk_ids[1, 0] = cfg.num_experts
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 8\)"):
        dispatch(x, bad, LocalComm(), Placement.identity(cfg.num_experts, 1))
    with pytest.raises(ValueError, match="routing must be"):
        dispatch(x[:3], routing, LocalComm(), Placement.identity(cfg.num_experts, 1))
    with pytest.raises(ValueError, match="expert backend"):
        moe_layer(params, x, cfg, backend="cutlass")
    with pytest.raises(TypeError, match="batch.x must have dtype"):
        expert_ffn(params.experts, ExpertBatch(x.half(), torch.zeros(cfg.num_experts, dtype=torch.int64)))
    with pytest.raises(ValueError, match="world_size .* must divide"):
        Placement.identity(cfg.num_experts, 3)
    with pytest.raises(ValueError, match="shard_moe_params"):
        moe_layer(params, x, cfg, placement=Placement.identity(cfg.num_experts, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens_and_one_hot_expert(backend):
    cfg = preset("tiny").with_(n_group=1, topk_group=1, correction_bias=False, score_func="softmax")
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(3))
    empty = moe_layer(params, torch.empty(0, cfg.hidden), cfg, backend=backend)
    assert empty.shape == (0, cfg.hidden)
    # a router that sends every token to experts 5 then 2
    w = torch.zeros_like(params.gate.weight)
    w[5, 0], w[2, 0] = 10.0, 5.0
    hot = type(params)(type(params.gate)(w, None), params.experts, params.shared)
    x = torch.randn(16, cfg.hidden).abs() + 0.1
    out = moe_layer(hot, x, cfg, backend=backend)
    ref, _ = reference_layer(hot, x, cfg)
    assert_close_to_ref(out, ref, torch.float32)
    assert torch.equal(route(hot.gate, x, cfg).topk_ids[:, 0], torch.full((16,), 5, dtype=torch.int32))
