"""combine's reduction (comm.plan.reduce_pairs) against a float64 loop over tokens and their k rows,
with chunk sizes small enough that several token chunks run."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomoe_fn.batch import Handle
from nanomoe_fn.comm.plan import invert_order, reduce_pairs
from tests.helpers import DTYPES, assert_close_to_ref


def _loop_reference(y: torch.Tensor, weights: torch.Tensor, pair_rows: torch.Tensor) -> torch.Tensor:
    T, k = weights.shape
    out = torch.zeros((T, y.shape[1]), dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            out[t] += weights[t, j].double() * y[int(pair_rows[t * k + j])].double()
    return out


@given(T=st.integers(0, 24), k=st.integers(1, 6), H=st.integers(1, 40), extra=st.integers(0, 5),
       chunk_tokens=st.integers(1, 30), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       explicit_rows=st.booleans())
def test_reduce_pairs_matches_loop(T, k, H, extra, chunk_tokens, dtype, seed, explicit_rows):
    g = torch.Generator().manual_seed(seed)
    N = T * k
    send_order = torch.randperm(N, generator=g)
    weights = torch.rand((T, k), generator=g)
    if explicit_rows:  # rows scattered through a bigger buffer, as the fixed-capacity comm returns them
        y = torch.randn((N + extra, H), generator=g).to(dtype)
        pair_rows = torch.randperm(N + extra, generator=g)[:N]
    else:  # rows in send order: pair p sits at the position of p in send_order
        y = torch.randn((N, H), generator=g).to(dtype)
        pair_rows = None
    out = reduce_pairs(y, Handle(send_order, weights), pair_rows, chunk_bytes=chunk_tokens * 4 * k * H)
    rows = invert_order(send_order) if pair_rows is None else pair_rows
    assert out.dtype == dtype
    assert_close_to_ref(out, _loop_reference(y, weights, rows), dtype, "reduce_pairs")


def test_invert_order_is_the_inverse():
    order = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    inv = invert_order(order)
    assert torch.equal(inv[order], torch.arange(50)) and torch.equal(order[inv], torch.arange(50))
