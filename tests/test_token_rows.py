"""The `torch` comm's token rows: the Triton kernels (kernels/ep_rows.py, interpreter) against the torch-op
versions (comm/token_rows.py) and plain loops, W ranks simulated in one process (the exchange is a concat).

Checked: the count tables (pairs per slot, rows per rank, ids outside [0, P)), each token's row per rank and
its packed slots and weights, the batch each rank's experts receive (experts in order, sources in rank
order inside each, a source's rows in its order), each pair's batch row and weight, the partial sums and
the sum at home, against a float64 loop of the whole round.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe_fn.comm import token_rows

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton kernels through the interpreter")


def _case(W: int, P_local: int, k: int, T: list[int], H: int, dtype: torch.dtype, seed: int, bad: bool):
    g = torch.Generator().manual_seed(seed)
    P = W * P_local
    xs = [torch.randn(t, H, generator=g).to(dtype) for t in T]
    ids = [torch.stack([torch.randperm(P, generator=g)[:k] for _ in range(t)]) if t else
           torch.zeros(0, k, dtype=torch.int64) for t in T]
    if bad and T[0]:
        ids[0][0, -1] = P + 3
    ws = [torch.rand(t, k, generator=g) for t in T]
    return xs, [i.to(torch.int32) for i in ids], ws


def _bits(row: torch.Tensor) -> torch.Tensor:
    """A row's bits as integers (its pair data read as floats can be NaN, which torch.equal rejects)."""
    return row.view(torch.int16 if row.element_size() == 2 else torch.int32)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.lists(st.integers(0, 5), min_size=3, max_size=3),
       st.sampled_from([8, 20]), st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2**16))
def test_kernels_match_torch_ops_and_a_loop(W, P_local, k, T, H, dtype, seed):
    from nanomoe_kernels import ep_rows

    k = min(k, W * P_local)
    T = T[:W]
    xs, ids, ws = _case(W, P_local, k, T, H, dtype, seed, bad=False)
    hm, L = token_rows.row_layout(H, dtype, k)
    tabs, poss, blocks, compact = [], [], [], []
    for r in range(W):
        tab = torch.zeros(W, P_local + 2, dtype=torch.int64)
        pos = torch.full((T[r], W), -7, dtype=torch.int64)
        rows = torch.zeros(W * T[r], L, dtype=dtype)
        ep_rows.pack_rows(xs[r], ids[r], ws[r], tab, pos, rows, hm)
        t_tab, t_pos, t_rows = token_rows.pack_rows(xs[r], ids[r], ws[r], P_local, W, hm, L)
        assert torch.equal(tab, t_tab) and torch.equal(pos >= 0, t_pos >= 0)
        for t in range(T[r]):
            for d in range(W):
                assert bool(pos[t, d] >= 0) == any(int(i) // P_local == d for i in ids[r][t])
                if pos[t, d] >= 0:  # the same row, wherever each put it
                    first = int(t_tab[:d, P_local].sum())
                    assert torch.equal(_bits(rows[d * T[r] + pos[t, d]]), _bits(t_rows[first + t_pos[t, d]]))
                    slots, w, num = token_rows.pair_meta(rows[d * T[r] + pos[t, d]].unsqueeze(0), hm, k)
                    assert torch.equal(slots[0], ids[r][t]) and torch.equal(w[0], ws[r][t])
                    # a pair's number: the earlier pairs of its slot on this rank (the interpreter runs
                    # the programs in token order)
                    assert num[0].tolist() == [int((ids[r][:t] == i).sum()) for i in ids[r][t].tolist()]
                    t_num = token_rows.pair_meta(t_rows[first + t_pos[t, d]].unsqueeze(0), hm, k)[2]
                    assert torch.equal(num, t_num)
        tabs.append(tab)
        poss.append(pos)
        blocks.append([rows[d * T[r]: d * T[r] + int(tab[d, P_local])] for d in range(W)])
        compact.append(t_rows)
    homes = [[] for _ in range(W)]
    for r in range(W):  # the exchange: rank r receives each source's block for r, sources in rank order
        recv = torch.cat([blocks[s][r] for s in range(W)])
        got_tab = torch.stack([tabs[s][r] for s in range(W)])
        M = int(got_tab[:, :P_local].sum())
        counts = torch.full((P_local,), -9, dtype=torch.int64)
        index, prow = torch.full((M,), -3, dtype=torch.int32), torch.full((recv.shape[0], k), -5, dtype=torch.int32)
        pw = torch.full((recv.shape[0], k), -1.0)
        ep_rows.unpack_rows(recv, got_tab, counts, index, prow, pw, r, hm)
        t_index, t_prow, t_pw = token_rows.unpack_rows(recv, M, P_local, r, hm, k)
        assert torch.equal(index.long(), t_index) and torch.equal(prow.long(), t_prow) and torch.equal(pw, t_pw)
        # the batch: per local expert, the rows routed to it, sources in rank order, tokens in order
        want = [xs[s][t] for e in range(P_local) for s in range(W) for t in range(T[s])
                if r * P_local + e in ids[s][t].tolist()]
        batch = recv[:, :H].index_select(0, index.long())
        assert torch.equal(counts, torch.tensor([sum(int(r * P_local + e in ids[s][t].tolist()) for s in range(W)
                                                     for t in range(T[s])) for e in range(P_local)]))
        if want:
            assert torch.equal(batch, torch.stack(want))
        y = (batch.double() * (1 + torch.arange(M).unsqueeze(1) % 3)).to(dtype)  # a per-row "expert"
        part = torch.full((recv.shape[0], H), float("nan"), dtype=dtype)
        ep_rows.partial_rows(y, prow, pw, part)
        t_part = token_rows.partial_rows(y, t_prow, t_pw)
        assert torch.allclose(part.float(), t_part.float(), rtol=1e-3, atol=1e-3)
        start = 0
        for s in range(W):  # the way back: partial rows to their sources, in the order they came
            n = int(got_tab[s, P_local])
            homes[s].append(part[start:start + n])
            start += n
    for r in range(W):
        home = torch.cat(homes[r]) if homes[r] else torch.zeros(0, H, dtype=dtype)
        out = torch.full((T[r], H), float("nan"), dtype=dtype)
        ep_rows.sum_home(home, tabs[r], poss[r], out)
        assert torch.allclose(out.float(), token_rows.sum_home(home, tabs[r][:, P_local], poss[r]).float(),
                              rtol=1e-3, atol=1e-3)


def test_pack_counts_ids_outside_the_slots_in_every_row():
    from nanomoe_kernels import ep_rows

    W, P_local, k, H = 2, 3, 2, 8
    xs, ids, ws = _case(W, P_local, k, [4, 4], H, torch.float32, 5, bad=True)
    hm, L = token_rows.row_layout(H, torch.float32, k)
    tab = torch.zeros(W, P_local + 2, dtype=torch.int64)
    ep_rows.pack_rows(xs[0], ids[0], ws[0], tab, torch.empty(4, W, dtype=torch.int64),
                      torch.empty(W * 4, L), hm)
    t_tab = token_rows.pack_rows(xs[0], ids[0], ws[0], P_local, W, hm, L)[0]
    assert tab[:, -1].tolist() == [1, 1] and torch.equal(tab, t_tab)
    assert int(tab[:, :P_local].sum()) == 4 * k - 1  # the bad pair is counted nowhere else


def test_row_layout_aligns_the_pair_data():
    for dtype, H in ((torch.bfloat16, 7168), (torch.float16, 7), (torch.float32, 5), (torch.float64, 3)):
        hm, L = token_rows.row_layout(H, dtype, 8)
        size = torch.empty((), dtype=dtype).element_size()
        assert hm >= H and (hm * size) % 16 == 0 and (L * size) % 16 == 0 and (L - hm) * size >= 96


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.lists(st.integers(0, 5), min_size=3, max_size=3),
       st.integers(0, 2), st.sampled_from([8, 20]), st.sampled_from([torch.float32, torch.float16]),
       st.integers(0, 2**16), st.booleans())
def test_fixed_blocks_kernels_match_torch_ops_and_the_round(W, P_local, k, T, spare, H, dtype, seed, bad):
    """The decode mode: fixed blocks of BS = T_max + 1 rows (a header row with the count table row, then the
    rows), the masked batch, the partial rows and the sum at home, kernels == torch ops == sum_k(w) * x."""
    from nanomoe_kernels import ep_rows

    k = min(k, W * P_local)
    T = T[:W]
    xs, ids, ws = _case(W, P_local, k, T, H, dtype, seed, bad=bad)
    hm, L = token_rows.block_layout(H, dtype, k, P_local)
    t_max = max(max(T) + spare, 1)  # a comm's max_tokens >= 1
    BS, cap = t_max + 1, W * t_max
    poss, blocks = [], []
    for r in range(W):
        pos = torch.full((T[r], W), -7, dtype=torch.int64)
        blk = torch.full((W * BS, L), 3.0, dtype=dtype)
        token_rows.header_words(blk, BS, P_local + 2).zero_()
        ep_rows.pack_blocks(xs[r], ids[r], ws[r], pos, blk, P_local, hm)
        t_pos, t_blk = token_rows.pack_blocks(xs[r], ids[r], ws[r], P_local, W, hm, L, BS)
        tab = token_rows.header_words(blk, BS, P_local + 2)
        assert torch.equal(tab, token_rows.header_words(t_blk, BS, P_local + 2))
        assert torch.equal(pos, t_pos)  # the interpreter runs the programs in token order
        for d in range(W):
            n = int(tab[d, P_local])
            got, want = blk[d * BS + 1:d * BS + 1 + n], t_blk[d * BS + 1:d * BS + 1 + n]
            assert torch.equal(_bits(got[:, :H]), _bits(want[:, :H]))  # the token, then its pair data
            (slot, w, num), (t_slot, t_w, t_num) = token_rows.pair_meta(got, hm, k), token_rows.pair_meta(want, hm, k)
            ok = (t_slot >= 0) & (t_slot < W * P_local)  # a bad pair's number means nothing
            assert torch.equal(slot, t_slot) and torch.equal(w, t_w) and torch.equal(num[ok], t_num[ok])
        poss.append(pos)
        blocks.append(blk)
    parts = []
    for r in range(W):  # the exchange: rank r receives each source's block r, sources in rank order
        recv = torch.cat([blocks[s][r * BS:(r + 1) * BS] for s in range(W)])
        counts = torch.full((P_local,), -9, dtype=torch.int64)
        xe = torch.full((P_local, cap, H), float("nan"), dtype=dtype)
        prow, pw = torch.full((W * BS, k), -5, dtype=torch.int32), torch.full((W * BS, k), -1.0)
        err = torch.zeros(4, dtype=torch.int32)
        ep_rows.unpack_blocks(recv, counts, xe, prow, pw, err.data_ptr(), r, W, hm)
        t_xe, t_counts, t_prow, t_pw, t_bad = token_rows.unpack_blocks(recv, P_local, r, W, hm, k, cap, H)
        assert err.tolist() == ([1, 4, -1, 0] if bad and T[0] > 0 else [0, 0, 0, 0])
        assert int(t_bad.sum()) == int(bool(bad and T[0]))
        assert torch.equal(counts, t_counts) and torch.equal(prow.long(), t_prow) and torch.equal(pw, t_pw)
        for e in range(P_local):  # per expert: its rows, sources in rank order, tokens in order
            want = [xs[s][t] for s in range(W) for t in range(T[s]) if r * P_local + e in ids[s][t].tolist()]
            assert int(counts[e]) == len(want)
            if want:
                assert torch.equal(xe[e, :len(want)], torch.stack(want)) and torch.equal(t_xe[e, :len(want)],
                                                                                        torch.stack(want))
        part = torch.full((W * BS, H), float("nan"), dtype=dtype)
        ep_rows.partial_rows(xe.view(-1, H), prow, pw, part)  # identity experts: padding rows are never read
        assert torch.allclose(part.float(), token_rows.partial_rows(t_xe.view(-1, H), t_prow, t_pw).float(),
                              rtol=1e-3, atol=1e-3)
        parts.append(part)
    for r in range(W):  # home: each destination's block r, in destination order
        home = torch.cat([parts[d][r * BS:(r + 1) * BS] for d in range(W)])
        out = torch.full((T[r], H), float("nan"), dtype=dtype)
        ep_rows.sum_home(home, None, poss[r], out, block_rows=BS)
        t_out = token_rows.sum_home_blocks(home, poss[r], BS)
        assert torch.allclose(out.float(), t_out.float(), rtol=1e-3, atol=1e-3)
        ok = (ids[r] >= 0) & (ids[r] < W * P_local)
        want = xs[r].double() * torch.where(ok, ws[r].double(), 0.0).sum(1, keepdim=True)
        assert torch.allclose(out.double(), want, rtol=2e-3, atol=2e-3)
