"""The "gathered" ExpertBatch (x [R, H] token rows + index [M]): every expert backend against the
materialized contiguous batch and the float64 reference; argument errors; pytree and layout helpers.

Dimension legend: P_local local experts, R token rows of x (some unused), M batch rows (index [M]),
H hidden, I intermediate. Triton runs under TRITON_INTERPRET=1 on the CPU (float32/float16 only).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nanomoe_reference as reference  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from nanomoe_fn import EXPERT_BACKENDS, ExpertBatch, expert_ffn, preset  # noqa: E402
from nanomoe_fn.batch import Handle, row_coords, to_contiguous, to_masked  # noqa: E402
from nanomoe_fn.comm.plan import check_combine, stamp_handle  # noqa: E402
from nanomoe_fn.moe.params import LinearExperts, SwiGLUExperts  # noqa: E402
from tests.helpers import assert_close_to_ref  # noqa: E402

TRITON = "triton" in EXPERT_BACKENDS and EXPERT_BACKENDS["triton"].supports(preset("tiny"), torch.device("cpu"))[0]


def make_experts(P: int, H: int, I: int, kind: str, dtype: torch.dtype, g: torch.Generator):
    if kind == "linear":
        return LinearExperts((torch.randn(P, H, H, generator=g) * H ** -0.5).to(dtype))
    return SwiGLUExperts((torch.randn(P, 2 * I, H, generator=g) * H ** -0.5).to(dtype),
                         (torch.randn(P, H, I, generator=g) * I ** -0.5).to(dtype))


@st.composite
def gathered_problems(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """(experts, gathered batch): P_local 0-6, counts with zeros (M = 0 too), R token rows of which some
    are never read, repeated indices (several batch rows on one token row)."""
    P = draw(st.integers(0, 6))
    counts = draw(st.lists(st.integers(0, 9), min_size=P, max_size=P))
    M = sum(counts)
    H = draw(st.sampled_from([8, 16, 24, 40]))
    I = draw(st.sampled_from([8, 16, 24]))
    kind = draw(st.sampled_from(["swiglu", "linear"]))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    used = draw(st.integers(1, max(1, M)))  # distinct token rows read: fewer than M means repeats
    R = used + draw(st.integers(0, 5))  # plus rows nobody reads
    pool = torch.randperm(R, generator=g)[:used]
    index = pool[torch.randint(0, used, (M,), generator=g)] if M else torch.zeros(0, dtype=torch.int64)
    if M >= used:
        index[torch.randperm(M, generator=g)[:used]] = pool  # every pooled row read at least once
    index = index.to(draw(st.sampled_from([torch.int32, torch.int64])))
    x = torch.randn(R, H, generator=g).to(dtype)
    batch = ExpertBatch(x, torch.tensor(counts, dtype=torch.int64), "gathered", index)
    return make_experts(P, H, I, kind, dtype, g), batch


def reference_rows(experts, batch: ExpertBatch) -> torch.Tensor:
    """float64 [M, H]: batch row m = expert_e(x[index[m]]), expert by the counts."""
    rows = batch.x[batch.index.long()]
    expert, _ = row_coords(batch)
    out = torch.zeros(batch.num_rows, batch.x.shape[1], dtype=torch.float64)
    for e in range(batch.num_experts):
        sel = expert == e
        if not sel.any():
            continue
        if isinstance(experts, SwiGLUExperts):
            out[sel] = reference.swiglu(rows[sel], experts.w13[e], experts.w2[e])
        else:
            out[sel] = reference.linear(rows[sel], experts.w[e])
    return out


def _check_result(y: ExpertBatch, batch: ExpertBatch) -> None:
    assert y.layout == "contiguous" and y.index is None and y.counts is batch.counts
    assert tuple(y.x.shape) == (batch.num_rows, batch.x.shape[1]) and y.x.dtype == batch.x.dtype


@given(gathered_problems(), st.sampled_from(["loop", "bmm"]))
def test_torch_backends_gathered_equal_contiguous(prob, backend):
    experts, batch = prob
    y = expert_ffn(experts, batch, backend)
    _check_result(y, batch)
    assert torch.equal(y.x, expert_ffn(experts, batch.materialize(), backend).x)
    assert_close_to_ref(y.x, reference_rows(experts, batch), batch.x.dtype, f"expert_ffn[{backend}] gathered")


@pytest.mark.skipif(not TRITON, reason="triton runs on a GPU or under TRITON_INTERPRET=1")
@settings(max_examples=30)
@given(gathered_problems(dtypes=(torch.float32, torch.float16)))
def test_triton_gathered_matches_contiguous(prob):
    experts, batch = prob
    y = expert_ffn(experts, batch, "triton")
    _check_result(y, batch)
    want = expert_ffn(experts, batch.materialize(), "triton").x
    if batch.x.dtype == torch.float32 and want.numel():
        err = float((y.x.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))
        assert torch.equal(y.x, want) or err <= 1e-6, err
    else:
        assert_close_to_ref(y.x, want.double(), batch.x.dtype, "triton gathered vs contiguous")
    assert_close_to_ref(y.x, reference_rows(experts, batch), batch.x.dtype, "expert_ffn[triton] gathered")


def _experts(P: int = 4, H: int = 8) -> LinearExperts:
    return LinearExperts(torch.randn(P, H, H))


def _gathered(index, counts=(1, 1, 3, 0), R: int = 6) -> ExpertBatch:
    return ExpertBatch(torch.randn(R, 8), torch.tensor(counts), "gathered", index)


@pytest.mark.parametrize("batch, err, message", [
    (lambda: _gathered(torch.tensor([0, 1, 6, 2, 2])), ValueError, r"^batch\.index must lie in \[0, R=6\)"),
    (lambda: _gathered(torch.tensor([0, -1, 5, 2, 2])), ValueError, r"^batch\.index must lie in \[0, R=6\)"),
    (lambda: _gathered(torch.tensor([0]), counts=(1, 0, 0, 0), R=0), ValueError, r"^batch\.index must lie in"),
    (lambda: _gathered(torch.tensor([0.0, 1, 5, 2, 2])), TypeError, r"^batch\.index must have dtype in"),
    (lambda: _gathered(torch.tensor([0, 1, 5, 2, 2], dtype=torch.int16)), TypeError,
     r"^batch\.index must have dtype in"),
    (lambda: _gathered(torch.tensor([[0, 1, 5, 2, 2]])), ValueError, r"^batch\.index must have 1 dims"),
    (lambda: _gathered([0, 1, 5, 2, 2]), TypeError, r"^batch\.index must be a torch\.Tensor, got list"),
    (lambda: _gathered(torch.tensor([0, 1, 5, 2])), ValueError,
     r"^batch\.counts must be >= 0 and sum to the 4 rows of batch\.index \(gathered\)"),
    (lambda: _gathered(torch.tensor([0, 1, 5, 2, 2]), counts=(1, 1, 3)), ValueError,
     r"^batch\.counts must have one entry per local expert \(4\), got 3"),
    (lambda: ExpertBatch(torch.randn(6, 8, 1), torch.tensor([1, 1, 3, 0]), "gathered", torch.zeros(5).long()),
     ValueError, r"^batch\.x must have 2 dims"),
])
def test_gathered_errors_name_the_argument(batch, err, message):
    for backend in ("loop", "bmm") + (("triton",) if TRITON else ()):
        with pytest.raises(err, match=message):
            expert_ffn(_experts(), batch(), backend)


def test_no_local_experts_but_rows():
    with pytest.raises(ValueError, match=r"^batch\.index has 2 rows but there are no local experts"):
        expert_ffn(_experts(0), ExpertBatch(torch.randn(3, 8), torch.zeros(0, dtype=torch.int64), "gathered",
                                            torch.tensor([0, 1])))
    y = expert_ffn(_experts(0), ExpertBatch(torch.randn(3, 8), torch.zeros(0, dtype=torch.int64), "gathered",
                                            torch.zeros(0, dtype=torch.int32)))
    assert y.layout == "contiguous" and y.x.shape == (0, 8)


def test_index_goes_with_the_gathered_layout_only():
    with pytest.raises(ValueError, match=r"^ExpertBatch\.index must be given for the 'gathered' layout"):
        ExpertBatch(torch.randn(3, 8), torch.tensor([2]), "gathered")
    for layout, x in (("contiguous", torch.randn(2, 8)), ("masked", torch.randn(1, 2, 8))):
        with pytest.raises(ValueError, match=rf"^ExpertBatch\.index must be None for the '{layout}' layout"):
            ExpertBatch(x, torch.tensor([2]), layout, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^ExpertBatch\.layout must be one of \('contiguous', 'masked', "
                                         r"'gathered'\)"):
        ExpertBatch(torch.randn(2, 8), torch.tensor([2]), "scattered")


def test_pytree_round_trip_and_layout_helpers():
    x, index, counts = torch.randn(5, 8), torch.tensor([4, 0, 0, 2, 4, 1], dtype=torch.int32), torch.tensor([2, 0, 4])
    batch = ExpertBatch(x, counts, "gathered", index)
    leaves, spec = pytree.tree_flatten(batch)
    assert len(leaves) == 3 and leaves[0] is x and leaves[1] is counts and leaves[2] is index
    back = pytree.tree_unflatten([t.clone() for t in leaves], spec)
    assert back.layout == "gathered" and torch.equal(back.x, x) and torch.equal(back.index, index)
    assert back.index is not index and torch.equal(back.counts, counts)
    paths = [p for p, _ in pytree.tree_flatten_with_path(batch)[0]]
    assert [p[0].name for p in paths] == ["x", "counts", "index"]
    # contiguous and masked batches have no index leaf: tree_map only ever sees tensors
    cont = ExpertBatch(torch.randn(6, 8), counts)
    assert len(pytree.tree_leaves(cont)) == 2
    moved = pytree.tree_map(lambda t: t.clone(), cont)
    assert moved.index is None and moved.layout == "contiguous" and torch.equal(moved.x, cont.x)
    # materialize, with_x, row_coords, to_masked / to_contiguous
    m = batch.materialize()
    assert m.layout == "contiguous" and m.index is None and torch.equal(m.x, x[index.long()]) and m.counts is counts
    assert cont.materialize() is cont and batch.num_rows == 6 and cont.num_rows == 6
    y = batch.with_x(torch.randn(6, 8))
    assert y.layout == "contiguous" and y.index is None and y.counts is counts
    assert [t.tolist() for t in row_coords(batch)] == [t.tolist() for t in row_coords(m)]
    masked = to_masked(batch, 4)
    assert torch.equal(masked.x, to_masked(m, 4).x)
    back = to_contiguous(masked, batch)
    assert back.layout == "contiguous" and torch.equal(back.x, m.x)


def test_handle_of_a_gathered_dispatch_takes_the_contiguous_output():
    class FakeComm:
        name = "fake"

    comm = FakeComm()
    batch = ExpertBatch(torch.randn(3, 8), torch.tensor([2, 3]), "gathered", torch.tensor([0, 1, 1, 2, 0]))
    handle = stamp_handle(comm, batch, Handle(torch.arange(5), torch.rand(3, 2)))
    assert handle.origin.layout == "gathered" and handle.origin.rows == (5,)
    assert "gathered [M=5, H=8]" in handle.origin.describe()
    with pytest.raises(ValueError, match=r"^y must be the contiguous ExpertBatch \[5, 8\] .*got layout 'gathered'"):
        check_combine(comm, batch, handle)
    with pytest.raises(ValueError, match=r"^y\.x must be \[5, 8\]"):
        check_combine(comm, ExpertBatch(torch.randn(3, 8), torch.tensor([2, 1])), handle)
    y = expert_ffn(_experts(2), batch, "loop")
    check_combine(comm, y, handle)  # accepted (and the handle is now used up)
    with pytest.raises(ValueError, match=r"^handle is stale"):
        check_combine(comm, y, handle)

