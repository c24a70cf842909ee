"""The `bmm` expert backend: the same bits as the previous padded-vmap path, and bmm == loop == the float64
reference on drawn shapes (empty experts, every layout, both the all-experts and the selected-experts batch).

Dimension legend: P local experts, M batch rows, C capacity (rows per expert, padded), H hidden, I intermediate.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanomoe_fn.moe.experts as experts_mod
from nanomoe_fn import ExpertBatch, expert_ffn
from nanomoe_fn.batch import row_coords, to_contiguous, to_masked
from nanomoe_fn.moe.experts import batch_all_experts
from nanomoe_fn.moe.params import LinearExperts, SwiGLUExperts, expert_tensors
from tests.helpers import DTYPES, assert_close_to_ref
from tests.test_gathered_batch import reference_rows


def previous_bmm(experts, batch: ExpertBatch) -> torch.Tensor:
    """The bmm backend before the rewrite (rows scattered into a zero-padded batch of the active experts,
    torch.func.vmap of one expert, 2-D advanced-index gather back): [M, H] for a contiguous/gathered batch.
    It batched the active experts only; the new path may batch all of them (batch_all_experts), and a
    batched GEMM's bits can depend on the batch (CPU BLAS takes another kernel for one matrix), so this
    runs the old math on the experts the new path batches."""
    batch = batch.materialize()
    counts_host = batch.counts.tolist()
    active = [e for e, c in enumerate(counts_host) if c]
    if not active:
        return batch.x.new_empty((0, batch.x.shape[1]))
    ws = expert_tensors(experts)
    every = batch_all_experts(batch.num_experts, len(active), max(counts_host))
    take = batch.counts >= 0 if every else batch.counts > 0
    if not bool(take.all()):
        ws = tuple(w.index_select(0, torch.tensor(active)) for w in ws)
    rank_of = torch.cumsum(take, 0) - 1
    row_expert, row_slot = row_coords(batch)
    xp = batch.x.new_zeros((int(take.sum()), max(counts_host), batch.x.shape[1]))
    xp[rank_of[row_expert], row_slot] = batch.x
    y = torch.func.vmap(experts_mod.one_expert(experts))(*ws, xp)
    return y[rank_of[row_expert], row_slot]


@st.composite
def problems(draw: st.DrawFn, dtypes=tuple(DTYPES)) -> tuple:
    """(experts, contiguous batch): P 1-12 experts, some of them empty (often most), 0-40 rows."""
    dtype = draw(st.sampled_from(dtypes))
    P, H, I = draw(st.integers(1, 12)), draw(st.integers(1, 40)), draw(st.integers(1, 24))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hit = draw(st.lists(st.integers(0, P - 1), min_size=0, max_size=P, unique=True))
    counts = torch.zeros(P, dtype=torch.int64)
    for e in hit:
        counts[e] = draw(st.integers(1, 9))
    if draw(st.booleans()):
        experts = SwiGLUExperts((torch.randn(P, 2 * I, H, generator=gen) / H**0.5).to(dtype),
                                (torch.randn(P, H, I, generator=gen) / I**0.5).to(dtype))
    else:
        experts = LinearExperts((torch.randn(P, H, H, generator=gen) / H**0.5).to(dtype))
    x = torch.randn(int(counts.sum()), H, generator=gen).to(dtype)
    return experts, ExpertBatch(x, counts)


def gathered(batch: ExpertBatch, seed: int) -> ExpertBatch:
    """The same batch rows read through an index from a shuffled token table with extra unread rows."""
    M, H = batch.x.shape
    perm = torch.randperm(M + 3, generator=torch.Generator().manual_seed(seed))
    table = torch.randn(M + 3, H).to(batch.x.dtype)
    table[perm[:M]] = batch.x
    return ExpertBatch(table, batch.counts, "gathered", perm[:M].to(torch.int32))


@settings(max_examples=80, deadline=None)
@given(problems(), st.sampled_from([1 << 10, 32 << 20]), st.integers(0, 2**31 - 1))
def test_bmm_same_bits_as_previous_path(prob, chunk_bytes, seed):
    """Every layout; small chunks force several activation chunks (the float32 math is elementwise)."""
    experts, batch = prob
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts_mod, "ACT_CHUNK_BYTES", chunk_bytes)
        want = previous_bmm(experts, batch)
        assert torch.equal(expert_ffn(experts, batch, "bmm").x, want)
        assert torch.equal(expert_ffn(experts, gathered(batch, seed), "bmm").x, want)
        if batch.num_rows:
            cap = int(batch.counts.max()) + 2
            masked = to_masked(batch, cap)
            old = torch.func.vmap(experts_mod.one_expert(experts))(*expert_tensors(experts), masked.x)
            assert torch.equal(expert_ffn(experts, masked, "bmm").x, old)


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["contiguous", "gathered", "masked"]), st.integers(0, 2**31 - 1))
def test_bmm_equals_loop_equals_reference(prob, layout, seed):
    experts, batch = prob
    ref = reference_rows(experts, gathered(batch, seed))
    dtype = batch.x.dtype
    for backend in ("loop", "bmm"):
        if layout == "masked":
            y = to_contiguous(expert_ffn(experts, to_masked(batch, max(1, batch.num_rows)), backend), batch).x
        else:
            y = expert_ffn(experts, gathered(batch, seed) if layout == "gathered" else batch, backend).x
        assert y.dtype == dtype and tuple(y.shape) == tuple(batch.x.shape)
        assert_close_to_ref(y, ref, dtype, f"expert_ffn[{backend}] {layout}")


@pytest.mark.parametrize("hit, dense", [((0,), False), ((1, 5), False), ((0, 3, 7), True), (range(8), True)])
def test_bmm_selects_experts_only_when_cheaper(hit, dense, monkeypatch):
    """8 experts, 3 rows each on the hit ones: with few rows, all 8 experts are batched (their weights read
    once) unless fewer than a third are hit (then only those, weights copied out); both give the same bits."""
    gen = torch.Generator().manual_seed(0)
    experts = SwiGLUExperts(torch.randn(8, 12, 16, generator=gen), torch.randn(8, 16, 6, generator=gen))
    counts = torch.zeros(8, dtype=torch.int64)
    counts[list(hit)] = 3
    batch = ExpertBatch(torch.randn(int(counts.sum()), 16, generator=gen), counts)
    seen = []
    real = experts_mod._bmm_experts
    monkeypatch.setattr(experts_mod, "_bmm_experts", lambda ex, xp, sel, c: seen.append(sel) or real(ex, xp, sel, c))
    y = expert_ffn(experts, batch, "bmm").x
    assert (seen[0] is None) == dense and tuple(seen[0].tolist() if seen[0] is not None else ()) == (
        () if dense else tuple(hit))
    assert torch.equal(y, previous_bmm(experts, batch))
