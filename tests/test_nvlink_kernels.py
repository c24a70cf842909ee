"""The `nvlink` comm's data kernels, W ranks simulated in one process (CPU, interpreter).

Every simulated rank gets its own buffers; the kernels reach a "peer" buffer through the same delta
tables the GPU comm builds from symmetric-memory mappings (element offsets between allocations). The
GPU-only signal kernel is replaced by its effect (each rank's slot counters copied into its peers'
count rows, then zeroed), and the ranks run phase by phase. Checked against plain loops:
  - the expert batch each rank receives holds, row for row, the pairs routed to its experts, grouped by
    local expert, sources in rank order (the interpreter runs programs in order, so tokens come in
    order too; on GPUs only each source's block inside an expert is fixed), masked and gathered (the
    latter through its row -> token index);
  - combine returns sum_j w[t, j] * f(expert, x[t]) for a per-expert function f, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe_fn.eplb.placement import Placement

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the CPU simulation runs the Triton kernels through the interpreter")


def _symmetric(shape: tuple, dtype: torch.dtype, W: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One buffer per simulated rank, each with its delta table to every rank's buffer."""
    bufs = [torch.zeros(shape, dtype=dtype) for _ in range(W)]
    out = []
    for b in bufs:
        delta = [(o.data_ptr() - b.data_ptr()) // b.element_size() for o in bufs]
        out.append((b, torch.tensor(delta, dtype=torch.int64)))
    return out


def _count_layout(cnt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ep_nvlink_sync.count_layout on cnt [W, P_local + 1] -> (counts, base, M), outputs pre-filled with junk."""
    from nanomoe_kernels import ep_nvlink_sync

    W, P_local = cnt.shape[0], cnt.shape[1] - 1
    counts, base = torch.full((P_local,), -9, dtype=torch.int64), torch.full((W, P_local), -9, dtype=torch.int64)
    m_word = torch.full((1,), -9, dtype=torch.int64)  # stands for the pinned host word
    ep_nvlink_sync.count_layout(cnt, counts, base, m_word.data_ptr())
    return counts, base, int(m_word[0])


def _publish_counts(ctrs: list[torch.Tensor], cnts: list[torch.Tensor], tokens: list[int], P_local: int) -> None:
    """What the dispatch signal does before its flags: rank r's counters of d's slots -> d's count row r."""
    W = len(ctrs)
    for r in range(W):
        for d in range(W):
            cnts[d][r, :P_local] = ctrs[r][d * P_local:(d + 1) * P_local].long()
            cnts[d][r, P_local] = tokens[r]
        ctrs[r].zero_()


def _expert_fn(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """A different affine map per physical slot: out = rows * (1 + slot / 8) + slot / 16."""
    s = slot.to(torch.float64).unsqueeze(-1)
    return rows.double() * (1 + s / 8) + s / 16


@settings(max_examples=25, deadline=None)
@given(W=st.integers(1, 4), P_local=st.integers(1, 4), k=st.integers(1, 4),
       layout=st.sampled_from(["masked", "gathered"]), H=st.sampled_from([8, 24, 1100]),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       redundant=st.booleans(), seed=st.integers(0, 2**16))
def test_nvlink_exchange_matches_loops(W, P_local, k, layout, H, dtype, redundant, seed):
    from nanomoe_kernels import ep_nvlink

    gen = torch.Generator().manual_seed(seed)
    P = W * P_local
    E = max(1, P - W) if redundant and P > W else P
    k = min(k, E)
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=gen)])
    placement = Placement.from_phy2log(phy2log[torch.randperm(P, generator=gen)], E, W)
    T_max = 5
    tokens = [int(torch.randint(0, T_max + 1, (1,), generator=gen)) for _ in range(W)]
    tokens[0] = 0 if seed % 5 == 0 else tokens[0]  # a rank with no tokens now and then
    xs = [torch.randn(T, H, generator=gen).to(dtype) for T in tokens]
    ids = [torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(torch.int32) for T in tokens]
    ws = [torch.rand(T, k, generator=gen) for T in tokens]
    phys = [placement.physical_ids(ids[r], r) for r in range(W)]
    phys = [p.contiguous() if seed % 2 else p.to(torch.int32).contiguous() for p in phys]  # both id dtypes

    names = {"tok": ((W * T_max, H), dtype), "meta": ((W * T_max, k), torch.int32),
             "w": ((W * T_max, k), torch.float32), "cnt": ((W, P_local + 1), torch.int64),
             "comb": ((W, T_max, H), dtype)}
    sym = {n: _symmetric(s, dt, W) for n, (s, dt) in names.items()}
    bufs = [{n: sym[n][r] for n in names} for r in range(W)]
    ctrs = [torch.zeros(P, dtype=torch.int32) for _ in range(W)]
    has = [torch.full((tokens[r], W), -1, dtype=torch.int32) for r in range(W)]
    for r in range(W):
        epoch, err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
        ep_nvlink.put_tokens(xs[r], phys[r], ws[r], has[r], ctrs[r], epoch, err.data_ptr(), bufs[r], r, T_max, P,
                             own_rows=layout == "gathered")
        assert int(epoch) == 1 and int(err[0]) == 0
        want_has = torch.zeros(tokens[r], W, dtype=torch.int32)
        for t in range(tokens[r]):
            for j in range(k):
                want_has[t, int(phys[r][t, j]) // P_local] = 1
        assert torch.equal(has[r], want_has)
        assert torch.equal(ctrs[r].long(), torch.bincount(phys[r].flatten().long(), minlength=P))
    cnts = [bufs[r]["cnt"][0] for r in range(W)]
    _publish_counts(ctrs, cnts, tokens, P_local)

    cap = W * T_max
    ys, rows_tables = [], []
    for r in range(W):
        rows = torch.full((W * T_max, k), -7, dtype=torch.int32)
        if layout == "masked":
            xe = torch.full((P_local, cap, H), float("nan"), dtype=dtype)
            counts = torch.full((P_local,), -1, dtype=torch.int64)
            ep_nvlink.expand_tokens(xs[r], bufs[r]["tok"][0], bufs[r]["meta"][0], cnts[r], xe.view(-1, H), rows, r,
                                    T_max, counts=counts)
        else:  # gathered: only the row -> token index is written; the batch rows are tok[index]
            counts, base, M = _count_layout(cnts[r])
            assert M == int(counts.sum())
            index = torch.full((M + 3,), -5, dtype=torch.int32)  # an upper bound, as the comm allocates
            ep_nvlink.expand_tokens(xs[r], bufs[r]["tok"][0], bufs[r]["meta"][0], cnts[r], index, rows, r, T_max,
                                    base=base)
            assert index[M:].tolist() == [-5] * 3 and bool((index[:M] >= 0).all())
            xe = bufs[r]["tok"][0].index_select(0, index[:M].long())
        # expected rows of each local expert: sources in rank order, their pairs in token order
        row_slot = []
        for e in range(P_local):
            want = [xs[s][t] for s in range(W) for t in range(tokens[s]) for j in range(k)
                    if int(phys[s][t, j]) == r * P_local + e]
            assert int(counts[e]) == len(want), f"rank {r} expert {e}: count {int(counts[e])} != {len(want)}"
            got = xe[e, :len(want)] if layout == "masked" else xe[int(counts[:e].sum()):int(counts[:e + 1].sum())]
            if want:
                assert torch.equal(got, torch.stack(want)), f"rank {r} expert {e}: rows differ"
            row_slot += [(e, r * P_local + e)] * len(want)
        # every received pair has its row recorded, every other entry of a sent token is -1
        for s in range(W):
            for t in range(tokens[s]):
                got_rows = rows[s * T_max + t]
                mine = [int(phys[s][t, j]) // P_local == r for j in range(k)]
                assert all((int(v) >= 0) == m for v, m in zip(got_rows, mine)), (s, t, got_rows, mine)
        slot = torch.tensor([s for _, s in row_slot], dtype=torch.int64)
        y = xe.clone()
        if layout == "masked":
            for e in range(P_local):
                c = int(counts[e])
                y[e, :c] = _expert_fn(xe[e, :c], torch.full((c,), r * P_local + e)).to(dtype)
        else:
            y = _expert_fn(xe, slot).to(dtype)
        ys.append(y.reshape(-1, H).contiguous())
        rows_tables.append(rows)

    for r in range(W):
        b = bufs[r]
        ep_nvlink.combine_tokens(ys[r], rows_tables[r], b["w"][0], cnts[r], b["comb"], r, T_max)
    for r in range(W):
        out = torch.full((tokens[r], H), float("nan"), dtype=dtype)
        ep_nvlink.sum_partials(bufs[r]["comb"][0], has[r], out)
        y_round = _expert_fn(xs[r].unsqueeze(1).expand(-1, k, -1), phys[r]).to(dtype).double()  # experts' rounding
        ref = (ws[r].double().unsqueeze(-1) * y_round).sum(1)
        assert torch.isfinite(out).all(), f"rank {r}: unwritten output rows"
        if tokens[r]:
            err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
            assert err <= (1e-6 if dtype == torch.float32 else 4e-3), f"rank {r}: combine error {err:.3g}"


def test_count_layout_places_sources_in_rank_order_inside_each_expert():
    # 2 sources, 3 local experts: expert 0 gets 2 + 1 rows, expert 1 none, expert 2 gets 0 + 4
    counts, base, M = _count_layout(torch.tensor([[2, 0, 0, 5], [1, 0, 4, 3]]))
    assert counts.tolist() == [3, 0, 4] and M == 7
    assert base.tolist() == [[0, 3, 3], [2, 3, 3]]


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**16))
def test_count_layout_matches_a_loop(W, P_local, seed):
    cnt = torch.randint(0, 6, (W, P_local + 1), generator=torch.Generator().manual_seed(seed))
    counts, base, M = _count_layout(cnt)
    row, want = 0, torch.zeros(W, P_local, dtype=torch.int64)
    for e in range(P_local):  # experts in order, sources in rank order inside each
        for s in range(W):
            want[s, e] = row
            row += int(cnt[s, e])
    assert counts.tolist() == cnt[:, :-1].sum(0).tolist() and M == row
    assert torch.equal(base, want)


def test_put_reports_a_slot_out_of_range_and_drops_it():
    from nanomoe_kernels import ep_nvlink

    W, P, T_max, H, k = 2, 4, 2, 8, 2
    phys = torch.tensor([[0, 3], [1, 4]], dtype=torch.int32)  # slot 4 does not exist
    names = {"tok": ((W * T_max, H), torch.float32), "meta": ((W * T_max, k), torch.int32),
             "w": ((W * T_max, k), torch.float32)}
    sym = {n: _symmetric(s, dt, W) for n, (s, dt) in names.items()}  # every rank's buffer stays alive
    bufs = {n: b[0] for n, b in sym.items()}
    epoch, err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    ctr, has = torch.zeros(P, dtype=torch.int32), torch.empty((2, W), dtype=torch.int32)
    ep_nvlink.put_tokens(torch.randn(2, H), phys, torch.rand(2, k), has, ctr, epoch, err.data_ptr(), bufs, 0, T_max, P)
    assert err.tolist()[:2] == [1, 4], err
    assert ctr.tolist() == [1, 1, 0, 1] and has.tolist() == [[1, 1], [1, 0]]
    assert sym["meta"][1][0][1].tolist() == [-1, -1], "token 1 has no valid pair on rank 1: codes -1"
    # codes e * T_max + within: slot 3 is expert 1 of rank 1, slot 1 expert 1 of rank 0
    assert sym["meta"][1][0][0].tolist() == [-1, 1 * T_max + 0] and sym["meta"][0][0][1].tolist() == [T_max, -1]


def test_put_with_no_tokens_still_advances_the_epoch():
    from nanomoe_kernels import ep_nvlink

    W, P, T_max, H, k = 2, 4, 3, 8, 2
    names = {"tok": ((W * T_max, H), torch.float16), "meta": ((W * T_max, k), torch.int32),
             "w": ((W * T_max, k), torch.float32)}
    sym = {n: _symmetric(s, dt, W) for n, (s, dt) in names.items()}
    bufs = {n: b[1] for n, b in sym.items()}
    epoch, err = torch.full((1,), 6, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    ctr = torch.zeros(P, dtype=torch.int32)
    ep_nvlink.put_tokens(torch.empty(0, H, dtype=torch.float16), torch.empty(0, k, dtype=torch.int64),
                         torch.empty(0, k), torch.empty((0, W), dtype=torch.int32), ctr, epoch, err.data_ptr(), bufs,
                         1, T_max, P)
    assert int(epoch) == 7 and int(err[0]) == 0 and ctr.tolist() == [0] * P


def _pairs_of(phys: list[torch.Tensor], tokens: list[int], k: int, slot: int) -> list[tuple[int, int]]:
    """(source, token) of every pair routed to `slot`: sources in rank order, tokens in order."""
    return [(s, t) for s in range(len(phys)) for t in range(tokens[s]) for j in range(k) if int(phys[s][t, j]) == slot]


@settings(max_examples=15, deadline=None)
@given(W=st.integers(1, 3), P_local=st.integers(1, 3), k=st.integers(1, 3),
       layout=st.sampled_from(["masked", "gathered"]), H=st.sampled_from([128, 384, 1152]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
       seed=st.integers(0, 2**16))
def test_nvlink_fp8_exchange_delivers_packed_rows(W, P_local, k, layout, H, dtype, seed):
    """FP8 payload: each rank receives exactly the packed rows (fp8 bytes + scales) of the pairs routed to it,
    their views equal quant_fp8_groups of the sent tokens bit for bit, and combine of a per-expert function of
    the dequantised rows returns the weighted sum (combine stays in x's dtype)."""
    from nanomoe_kernels import ep_nvlink
    from nanomoe_kernels.fp8_pack import pack_fp8_rows_torch, packed_row_bytes, unpack_fp8_rows
    from nanomoe_kernels.fp8_quant import quant_fp8_groups

    gen = torch.Generator().manual_seed(seed)
    P, T_max, RB, G = W * P_local, 4, packed_row_bytes(H), H // 128
    k = min(k, P)
    tokens = [int(torch.randint(0, T_max + 1, (1,), generator=gen)) for _ in range(W)]
    xs = [(torch.randn(T, H, generator=gen) * 4 ** torch.randn(T, 1, generator=gen)).to(dtype) for T in tokens]
    if tokens[0]:
        xs[0][0, :128] = 0  # an all-zero group: scale 1
    phys = [torch.rand(T, P, generator=gen).topk(k, dim=1).indices.to(torch.int32) for T in tokens]
    ws = [torch.rand(T, k, generator=gen) for T in tokens]
    names = {"tok": ((W * T_max, RB), torch.uint8), "meta": ((W * T_max, k), torch.int32),
             "w": ((W * T_max, k), torch.float32), "cnt": ((W, P_local + 1), torch.int64),
             "comb": ((W, T_max, H), dtype)}
    sym = {n: _symmetric(s, dt, W) for n, (s, dt) in names.items()}
    bufs = [{n: sym[n][r] for n in names} for r in range(W)]
    ctrs = [torch.zeros(P, dtype=torch.int32) for _ in range(W)]
    has = [torch.empty((tokens[r], W), dtype=torch.int32) for r in range(W)]
    for r in range(W):  # own rows go into tok too, in both layouts
        epoch, err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
        ep_nvlink.put_tokens(xs[r], phys[r], ws[r], has[r], ctrs[r], epoch, err.data_ptr(), bufs[r], r, T_max, P,
                             own_rows=True, fp8=True)
        assert int(err[0]) == 0
    cnts = [bufs[r]["cnt"][0] for r in range(W)]
    _publish_counts(ctrs, cnts, tokens, P_local)
    ys, rows_tables = [], []
    for r in range(W):
        tok = bufs[r]["tok"][0]
        rows = torch.full((W * T_max, k), -7, dtype=torch.int32)
        if layout == "masked":
            xe = torch.full((P_local, W * T_max, RB), 0xA5, dtype=torch.uint8)
            counts = torch.full((P_local,), -1, dtype=torch.int64)
            t16 = tok.view(torch.int16)
            ep_nvlink.expand_tokens(t16, t16, bufs[r]["meta"][0], cnts[r], xe.view(torch.int16).view(-1, RB // 2),
                                    rows, r, T_max, counts=counts, own_from_x=False)
        else:
            counts, base, M = _count_layout(cnts[r])
            index = torch.full((M,), -5, dtype=torch.int32)
            ep_nvlink.expand_tokens(tok, tok, bufs[r]["meta"][0], cnts[r], index, rows, r, T_max, base=base)
            xe = tok.index_select(0, index.long())  # the gathered batch's rows, materialised
        q_all, s_all = unpack_fp8_rows(xe, H)
        y = torch.zeros((*xe.shape[:-1], H), dtype=dtype)
        for e in range(P_local):
            pairs = _pairs_of(phys, tokens, k, r * P_local + e)
            assert int(counts[e]) == len(pairs), f"rank {r} expert {e}: {int(counts[e])} rows != {len(pairs)}"
            if not pairs:
                continue
            lo, n = int(counts[:e].sum()), len(pairs)
            at = (e, slice(0, n)) if layout == "masked" else (slice(lo, lo + n),)  # expert e's rows in the batch
            sent = torch.stack([xs[s][t] for s, t in pairs])
            if dtype != torch.bfloat16:  # the interpreter converts some bfloat16 values unlike torch (the twin)
                want = pack_fp8_rows_torch(sent)[:, :H + 4 * G]
                assert torch.equal(xe[at][:, :H + 4 * G], want), f"rank {r} expert {e}: packed rows differ"
            q, sc = quant_fp8_groups(sent)  # the Triton quantiser: bit for bit
            assert torch.equal(q_all[at].view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_all[at], sc)
            deq = (q_all[at].double().view(len(pairs), G, 128) * s_all[at].double()[..., None]).view(len(pairs), H)
            y[at] = _expert_fn(deq, torch.full((len(pairs),), r * P_local + e)).to(dtype)
        ys.append(y.reshape(-1, H).contiguous())
        rows_tables.append(rows)
    for r in range(W):
        ep_nvlink.combine_tokens(ys[r], rows_tables[r], bufs[r]["w"][0], cnts[r], bufs[r]["comb"], r, T_max)
    for r in range(W):
        out = torch.full((tokens[r], H), float("nan"), dtype=dtype)
        ep_nvlink.sum_partials(bufs[r]["comb"][0], has[r], out)
        if not tokens[r]:
            continue
        q, sc = quant_fp8_groups(xs[r])
        deq = (q.double().view(tokens[r], G, 128) * sc.double()[..., None]).view(tokens[r], H)
        y_round = _expert_fn(deq.unsqueeze(1).expand(-1, k, -1), phys[r]).to(dtype).double()
        ref = (ws[r].double().unsqueeze(-1) * y_round).sum(1)
        err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
        assert err <= {torch.float32: 1e-6, torch.float16: 4e-3}.get(dtype, 1e-2), f"rank {r}: combine error {err:.3g}"
