"""The `deepep` comm on the CPU: why it cannot run here, argument checks, and its layout arithmetic.

Dimension legend: T tokens, k experts per token, H hidden, W ranks, P_local slots per rank, R received
tokens, M (received token, local expert) pairs.

DeepEP itself needs GPUs (tests/gpu/test_deepep_gpu.py runs it); here the pure helpers that turn
DeepEP's per-token rows into our per-expert batch and back are checked against plain Python loops,
and a whole W-rank normal-mode exchange is replayed on the CPU following DeepEP's documented
semantics (rows sent once per destination rank, recv_topk_idx local or -1, combine = plain sum).
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from nanomoe_fn.comm.deepep import DeepEPComm
from nanomoe_fn.comm.deepep_layout import (
    LL_HIDDEN_SIZES,
    check_options,
    environment_reason,
    expert_order,
    gather_expert_rows,
    pad_empty,
    token_weighted_sum,
    world_reason,
)

GOOD = dict(hidden=7168, num_slots=256, max_tokens=128, top_k=8)


def _expected_reason() -> str:
    if importlib.util.find_spec("deep_ep") is None:
        return "deep_ep is not importable"
    return "CUDA" if not torch.cuda.is_available() else "torch.distributed is not initialised"


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_supports_and_constructor_give_the_reason(mode):
    ok, reason = DeepEPComm.supports(mode=mode, **GOOD)
    assert not ok and _expected_reason() in reason, reason
    if "deep_ep" in reason:
        assert "v1.2.1" in reason and "PYTHONPATH" in reason  # says how to get it
    with pytest.raises(ValueError, match="unavailable") as err:
        DeepEPComm(mode, **GOOD)
    assert reason in str(err.value)
    assert DeepEPComm.supports()[0] is False  # every option is optional


BAD = [
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(dtype=torch.float16), ValueError, "dtype must be torch.bfloat16"),
    (dict(dtype="bfloat16"), TypeError, "dtype must be a torch.dtype"),
    (dict(hidden=0), ValueError, "hidden must be >= 1"),
    (dict(hidden=7.0), TypeError, "hidden must be an int"),
    (dict(hidden=100), ValueError, "hidden must be a multiple of 8"),
    (dict(mode="low_latency", hidden=1024), ValueError, "low-latency kernels are compiled for"),
    (dict(mode="low_latency", top_k=12), ValueError, "low-latency limit of 11"),
    (dict(mode="normal", top_k=33, num_slots=64), ValueError, "normal-mode limit of 32"),
    (dict(top_k=9, num_slots=8), ValueError, "top_k (9) must be <= num_slots (8)"),
    (dict(max_tokens=-1), ValueError, "max_tokens must be >= 1"),
    (dict(num_slots=True), TypeError, "num_slots must be an int"),
    (dict(timeout_s=0), ValueError, "timeout_s must be a number > 0"),
]


@pytest.mark.parametrize("bad,exc,message", BAD)
def test_bad_options_are_named(bad, exc, message):
    opts = {**GOOD, **bad}
    mode = opts.pop("mode", "normal")
    ok, reason = DeepEPComm.supports(mode=mode, **opts)
    assert not ok and message in reason, reason
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        DeepEPComm(mode, **opts)


def test_unknown_option_and_good_options():
    ok, reason = DeepEPComm.supports(hidden=7168, capacity=4)
    assert not ok and "unknown option(s) ['capacity']" in reason
    for hidden in LL_HIDDEN_SIZES:
        check_options("low_latency", hidden, 256, 128, 8, torch.bfloat16, 60.0)  # no error
    check_options("normal", 7000, 8, 1, 8, torch.bfloat16, 1.0)  # any multiple of 8 in normal mode


def test_environment_reasons_in_order():
    assert "deep_ep is not importable (ImportError: x)" in environment_reason("ImportError: x", True, True, "nccl")
    assert "CUDA" in environment_reason(None, False, True, "nccl")
    assert "init_process_group" in environment_reason(None, True, False, None)
    assert "NCCL" in environment_reason(None, True, True, "gloo")
    assert environment_reason(None, True, True, "cpu:gloo,cuda:nccl") == ""
    assert environment_reason(None, True, True, "nccl") == ""


def test_world_reasons():
    assert "(2, 4, 8) ranks" in world_reason("normal", 3)
    assert "at least 2 ranks" in world_reason("low_latency", 1)
    assert "divisible by the world size" in world_reason("low_latency", 4, num_slots=18)
    assert "at most 128 slots per rank" in world_reason("normal", 2, num_slots=288)
    assert world_reason("low_latency", 2, num_slots=288, max_tokens=128) == ""  # 144 local slots are fine there
    assert "multiple of 4" in world_reason("low_latency", 2, num_slots=16, max_tokens=3)
    assert world_reason("normal", 2, num_slots=256, max_tokens=3) == ""


def test_pad_empty():
    x, idx, w = torch.zeros(0, 16), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3)
    xp, ip, wp = pad_empty(x, idx, w)
    assert xp.shape == (1, 16) and not xp.any() and ip.tolist() == [[-1, -1, -1]] and wp.tolist() == [[0.0] * 3]
    x1 = torch.randn(2, 16)
    assert pad_empty(x1, idx[:0], w[:0])[0] is x1


def _draw_recv(rng: random.Random, R: int, k: int, P_local: int, W: int) -> torch.Tensor:
    """recv_topk_idx [R, k] as DeepEP delivers it: distinct slots per token over W * P_local, local ids of
    this rank's slots (rank 0's here), -1 for others; each received token has at least one local id."""
    rows = []
    for _ in range(R):
        while True:
            slots = rng.sample(range(W * P_local), k)
            if any(s < P_local for s in slots):
                break
        rows.append([s if s < P_local else -1 for s in slots])
    return torch.tensor(rows, dtype=torch.int64).view(R, k)


@pytest.mark.parametrize("seed", range(8))
def test_expert_order_and_weighted_sum_match_loops(seed):
    rng = random.Random(seed)
    W, P_local, k, H = rng.choice([2, 4]), rng.choice([1, 3, 8]), rng.randint(1, 4), rng.choice([8, 24])
    k = min(k, W * P_local)
    R = 0 if seed == 0 else rng.randint(1, 40)
    dtype = torch.bfloat16 if seed % 2 else torch.float32
    idx = _draw_recv(rng, R, k, P_local, W)
    recv_x = torch.randn(R, H, generator=torch.Generator().manual_seed(seed)).to(dtype)
    weights = torch.rand(R, k, generator=torch.Generator().manual_seed(seed + 1)) * (idx >= 0)
    known_m = int((idx >= 0).sum()) if seed % 3 else None  # the host count DeepEP gives, or counted here
    order, counts, pair_rows = expert_order(idx, P_local, known_m)
    rows = gather_expert_rows(recv_x, order, k)
    # loops: rows grouped by expert, pairs in (token, j) order within an expert
    want_rows, want_pairs = [], []
    for e in range(P_local):
        for r in range(R):
            for j in range(k):
                if idx[r, j] == e:
                    want_rows.append(recv_x[r])
                    want_pairs.append(r * k + j)
    M = len(want_pairs)
    assert counts.dtype == torch.int64 and counts.tolist() == [int((idx == e).sum()) for e in range(P_local)]
    assert order.tolist() == want_pairs and rows.shape == (M, H)
    assert torch.equal(rows, torch.stack(want_rows) if M else recv_x.new_empty(0, H))
    for p in range(R * k):
        assert int(pair_rows[p]) == (want_pairs.index(p) if p in want_pairs else M)
    # expert outputs y [M, H]; the inverse: per token, weighted sum of its local rows
    y = (rows.float() * 1.5 + torch.arange(M).unsqueeze(1)).to(dtype)
    for chunk in (1 << 30, 4 * k * H * 3):  # one chunk, and chunks of 3 tokens
        out = token_weighted_sum(y, pair_rows, weights, chunk_bytes=chunk)
        want = torch.zeros(R, H, dtype=torch.float64)
        for r in range(R):
            for j in range(k):
                if idx[r, j] >= 0:
                    want[r] += float(weights[r, j]) * y[int(pair_rows[r * k + j])].double()
        assert out.dtype == dtype and out.shape == (R, H)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(out.double(), want, rtol=tol, atol=tol), (seed, chunk)


def test_weighted_sum_isolates_non_finite_rows():
    idx = torch.tensor([[0, -1], [1, -1], [0, 1]])
    order, counts, pair_rows = expert_order(idx, 2)
    y = torch.ones(int(counts.sum()), 4)
    y[pair_rows[2]] = float("nan")  # token 1's row of expert 1
    out = token_weighted_sum(y, pair_rows, torch.ones(3, 2))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all() and torch.equal(out[0], torch.ones(4))


@pytest.mark.parametrize("seed", range(4))
def test_simulated_normal_exchange_gives_the_weighted_sum(seed):
    """W ranks, DeepEP's normal-mode semantics written out: the conversion + plain-sum combine must equal
    sum_j w[t, j] * expert_{slot[t, j]}(x[t]) for every token of every rank."""
    rng = random.Random(100 + seed)
    W, P_local, k, H = rng.choice([2, 4]), rng.choice([2, 4]), rng.randint(1, 3), 16
    P = W * P_local
    gen = torch.Generator().manual_seed(seed)
    T = [0 if (seed == 0 and r == W - 1) else rng.randint(1, 12) for r in range(W)]
    xs = [torch.randn(t, H, generator=gen) for t in T]
    ids = [torch.stack([torch.randperm(P, generator=gen)[:k] for _ in range(t)]) if t else
           torch.zeros(0, k, dtype=torch.int64) for t in T]
    ws = [torch.rand(t, k, generator=gen) for t in T]

    def expert(slot: int, rows: torch.Tensor) -> torch.Tensor:  # a distinct function per physical slot
        return torch.tanh(rows * (0.3 + 0.1 * slot)) + slot

    partial = [torch.zeros(t, H, dtype=torch.float64) for t in T]  # what combine sums on each source rank
    for d in range(W):
        lo = d * P_local
        src = [(s, t) for s in range(W) for t in range(T[s]) if ((ids[s][t] >= lo) & (ids[s][t] < lo + P_local)).any()]
        R = len(src)
        recv_x = torch.stack([xs[s][t] for s, t in src]) if R else torch.zeros(0, H)
        local = torch.stack([torch.where((ids[s][t] >= lo) & (ids[s][t] < lo + P_local), ids[s][t] - lo, -1)
                             for s, t in src]) if R else torch.zeros(0, k, dtype=torch.int64)
        recv_w = torch.stack([ws[s][t] for s, t in src]) * (local >= 0) if R else torch.zeros(0, k)
        order, counts, pair_rows = expert_order(local, P_local)
        rows = gather_expert_rows(recv_x, order, k)
        y = torch.cat([expert(lo + e, part) for e, part in enumerate(rows.split(counts.tolist()))]) if R else rows
        tokens = token_weighted_sum(y, pair_rows, recv_w)
        for i, (s, t) in enumerate(src):
            partial[s][t] += tokens[i].double()
    for s in range(W):
        want = torch.zeros(T[s], H, dtype=torch.float64)
        for t in range(T[s]):
            for j in range(k):
                want[t] += float(ws[s][t, j]) * expert(int(ids[s][t, j]), xs[s][t:t + 1])[0].double()
        assert torch.allclose(partial[s], want, atol=1e-5), (seed, s)
