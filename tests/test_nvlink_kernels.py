"""The `nvlink` comm's index math and data kernels, W ranks simulated in one process (CPU, interpreter).

Every simulated rank gets its own buffers; the kernels reach a "peer" buffer through the same delta
tables the GPU comm builds from symmetric-memory mappings (element offsets between allocations). The
two GPU-only synchronising kernels are replaced by their effect: the all-gathered count rows are
stacked directly, and the ranks run phase by phase. Checked against plain loops:
  - the expert batch each rank receives equals, row for row, the pairs routed to its experts
    (grouped by local expert, sources in rank order, tokens in order), in both layouts;
  - combine returns sum_j w[t, j] * f(expert, x[t]) for a per-expert function f, in float64.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe_fn.comm.nvlink_plan import local_plan, pair_rows, received_counts
from nanomoe_fn.placement import Placement

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


def _expert_fn(rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """A different affine map per physical slot: out = rows * (1 + slot / 8) + slot / 16."""
    s = slot.to(torch.float64).unsqueeze(-1)
    return rows.double() * (1 + s / 8) + s / 16


@settings(max_examples=25)
@given(W=st.integers(1, 4), P_local=st.integers(1, 4), k=st.integers(1, 4), layout=st.sampled_from(["masked",
       "contiguous"]), H=st.sampled_from([8, 24, 1100]), dtype=st.sampled_from([torch.float32, torch.float16]),
       redundant=st.booleans(), seed=st.integers(0, 2**16))
def test_nvlink_exchange_matches_loops(W, P_local, k, layout, H, dtype, redundant, seed):
    from kernels import ep_nvlink
    from kernels.ep_nvlink_plan import plan_decode

    gen = torch.Generator().manual_seed(seed)
    P = W * P_local
    E = max(1, P - W) if redundant and P > W else P
    if k > E:
        k = E
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=gen)])
    placement = Placement.from_phy2log(phy2log[torch.randperm(P, generator=gen)], E, W)
    T_max = 5
    tokens = [int(torch.randint(0, T_max + 1, (1,), generator=gen)) for _ in range(W)]
    tokens[0] = 0 if seed % 5 == 0 else tokens[0]  # a rank with no tokens now and then
    xs = [torch.randn(T, H, generator=gen).to(dtype) for T in tokens]
    ids = [torch.rand(T, E, generator=gen).topk(k, dim=1).indices.to(torch.int32) for T in tokens]
    ws = [torch.rand(T, k, generator=gen) for T in tokens]
    phys = [placement.physical_ids(ids[r], r) for r in range(W)]

    names = {"tok": ((W * T_max, H), dtype), "meta": ((W * T_max, k), torch.int32),
             "w": ((W * T_max, k), torch.float32), "src": ((W * T_max,), torch.int32),
             "comb": ((W, T_max, H), dtype)}
    sym = {n: _symmetric(s, dt, W) for n, (s, dt) in names.items()}
    bufs = [{n: sym[n][r] for n in names} for r in range(W)]
    plans = [local_plan(phys[r], P, W) for r in range(W)]
    n_all = torch.stack([p.row for p in plans])  # what exchange_counts gathers on the GPU
    cap = W * T_max
    for r in range(W):
        pos = pair_rows(plans[r], n_all, r, P, W, layout, cap)
        if layout == "masked":  # decode: the one-launch plan, pair rows computed inside put_tokens
            epoch, err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
            ph = phys[r].contiguous() if seed % 2 else phys[r].to(torch.int32).contiguous()  # both id dtypes
            row, has, tok_idx, within, dest = plan_decode(ph, P, W, epoch, err.data_ptr())
            assert int(epoch) == 1 and int(err[0]) == 0
            for name, a, b in [("row", row, plans[r].row), ("has", has, plans[r].has), ("dest", dest, plans[r].dest)]:
                assert torch.equal(a, b), f"plan_decode {name} differs from the torch plan"
            assert torch.equal(tok_idx[has.bool()], plans[r].tok_idx[has.bool()])
            pos_kernel = (phys[r] % P_local) * cap + (torch.cumsum(n_all[:, :P], 0) - n_all[:, :P])[r][phys[r]] + within
            assert torch.equal(pos_kernel.int(), pos), "within from plan_decode gives other rows than pair_rows"
            ep_nvlink.put_tokens(xs[r], has, tok_idx, dest, ws[r], bufs[r], r, T_max,
                                 masked=(ph, within, n_all, P_local, cap))
        else:
            ep_nvlink.put_tokens(xs[r], plans[r].has, plans[r].tok_idx, plans[r].dest, ws[r], bufs[r], r, T_max,
                                 pos=pos)

    ys = []
    for r in range(W):
        counts = received_counts(n_all, r, P, W)[0]
        if layout == "masked":
            xe = torch.full((P_local, cap, H), float("nan"), dtype=dtype)
            got_counts = torch.full((P_local,), -1, dtype=torch.int64)
            ep_nvlink.expand_tokens(bufs[r]["tok"][0], bufs[r]["meta"][0], n_all, xe.view(-1, H), r, T_max,
                                    got_counts)
            assert torch.equal(got_counts, counts), "expand_tokens counts differ"
        else:
            xe = torch.full((int(counts.sum()), H), float("nan"), dtype=dtype)
            ep_nvlink.expand_tokens(bufs[r]["tok"][0], bufs[r]["meta"][0], n_all, xe, r, T_max)
        # expected rows of each local expert: sources in rank order, their pairs in (t, j) order
        row_slot = []
        for e in range(P_local):
            want = [xs[s][t] for s in range(W) for t in range(tokens[s]) for j in range(k)
                    if int(phys[s][t, j]) == r * P_local + e]
            assert int(counts[e]) == len(want), f"rank {r} expert {e}: count {int(counts[e])} != {len(want)}"
            got = xe[e, :len(want)] if layout == "masked" else xe[int(counts[:e].sum()):int(counts[:e + 1].sum())]
            if want:
                assert torch.equal(got, torch.stack(want)), f"rank {r} expert {e}: rows differ"
            row_slot += [(e, r * P_local + e)] * len(want)
        slot = torch.tensor([s for _, s in row_slot], dtype=torch.int64)
        y = xe.clone()
        if layout == "masked":
            for e in range(P_local):
                c = int(counts[e])
                y[e, :c] = _expert_fn(xe[e, :c], torch.full((c,), r * P_local + e)).to(dtype)
        else:
            y = _expert_fn(xe, slot).to(dtype)
        ys.append(y.reshape(-1, H).contiguous())

    for r in range(W):
        b = bufs[r]
        ep_nvlink.combine_tokens(ys[r], b["meta"][0], b["w"][0], b["src"][0], n_all, b["comb"], r, T_max)
    for r in range(W):
        out = torch.full((tokens[r], H), float("nan"), dtype=dtype)
        ep_nvlink.sum_partials(bufs[r]["comb"][0], plans[r].has, out)
        y_round = _expert_fn(xs[r].unsqueeze(1).expand(-1, k, -1), phys[r]).to(dtype).double()  # experts' rounding
        ref = (ws[r].double().unsqueeze(-1) * y_round).sum(1)
        assert torch.isfinite(out).all(), f"rank {r}: unwritten output rows"
        if tokens[r]:
            err = float((out.double() - ref).norm() / ref.norm().clamp_min(1e-12))
            assert err <= (1e-6 if dtype == torch.float32 else 4e-3), f"rank {r}: combine error {err:.3g}"


def test_pair_rows_fill_each_expert_without_gaps():
    # 2 ranks, 2 slots each: rank 1's pairs on slot 0 follow rank 0's, in both layouts
    W, P = 2, 4
    phys = [torch.tensor([[0, 3], [0, 1]]), torch.tensor([[0, 2], [1, 0], [3, 2]])]
    plans = [local_plan(p, P, W) for p in phys]
    n_all = torch.stack([p.row for p in plans])
    assert n_all[:, :P].tolist() == [[2, 1, 0, 1], [2, 1, 2, 1]]
    assert n_all[:, P:].tolist() == [[2, 1], [2, 2]]
    masked = [pair_rows(plans[r], n_all, r, P, W, "masked", 6).tolist() for r in range(W)]
    assert masked == [[[0, 6], [1, 6]], [[2, 0], [7, 3], [7, 1]]]
    contig = [pair_rows(plans[r], n_all, r, P, W, "contiguous", 6).tolist() for r in range(W)]
    # rank 0 holds slots 0 (4 rows) and 1 (2 rows); rank 1 holds slots 2 (2 rows) and 3 (2 rows)
    assert contig == [[[0, 2], [1, 4]], [[2, 0], [5, 3], [3, 1]]]


def test_plan_decode_reports_a_slot_out_of_range_and_drops_it():
    from kernels.ep_nvlink_plan import plan_decode

    W, P = 2, 4
    phys = torch.tensor([[0, 3], [1, 4]], dtype=torch.int32)  # slot 4 does not exist
    epoch, err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    row, has, _, _, _ = plan_decode(phys, P, W, epoch, err.data_ptr())
    assert err.tolist()[:2] == [1, 4], err
    assert row[:P].tolist() == [1, 1, 0, 1] and has.tolist() == [[1, 1], [1, 0]]
