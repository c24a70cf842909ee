"""The DeepGEMM expert backend (kernels/deepgemm.py, glue in kernels/moe_permute.py and moe_silu.py) on the GPU
in bfloat16.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked),
S sampled tokens. `deepgemm_fused_moe` against the float64 oracle (reference.moe_experts) at small T and
the float32 per-token check (reference_rows) on sampled tokens at large T and DeepSeek-V3 dims; the
contiguous, gathered and masked batches through expert_ffn(backend="deepgemm") against backend="loop";
CUDA-graph capture of the whole path. Marked `gpu`; skipped with supports()'s reason without DeepGEMM.
"""

import nanomoe_reference as reference
import pytest
import torch
from nanomoe_kernels import deepgemm, deepgemm_layout
from nanomoe_kernels.deepgemm_layout import pick_layout
from nanomoe_kernels.moe_align import moe_align
from nanomoe_reference.expert_rows import make_routing, make_weights, reference_rows

from nanomoe_fn.batch import ExpertBatch, to_masked
from nanomoe_fn.moe.experts import expert_ffn
from nanomoe_fn.moe.params import SwiGLUExperts
from tests.helpers import capture_graph

OK, WHY = deepgemm.supports() if torch.cuda.is_available() else (False, "needs CUDA")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"DeepGEMM unavailable: {WHY}")]
BF16_TOL = 2e-2


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    return float((out.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm().clamp_min(1e-30))


def case(T, E, k, H, I, seed=0):
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=seed)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=seed + 1)
    return x, ids, tw, w


def check_fused(out, x, ids, tw, w):
    T = x.shape[0]
    if T <= 64:
        assert rel_err(out, reference.moe_experts(x, ids, tw, w)) < BF16_TOL
    else:
        sample = torch.linspace(0, T - 1, 8, device="cuda").long().unique()
        assert rel_err(out[sample], reference_rows(x, ids, tw, w, "swiglu", sample)) < BF16_TOL


@pytest.mark.parametrize("T", [1, 64, 1024])
def test_fused_moe_matches_reference(T):
    x, ids, tw, w = case(T, 8, 4, 1024, 512, seed=T)
    out = deepgemm.deepgemm_fused_moe(x, ids, tw, w)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    check_fused(out, x, ids, tw, w)
    al = moe_align(ids, 8, deepgemm.alignment())  # a pre-made alignment gives the same result
    assert torch.equal(deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al), out)


@pytest.mark.parametrize("layout", ["contiguous", "masked", "bounded", "auto"])
@pytest.mark.parametrize("T, skew", [(1, False), (64, False), (1024, False), (1024, True)])
def test_fused_moe_layouts(layout, T, skew):
    """DeepGEMM's contiguous and masked layouts (and "auto", which picks one) give the same sums; skew sends
    every token to expert 0 (auto then keeps the contiguous layout: the masked buffers would be too big; the
    bounded capacity, T rows, is then exactly expert 0's count)."""
    E, k = (32, 2) if skew else (8, 4)
    x, ids, tw, w = case(T, E, k, 1024, 512, seed=T + skew)
    if skew:
        ids[:, 0] = 0
        ids[:, 1] = 1 + torch.arange(T, device="cuda") % (E - 1)
        al = moe_align(ids, E, deepgemm.alignment())
        A = deepgemm.alignment()
        assert pick_layout(al, E, "auto", A, flop_per_row=1e12) == ("contiguous", 0)  # worth it, but too big
        assert pick_layout(al, E, "masked", A) == ("masked", 1024)
        assert pick_layout(al, E, "auto", A, flop_per_row=1e12, bound_rows=T, bytes_per_row=2) == ("bounded", 1024)
    out = deepgemm.deepgemm_fused_moe(x, ids, tw, w, layout=layout)
    check_fused(out, x, ids, tw, w)
    other = deepgemm.deepgemm_fused_moe(x, ids, tw, w, layout="contiguous")
    assert rel_err(out, other) < 1e-2


def test_layout_is_checked():
    x, ids, tw, w = case(4, 8, 2, 256, 128)
    with pytest.raises(ValueError, match="layout must be one of"):
        deepgemm.deepgemm_fused_moe(x, ids, tw, w, layout="padded")


def test_fused_moe_deepseek_dims():
    """E=32, H=7168, I=2048, top-8, T=1024: sampled tokens vs float32."""
    x, ids, tw, w = case(1024, 32, 8, 7168, 2048)
    check_fused(deepgemm.deepgemm_fused_moe(x, ids, tw, w), x, ids, tw, w)


def test_fused_moe_empty_and_bad_alignment():
    x, ids, tw, w = case(0, 8, 2, 256, 128)
    assert deepgemm.deepgemm_fused_moe(x, ids, tw, w).shape == (0, 256)
    x, ids, tw, w = case(4, 8, 2, 256, 128)
    with pytest.raises(ValueError, match="DeepGEMM's alignment"):
        deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=moe_align(ids, 8, 16))


def batches(T, E, k, H, seed):
    """(x [T, H], contiguous, gathered and masked batches of the (token, k) pairs grouped by expert)."""
    x, ids, _, _ = case(T, E, k, H, 64, seed=seed)
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    token = order // k
    contiguous = ExpertBatch(x[token], counts, "contiguous")
    cap = max(1, int(counts.max()))  # not a multiple of the alignment: the masked path pads it
    return {"contiguous": contiguous, "gathered": ExpertBatch(x, counts, "gathered", index=token.to(torch.int32)),
            "masked": to_masked(contiguous, cap)}


@pytest.mark.parametrize("layout", ["contiguous", "gathered", "masked"])
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_expert_ffn_backend_matches_loop(layout, T):
    E, k, H, I = 8, 4, 1024, 512
    w13, w2 = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=5)
    experts = SwiGLUExperts(w13, w2)
    batch = batches(T, E, k, H, seed=T)[layout]
    got = expert_ffn(experts, batch, backend="deepgemm")
    want = expert_ffn(experts, batch, backend="loop")
    assert got.layout == want.layout
    if layout == "masked":
        c = batch.counts.tolist()
        got_x = torch.cat([got.x[e, :n] for e, n in enumerate(c)])
        want_x = torch.cat([want.x[e, :n] for e, n in enumerate(c)])
    else:
        got_x, want_x = got.x, want.x
    assert rel_err(got_x, want_x) < BF16_TOL


def test_contiguous_and_masked_against_float64():
    E, H, I = 4, 512, 256
    counts = torch.tensor([3, 0, 150, 40], device="cuda")
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
    rows = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device="cuda"), counts)[:, None]
    want = reference.moe_experts(rows, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.float32), w)
    assert deepgemm.alignment() in (64, 128, 256)
    assert rel_err(deepgemm.deepgemm_moe_contiguous(rows, counts, w), want) < BF16_TOL
    perm = torch.randperm(rows.shape[0], device="cuda")  # token rows in another order, read via the index
    index = torch.argsort(perm)
    assert rel_err(deepgemm.deepgemm_moe_gathered(rows[perm], index, counts, w), want) < BF16_TOL
    for layout in ("masked", "bounded"):  # bounded: a capacity of G = 193 rows (256 aligned), no host read
        got = deepgemm.deepgemm_moe_gathered(rows[perm], index, counts, w, layout=layout)
        assert rel_err(got, want) < BF16_TOL
    with pytest.raises(ValueError, match="needs bound_rows"):  # sorted rows: no bound is known
        deepgemm.deepgemm_moe_contiguous(rows, counts, w, layout="bounded")
    cap = 256
    xm = torch.zeros(E, cap, H, device="cuda", dtype=torch.bfloat16)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    for e, (s, c) in enumerate(zip(starts, counts.tolist())):
        xm[e, :c] = rows[s:s + c]
    ym = deepgemm.deepgemm_moe_masked(xm, counts, w, expected_m=64)
    assert rel_err(torch.cat([ym[e, :c] for e, c in enumerate(counts.tolist())]), want) < BF16_TOL


@pytest.mark.parametrize("prealigned, T, layout", [(True, 64, "auto"), (False, 64, "auto"), (False, 1024, "auto"),
                                                    (True, 1024, "bounded"), (False, 1024, "bounded")])
def test_cuda_graph_capture(prealigned, T, layout):
    """No host sync: the whole path (with or without the align step) captures and replays on new inputs, in
    the contiguous layout and in the masked one with the bounded capacity (T rows per expert)."""
    E, k, H, I = 8, 4, 512, 256
    x, ids, tw, w = case(T, E, k, H, I, seed=3)
    al = moe_align(ids, E, deepgemm.alignment()) if prealigned else None

    def run():
        return deepgemm.deepgemm_fused_moe(x, ids, tw, w, align=al, layout=layout)

    graph, out = capture_graph(run)
    x2, ids2, tw2, _ = case(T, E, k, H, I, seed=4)
    x.copy_(x2), tw.copy_(tw2)
    if not prealigned:  # the alignment is inside the graph: new routing too
        ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    check_fused(out, x, ids, tw, w)


@pytest.mark.parametrize("graph", [False, True])
def test_bounded_layout_in_groups_of_experts(monkeypatch, graph):
    """Past BOUNDED_MAX_BYTES the bounded layout runs its experts in groups (3, 3 and 2 of 8 here), each group's
    sums added in float32: the same result as the contiguous layout and the oracle, sync-free (a CUDA graph
    replays it on new inputs), for the fused entry and a gathered batch (bound = its token rows)."""
    E, k, H, I, T = 8, 4, 1024, 512, 1024
    row = (H + 3 * I) * 2
    monkeypatch.setattr(deepgemm_layout, "BOUNDED_MAX_BYTES", 3 * T * row)
    assert deepgemm_layout.experts_per_group(E, T, row) == 3
    x, ids, tw, w = case(T, E, k, H, I, seed=11)

    def run():
        return deepgemm.deepgemm_fused_moe(x, ids, tw, w, layout="bounded")

    if graph:
        g, out = capture_graph(run)
        x2, ids2, tw2, _ = case(T, E, k, H, I, seed=12)
        x.copy_(x2), ids.copy_(ids2), tw.copy_(tw2)
        g.replay()
        torch.cuda.synchronize()
    else:
        out = run()
    check_fused(out, x, ids, tw, w)
    assert rel_err(out, deepgemm.deepgemm_fused_moe(x, ids, tw, w, layout="contiguous")) < 1e-2
    if not graph:
        rows = torch.randn(300, H, device="cuda", dtype=torch.bfloat16)
        flat = ids[:300].reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=E)
        index = (order // k).to(torch.int32)
        monkeypatch.setattr(deepgemm_layout, "BOUNDED_MAX_BYTES", 3 * 384 * row)  # G = 300 rows: cap 384
        got = deepgemm.deepgemm_moe_gathered(rows, index, counts, w, layout="bounded")
        want = deepgemm.deepgemm_moe_gathered(rows, index, counts, w, layout="contiguous")
        assert rel_err(got, want) < 1e-2


def test_bounded_layout_refuses_an_expert_past_its_bound():
    """A gathered batch whose index repeats a row within an expert can exceed the bounded capacity (G rows):
    an async device assert naming the bound, not a dropped row (in a subprocess: the assert ends its context)."""
    import subprocess
    import sys

    code = """
import torch
from nanomoe_kernels import deepgemm
from nanomoe_reference.expert_rows import make_weights
w = make_weights(2, 256, 128, "swiglu", torch.bfloat16, "cuda")
rows = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
index = torch.zeros(300, dtype=torch.int32, device="cuda")  # one token row, 300 times, all to expert 0
y = deepgemm.deepgemm_moe_gathered(rows, index, torch.tensor([300, 0], device="cuda"), w, layout="bounded")
torch.cuda.synchronize()
print("NO ERROR", y.shape)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "NO ERROR" not in run.stdout, run.stdout + run.stderr[-2000:]
    assert "the bound of DeepGEMM's masked layout" in run.stderr or "device-side assert" in run.stderr, \
        run.stderr[-2000:]
