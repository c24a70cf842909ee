"""DeepGEMM's glue kernels (kernels/moe_permute.py, kernels/moe_silu.py) against plain torch computed from the
Alignment.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, R aligned rows, BM block_m,
N rows the alignment sorts (T*k pairs), cap rows per expert (masked layout).
On the CPU the kernels run under TRITON_INTERPRET=1 (float32/float16; the interpreter gets bfloat16
wrong); on a GPU machine without it they run compiled on CUDA, bfloat16 included. The end-to-end case
chains permute -> a torch stand-in for DeepGEMM's grouped GEMM -> silu_mul -> stand-in -> unpermute_sum
against the float64 oracle (reference.moe_experts), so the glue's composition is checked without a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.moe_align as ma  # noqa: E402
import nanomoe_kernels.moe_capacity as mc  # noqa: E402
import nanomoe_kernels.moe_permute as mp  # noqa: E402
import nanomoe_kernels.moe_silu as ms  # noqa: E402
import nanomoe_reference as reference  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not mp.runs_interpreted():
    for mod in (ma, mc, mp, ms):  # kernels/ was imported before the variable was set: decorate the kernels again
        importlib.reload(mod)

DEV = "cpu" if mp.runs_interpreted() else "cuda"
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU, or a CUDA GPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@st.composite
def routings(draw):
    """(T, k, E, H, block_m, topk_ids [T, k] int32, generator): k distinct experts per token from an
    allowed subset (experts outside it get no rows); with `drop`, some ids are E (the alignment drops them)."""
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.integers(0, 24))
    H = draw(st.sampled_from([16, 40, 72]))
    bm = draw(st.sampled_from([16, 32]))
    allowed = draw(st.integers(k, E))
    drop = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    subset = torch.randperm(E, generator=g)[:allowed]
    ids = torch.stack([subset[torch.randperm(allowed, generator=g)[:k]] for _ in range(T)]) if T else \
        torch.zeros(0, k, dtype=torch.int64)
    if drop and T:
        ids[torch.rand(T, k, generator=g) < 0.2] = E
    return T, k, E, H, bm, ids.to(DEV, torch.int32), g


def live_rows(al):
    """(num_padded, sorted ids [num_padded] int64, live mask) on the host."""
    n = int(al.num_padded)
    ids = al.sorted_ids[:n].long().cpu()
    return n, ids, ids < al.num_rows


def positions(al):
    """pos [N] int64: the aligned row of each row id, -1 for ids the alignment left out."""
    n, ids, live = live_rows(al)
    pos = torch.full((al.num_rows,), -1, dtype=torch.int64)
    pos[ids[live]] = torch.arange(n)[live]
    return pos


@settings(max_examples=50)
@given(routings(), st.sampled_from(DTYPES), st.booleans(), st.sampled_from([None, torch.int32, torch.int64]))
def test_permute_rows(case, dtype, zero_tail, index_dtype):
    T, k, E, H, bm, ids, g = case
    al = ma.moe_align(ids, E, bm)
    G = T + 3 if index_dtype else T
    x = torch.randn(G, H, generator=g).to(DEV, dtype)
    a_index = torch.randperm(G, generator=g)[:T].to(DEV, index_dtype) if index_dtype else None
    a, m = mp.permute_rows(x, al, k, a_index=a_index, zero_tail=zero_tail)
    R = al.sorted_ids.numel()
    assert a.shape == (R, H) and a.dtype == dtype and m.shape == (R,) and m.dtype == torch.int32
    n, sid, live = live_rows(al)
    src = sid[live] // k
    src = a_index.cpu().long()[src] if index_dtype else src
    a, m = a.cpu(), m.cpu()
    assert torch.equal(a[:n][live], x.cpu()[src])
    assert (a[:n][~live] == 0).all(), "padding rows below num_padded must be zeros"
    want_m = torch.where(live, al.expert_ids.cpu().long()[torch.arange(n) // bm], -1)
    assert torch.equal(m[:n].long(), want_m) and (m[n:] == -1).all()
    if zero_tail:
        assert (a[n:] == 0).all()


def test_permute_rows_wide_hidden():
    """H and I past one column tile (512, 2048) and not multiples of it; a gathered index; float32."""
    ids = torch.tensor([[0, 2], [2, 1], [0, 1]], dtype=torch.int32, device=DEV)
    al = ma.moe_align(ids, 3, 16)
    x = torch.randn(5, 1030, device=DEV)
    index = torch.tensor([4, 0, 2], device=DEV)
    a, m = mp.permute_rows(x, al, 2, a_index=index)
    n, sid, live = live_rows(al)
    assert torch.equal(a.cpu()[:n][live], x.cpu()[index.cpu()[sid[live] // 2]])
    y = torch.randn(al.sorted_ids.numel(), 1030, device=DEV)
    out = mp.unpermute_sum(y, al, 3, 2)
    assert torch.allclose(out.cpu(), y.cpu()[positions(al)].view(3, 2, 1030).sum(1), atol=1e-6)
    h = torch.randn(3, 2 * 2100, device=DEV)  # I past one column tile (2048) too
    assert_close_dtype(ms.silu_mul(h), silu_ref(h), torch.float32)


def silu_ref(h):
    gate, up = h.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(h.dtype)


def assert_close_dtype(out, want, dtype):
    tol = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)}[dtype]
    torch.testing.assert_close(out.cpu(), want.cpu(), rtol=tol[0], atol=tol[1])


@settings(max_examples=50)
@given(st.integers(0, 70), st.sampled_from([8, 24, 40]), st.sampled_from(DTYPES),
       st.sampled_from(["all", "m", "masked", "masked_bound"]), st.integers(0, 2 ** 16))
def test_silu_mul(R, I, dtype, mode, seed):
    """masked_bound: the masked rows on a grid sized by the rows in use (max_rows = sum(masked_m))."""
    g = torch.Generator().manual_seed(seed)
    E, cap = 3, max(1, R // 3)
    bound, mode = mode == "masked_bound", mode.replace("_bound", "")
    shape = (E, cap) if mode == "masked" else (R,)
    h = (torch.randn(*shape, 2 * I, generator=g) * 3).to(DEV, dtype)
    sentinel = 7.0
    out = torch.full((*shape, I), sentinel, dtype=dtype, device=DEV)
    if mode == "m":
        m = torch.randint(-1, 4, (R,), generator=g, dtype=torch.int32)
        got = ms.silu_mul(h, out, m_indices=m.to(DEV))
        keep = m >= 0
    elif mode == "masked":
        counts = torch.randint(0, cap + 1, (E,), generator=g)
        got = ms.silu_mul(h, out, masked_m=counts.to(DEV), max_rows=int(counts.sum()) if bound else None)
        keep = torch.arange(cap)[None, :] < counts[:, None]
    else:
        got = ms.silu_mul(h)
        keep = torch.ones(shape, dtype=torch.bool)
    assert got.shape == (*shape, I) and got.dtype == dtype
    got, want = got.cpu(), silu_ref(h.cpu())
    assert_close_dtype(got[keep], want[keep], dtype)
    assert (got[~keep] == sentinel).all(), "skipped rows must be left unwritten"


@settings(max_examples=50)
@given(routings(), st.sampled_from(DTYPES), st.sampled_from([None, torch.float32, torch.float16]),
       st.booleans())
def test_unpermute_sum(case, dtype, w_dtype, stale):
    T, k, E, H, bm, ids, g = case
    al = ma.moe_align(ids, E, bm)
    R = al.sorted_ids.numel()
    y = torch.randn(R, H, generator=g).to(DEV, dtype)
    tw = (torch.rand(T, k, generator=g) + 0.1).to(DEV, w_dtype) if w_dtype else None
    pos = positions(al)
    inv = None
    if stale and T:  # pairs with no row point at another pair's row: must be ignored
        inv = mp.inverse_rows(al)
        live_pos = pos[pos >= 0]
        if live_pos.numel():
            inv[(pos < 0).to(DEV)] = int(live_pos[0])
    out = mp.unpermute_sum(y, al, T, k, tw, inv=inv)
    assert out.shape == (T, H) and out.dtype == dtype
    rows = torch.where(pos[:, None] >= 0, y.cpu().double()[pos.clamp(min=0)], 0.0)
    w = tw.cpu().double().reshape(-1, 1) if tw is not None else 1.0
    want = (rows * w).view(T, k, H).sum(1).to(dtype)
    assert_close_dtype(out, want, dtype)


def test_unpermute_contiguous_plain():
    """k = 1, no weights, a contiguous alignment: out[i] = y[pos(i)]; rows past sum(counts) are zeros."""
    counts = torch.tensor([3, 0, 17, 1], device=DEV)
    N = 23  # 2 rows no expert owns
    al = ma.moe_align_contiguous(counts, N, 16)
    y = torch.randn(al.sorted_ids.numel(), 24, device=DEV)
    out = mp.unpermute_sum(y, al, N, 1).cpu()
    pos = positions(al)
    assert torch.equal(out[:21], y.cpu()[pos[:21]]) and (out[21:] == 0).all()


def grouped_gemm(a, m, w):
    """DeepGEMM stand-in: d[r] = a[r] @ w[m[r]].T in float32 rounded to a's dtype; NaN where m == -1 (the
    real kernel computes or skips those rows; no live row may ever read them)."""
    d = torch.full((a.shape[0], w.shape[1]), float("nan"), dtype=a.dtype, device=a.device)
    live = m >= 0
    if live.any():
        d[live] = torch.bmm(w[m[live].long()].float(), a[live].float()[:, :, None])[:, :, 0].to(a.dtype)
    return d


@settings(max_examples=30)
@given(routings(), st.sampled_from([torch.float32, torch.float16]), st.sampled_from([16, 48]))
def test_chain_matches_float64_reference(case, dtype, I):
    T, k, E, H, bm, ids, g = case
    ids = torch.where(ids >= E, 0, ids)  # real experts only (the oracle drops nothing); repeats are fine
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEV, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEV, dtype)
    tw = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
    al = ma.moe_align(ids, E, bm)
    a, m = mp.permute_rows(x, al, k)
    h = grouped_gemm(a, m, w13)
    act = ms.silu_mul(h, torch.full((a.shape[0], I), float("nan"), dtype=dtype, device=DEV), m_indices=m)
    out = mp.unpermute_sum(grouped_gemm(act, m, w2), al, T, k, tw)
    want = reference.moe_experts(x, ids, tw, (w13, w2))
    assert torch.isfinite(out).all(), "a padding row leaked into the output"
    if T:
        err = float((out.double().cpu() - want).norm() / want.norm().clamp_min(1e-12))
        assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]} ({dtype})"


def test_empty_and_errors():
    al = ma.moe_align(torch.zeros(0, 2, dtype=torch.int32, device=DEV), 4, 16)
    a, m = mp.permute_rows(torch.zeros(0, 32, device=DEV), al, 2)
    assert a.shape == (0, 32) and m.shape == (0,)
    assert mp.unpermute_sum(a, al, 0, 2).shape == (0, 32)
    assert ms.silu_mul(torch.zeros(0, 32, device=DEV)).shape == (0, 16)
    al = ma.moe_align(torch.tensor([[0, 1], [1, 2]], dtype=torch.int32, device=DEV), 3, 16)
    x = torch.randn(2, 32, device=DEV)
    with pytest.raises(TypeError, match="x must be one of"):
        mp.permute_rows(x.to(torch.int32), al, 2)
    with pytest.raises(ValueError, match="x must have unit stride"):
        mp.permute_rows(torch.randn(32, 2, device=DEV).T, al, 2)
    with pytest.raises(ValueError, match="x must have at least ceil"):
        mp.permute_rows(x, al, 1)
    with pytest.raises(ValueError, match="a_div must be"):
        mp.permute_rows(x, al, 0)
    with pytest.raises(ValueError, match="a_index must be contiguous with at least 2"):
        mp.permute_rows(x, al, 2, a_index=torch.zeros(1, dtype=torch.int64, device=DEV))
    with pytest.raises(TypeError, match="align must be"):
        mp.permute_rows(x, object(), 2)
    with pytest.raises(ValueError, match="h must have an even"):
        ms.silu_mul(torch.randn(4, 33, device=DEV))
    with pytest.raises(TypeError, match="m_indices must be one of"):
        ms.silu_mul(torch.randn(4, 32, device=DEV), m_indices=torch.zeros(4, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="out must be"):
        ms.silu_mul(torch.randn(4, 32, device=DEV), torch.empty(4, 15, device=DEV))
    with pytest.raises(ValueError, match="not both"):
        ms.silu_mul(torch.randn(4, 32, device=DEV), m_indices=torch.zeros(4, dtype=torch.int32),
                    masked_m=torch.zeros(1, dtype=torch.int32))
    y = torch.randn(al.sorted_ids.numel(), 32, device=DEV)
    with pytest.raises(ValueError, match="align must sort T\\*k = 6"):
        mp.unpermute_sum(y, al, 3, 2)
    with pytest.raises(ValueError, match="topk_weights must be"):
        mp.unpermute_sum(y, al, 2, 2, torch.ones(2, 3, device=DEV))


@settings(max_examples=40)
@given(routings(), st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2))
def test_with_capacity_masked_layout(case, dtype, spare):
    """with_capacity moves each expert's aligned rows to e * cap: permute_rows then writes the masked layout
    [E, cap, H] (live rows in order, zeros to the padded count, m_indices -1 after it), and unpermute_sum
    reads the same sums back as from the contiguous alignment."""
    T, k, E, H, bm, ids, g = case
    al = ma.moe_align(ids, E, bm)
    pc = al.padded_counts.cpu()
    cap = (int(pc.max()) // bm + spare) * bm if E else 0
    mal, live = mc.with_capacity(al, cap)
    assert mal.sorted_ids.shape == (E * cap,) and int(mal.num_padded) == E * cap
    assert mal.expert_ids.tolist() == [e for e in range(E) for _ in range(cap // bm)]
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    a, m = mp.permute_rows(x, mal, k)
    a = a.cpu().view(E, cap, H)
    n, sids, _ = live_rows(al)
    assert live.tolist() == [int(((sids[int(s):int(s) + int(p)]) < al.num_rows).sum())
                             for s, p in zip(torch.cumsum(pc, 0) - pc, pc)]
    start = 0
    for e in range(E):
        p = int(pc[e])
        mine = sids[start:start + p]
        want = torch.where((mine < al.num_rows)[:, None], x.cpu()[mine.clamp(max=max(T * k - 1, 0)) // k], 0.0)
        assert torch.equal(a[e, :p], want.to(dtype))
        assert m.cpu().view(E, cap)[e, :p].tolist() == [e if int(i) < al.num_rows else -1 for i in mine]
        assert (m.cpu().view(E, cap)[e, p:] == -1).all()
        start += p
    if cap:  # the compact grid (only the padded counts' rows visited) writes the same rows
        ac, none = mp.permute_rows(x, mal, k, capacity=cap)
        ac, start = ac.cpu().view(E, cap, H), torch.cumsum(pc, 0) - pc
        assert none is None and all(torch.equal(ac[e, :int(pc[e])], a[e, :int(pc[e])]) for e in range(E))
        with pytest.raises(ValueError, match="capacity must be 0 or the capacity"):
            mp.permute_rows(x, mal, k, capacity=cap + bm)
        # live counts: each expert's live rows (first in its block) written, every other row left as it was
        sentinel = torch.full((E * cap, H), 7.0, dtype=dtype, device=DEV)
        al_, none = mp.permute_rows(x, mal, k, capacity=cap, live=live, out=sentinel)
        assert al_ is sentinel and none is None
        al_ = al_.cpu().view(E, cap, H)
        for e in range(E):
            n_live = int(live[e])
            assert torch.equal(al_[e, :n_live], a[e, :n_live]) and (al_[e, n_live:] == 7.0).all()
        with pytest.raises(ValueError, match="live must come with a capacity"):
            mp.permute_rows(x, mal, k, capacity=cap, live=live.long())
        with pytest.raises(ValueError, match="live must come with a capacity"):
            mp.permute_rows(x, al, k, live=live)
        with pytest.raises(ValueError, match="out must be"):
            mp.permute_rows(x, mal, k, capacity=cap, out=sentinel[1:])
        # a group of the experts at a time: the same rows, each group's sums added up in float32
        y = torch.randn(E * cap, H, generator=g).to(DEV, dtype)
        tw = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
        whole = mp.unpermute_sum(y, mal, T, k, tw).cpu().double()
        acc = torch.zeros(T, H, dtype=torch.float32, device=DEV)
        e_mid = E // 2
        for e0, e1 in ((0, e_mid), (e_mid, E)):
            gal, glive = mc.with_capacity(al, cap, experts=(e0, e1))
            assert gal.sorted_ids.tolist() == mal.sorted_ids[e0 * cap:e1 * cap].tolist()
            assert glive.tolist() == live[e0:e1].tolist() and int(gal.num_padded) == (e1 - e0) * cap
            assert gal.padded_counts.tolist() == al.padded_counts[e0:e1].tolist()
            assert gal.expert_ids.tolist() == [e for e in range(e1 - e0) for _ in range(cap // bm)]
            ga, _ = mp.permute_rows(x, gal, k, capacity=cap, live=glive)
            for e in range(e1 - e0):
                n_live = int(glive[e])
                assert torch.equal(ga.cpu().view(e1 - e0, cap, H)[e, :n_live], a[e0 + e, :n_live])
            assert mp.unpermute_sum(y[e0 * cap:e1 * cap], gal, T, k, tw, accumulate=acc) is acc
        assert torch.allclose(acc.cpu().double(), whole, rtol=TOL[dtype], atol=TOL[dtype])
        with pytest.raises(ValueError, match="experts must be a pair"):
            mc.with_capacity(al, cap, experts=(1, E + 1))
        with pytest.raises(ValueError, match="accumulate must be float32"):
            mp.unpermute_sum(y, mal, T, k, tw, accumulate=acc.to(torch.float16))
    y = torch.randn(E * cap, H, generator=g).to(DEV, dtype)
    tw = (torch.rand(T, k, generator=g) + 0.1).to(DEV)
    got = mp.unpermute_sum(y, mal, T, k, tw).cpu().double()
    # the same rows of y through the contiguous alignment: aligned row r of expert e is at e * cap + r - start_e
    starts = torch.cumsum(pc, 0) - pc
    ycont = torch.zeros(max(al.sorted_ids.numel(), 1), H, dtype=dtype)
    for e in range(E):
        p = int(pc[e])
        ycont[int(starts[e]):int(starts[e]) + p] = y.cpu()[e * cap:e * cap + p]
    want = mp.unpermute_sum(ycont[:al.sorted_ids.numel()].to(DEV), al, T, k, tw).cpu().double()
    assert torch.allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_with_capacity_refuses_a_short_capacity():
    counts = torch.tensor([5, 40], device=DEV)
    al = ma.moe_align_contiguous(counts, 45, 16)
    with pytest.raises(ValueError, match="multiple of block_m"):
        mc.with_capacity(al, 40)
    if not al.padded_counts.is_cuda:
        with pytest.raises(ValueError, match="below an expert's padded count"):
            mc.with_capacity(al, 32)
