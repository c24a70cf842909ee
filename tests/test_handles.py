"""Handles know which dispatch made them; combine and expert_ffn refuse the wrong arguments by name.

One process: the local comm, and the torch / torch_fixed comms on a 1-rank gloo group (their checks
are host-side, so one rank exercises them all). Two spawned gloo ranks: a wrong handle is refused
before any collective, on every rank that passes it, and a peer that passed the right one ends with
its comm's timeout instead of waiting forever. NvlinkComm and DeepEPComm need GPUs: here only their
host-side handle checks run, on bare instances (no buffers); their GPU tests cover the rest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nanomoe_fn import ExpertBatch, Handle, LocalComm, Placement, TorchComm, TorchFixedComm, combine
from nanomoe_fn import dispatch as dispatch_batch
from nanomoe_fn.batch import Routing, to_masked
from nanomoe_fn.comm.deepep import DeepEPComm, DeepEPHandle
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.comm.nvlink import NvlinkComm, NvlinkHandle
from nanomoe_fn.moe.experts import expert_ffn
from nanomoe_fn.moe.params import LinearExperts
from tests.helpers import spawn_bounded


def inputs(T: int = 6, H: int = 8, E: int = 4, k: int = 2, W: int = 1, seed: int = 0):
    """x [T, H], a routing with k distinct experts per token, the identity placement over W ranks."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32).view(T, k)
    return torch.randn(T, H, generator=g), Routing(ids, torch.rand(T, k, generator=g)), Placement.identity(E, W)


def dispatch(x: torch.Tensor, routing: Routing, comm, placement: Placement) -> tuple[ExpertBatch, Handle]:
    """dispatch with the batch in batch-row order: what identity experts give combine (a gathered batch, as
    the torch comm delivers, materialised)."""
    batch, handle = dispatch_batch(x, routing, comm, placement)
    return batch.materialize(), handle


def expected(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """combine(dispatch(x)) with identity experts."""
    return x * routing.topk_weights.sum(1, keepdim=True)


@pytest.fixture(scope="module", autouse=True)
def group():
    """A 1-rank gloo group for the torch comms."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def make(kind: str):
    return {"local": LocalComm, "torch": lambda: TorchComm(timeout_s=5),
            "torch_fixed": lambda: TorchFixedComm(8, timeout_s=5)}[kind]()


KINDS = ["local", "torch", "torch_fixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_handle_from_another_comm_instance(kind):
    x, routing, placement = inputs()
    comm, twin = make(kind), make(kind)
    batch, handle = dispatch(x, routing, comm, placement)
    with pytest.raises(ValueError, match=rf"^handle comes from another comm \(a {kind} comm's dispatch #1"):
        combine(batch, handle, twin)
    torch.testing.assert_close(combine(batch, handle, comm), expected(x, routing))  # refused, not consumed


@pytest.mark.parametrize("kind", KINDS)
def test_stale_handle_is_refused_and_overlapped_dispatches_work(kind):
    x, routing, placement = inputs()
    comm = make(kind)
    b1, h1 = dispatch(x, routing, comm, placement)
    combine(b1, h1, comm)
    with pytest.raises(ValueError, match=r"^handle is stale: .*dispatch #1 .*already combined.*latest is dispatch #1"):
        combine(b1, h1, comm)
    x2, r2, _ = inputs(seed=1)
    b2, h2 = dispatch(x, routing, comm, placement)
    b3, h3 = dispatch(x2, r2, comm, placement)  # two dispatches open (overlapped micro-batches): both combine
    torch.testing.assert_close(combine(b2, h2, comm), expected(x, routing))
    torch.testing.assert_close(combine(b3, h3, comm), expected(x2, r2))
    with pytest.raises(ValueError, match=r"^handle is stale: .*dispatch #2 .*latest is dispatch #3"):
        comm.combine_send(b2, h2)


@pytest.mark.parametrize("kind, other", [("torch", "torch_fixed"), ("torch_fixed", "torch"), ("local", "torch")])
def test_handle_of_the_other_layout(kind, other):
    x, routing, placement = inputs()
    comm, foreign = make(kind), make(other)
    batch, _ = dispatch(x, routing, comm, placement)
    _, theirs = dispatch(x, routing, foreign, placement)
    layout = {"torch_fixed": "masked", "torch": "gathered"}.get(other, "contiguous")
    with pytest.raises(ValueError, match=rf"^handle comes from another comm \(a {other} comm's dispatch #1 \({layout}"):
        comm.combine_send(batch, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_y(kind):
    x, routing, placement = inputs()
    comm = make(kind)
    batch, handle = dispatch(x, routing, comm, placement)
    want = str(list(batch.x.shape)).replace("[", r"\[").replace("]", r"\]")
    cases = [(batch.with_x(batch.x[:-1]), ValueError, rf"^y\.x must be {want} in torch.float32 \(the rows"),
             (batch.with_x(torch.cat([batch.x, batch.x[..., :1]], -1)), ValueError, rf"^y\.x must be {want}"),
             (batch.with_x(batch.x.double()), ValueError, r"^y\.x must be .* in torch\.float32 .*in torch\.float64"),
             (batch.x, TypeError, r"^y must be an ExpertBatch .*got Tensor")]
    if batch.layout == "contiguous":
        cases.append((to_masked(batch, 12), ValueError, r"^y must be the contiguous ExpertBatch .*got layout 'masked'"))
    else:
        rows = ExpertBatch(batch.x.reshape(-1, batch.x.shape[-1]), batch.counts)
        cases.append((rows, ValueError, r"^y must be the masked ExpertBatch .*got layout 'contiguous'"))
    for y, err, message in cases:
        with pytest.raises(err, match=message):
            comm.combine_send(y, handle)
    torch.testing.assert_close(combine(batch, handle, comm), expected(x, routing))


@pytest.mark.parametrize("kind", KINDS)
def test_handle_not_from_a_dispatch(kind):
    x, routing, placement = inputs()
    comm = make(kind)
    batch, handle = dispatch(x, routing, comm, placement)
    t = torch.zeros(1, dtype=torch.int64)
    foreign = [(NvlinkHandle(t, id(comm), 1, 0, 0), "NvlinkHandle"),
               (DeepEPHandle("normal", id(comm), None, t, t.float(), 1), "DeepEPHandle"), ((batch, handle), "tuple")]
    for bad, name in foreign:
        with pytest.raises(ValueError, match=rf"^handle must be the Handle that this {kind} comm's dispatch returned, "
                                             rf"got {name}$"):
            comm.combine_send(batch, bad)
    with pytest.raises(ValueError, match=r"^handle has no origin \(built by hand\?\)"):
        comm.combine_send(batch, Handle(handle.send_order, handle.topk_weights, handle.recv_order,
                                        handle.send_splits, handle.recv_splits, handle.slot_pos, handle.pack_index))
    with pytest.raises(ValueError, match=r"^handle\.topk_weights must be \[T=6, k=2\] as dispatched, got \(5, 2\)"):
        comm.combine_send(batch, replace(handle, topk_weights=handle.topk_weights[:5]))


def test_torch_combine_refuses_the_gathered_batch_itself():
    x, routing, placement = inputs()
    comm = make("torch")
    batch, handle = dispatch_batch(x, routing, comm, placement)
    assert batch.layout == "gathered" and batch.x.stride(0) > batch.x.shape[1]  # received rows, packed pair data after
    with pytest.raises(ValueError, match=r"^y must be the contiguous ExpertBatch \[12, 8\] .*got layout 'gathered'"):
        comm.combine_send(batch, handle)
    torch.testing.assert_close(combine(batch.materialize(), handle, comm), expected(x, routing))


@pytest.mark.parametrize("kind", ["torch", "torch_fixed"])
def test_dispatch_recv_refuses_another_comms_pending(kind):
    x, routing, placement = inputs()
    comm, other = make(kind), make("torch_fixed" if kind == "torch" else "torch")
    pending = other.dispatch_send(x, routing, placement)
    got = "_Pending" if kind == "torch_fixed" else "tuple"  # the other comm's record
    with pytest.raises(ValueError, match=rf"^pending must be what this {kind} comm's dispatch_send returned, "
                                         rf"got {got}"):
        comm.dispatch_recv(pending)
    other.dispatch_recv(pending)
    with pytest.raises(ValueError, match=r"^pending must be .*got Tensor"):
        LocalComm().dispatch_recv(x)


def test_handle_is_a_pytree_with_static_origin():
    x, routing, placement = inputs()
    comm = LocalComm()
    batch, handle = dispatch(x, routing, comm, placement)
    leaves, spec = pytree.tree_flatten(handle)
    assert [type(v) for v in leaves if v is not None] == [torch.Tensor, torch.Tensor]  # origin is no leaf
    moved = pytree.tree_unflatten([v if v is None else v.clone() for v in leaves], spec)
    assert moved.origin == handle.origin and moved.origin.call == 1 and moved.origin.rows == (12,)
    torch.testing.assert_close(combine(batch, moved, comm), expected(x, routing))


def test_compiled_round_trip_keeps_one_graph():
    """Under torch.compile no call number is recorded (it would force a recompile per call): the same
    compiled dispatch + combine serves calls after call without recompiling (fullgraph, 1-entry cache)."""
    torch._dynamo.reset()
    x, routing, placement = inputs()
    comm = LocalComm()
    fn = torch.compile(lambda x, r: combine(*dispatch(x, r, comm, placement), comm), fullgraph=True,
                       backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for _ in range(3):
            torch.testing.assert_close(fn(x, routing), expected(x, routing))


def test_nvlink_and_deepep_refuse_a_torch_handle():
    """Bare instances (no GPU buffers): only the host-side handle checks at the top of combine_send run."""
    x, routing, placement = inputs()
    batch, handle = dispatch(x, routing, LocalComm(), placement)
    nv = object.__new__(NvlinkComm)
    nv._err_np, nv._bufs = np.zeros(3, dtype=np.int64), {}   # not closed (close() sets _bufs to None)
    with pytest.raises(ValueError, match=r"^handle must come from this NvlinkComm's dispatch_recv$"):
        nv.combine_send(batch, handle)
    with pytest.raises(ValueError, match=r"^handle must be the DeepEPHandle from this comm's dispatch_recv, got Hand"):
        object.__new__(DeepEPComm).combine_send(batch, handle)


def experts(P: int = 4, H: int = 8, dtype: torch.dtype = torch.float32) -> LinearExperts:
    return LinearExperts(torch.randn(P, H, H, dtype=dtype))


@pytest.mark.parametrize("batch, err, message", [
    (ExpertBatch(torch.randn(5, 8), torch.tensor([1, 1, 3])), ValueError, r"^batch\.counts must have one entry per "
     r"local expert \(4\), got 3"),
    (ExpertBatch(torch.randn(5, 6), torch.tensor([1, 1, 3, 0])), ValueError, r"^batch\.x must have hidden size 8"),
    (ExpertBatch(torch.randn(5, 8).half(), torch.tensor([1, 1, 3, 0])), TypeError, r"^batch\.x must have dtype in "
     r"\['torch\.float32'\], got torch\.float16"),
    (ExpertBatch(torch.randn(5, 8), torch.tensor([1.0, 1, 3, 0])), TypeError, r"^batch\.counts must have dtype in"),
    (ExpertBatch(torch.randn(5, 8), torch.tensor([[1, 1, 3, 0]])), ValueError, r"^batch\.counts must have 1 dims"),
    (ExpertBatch(torch.randn(5, 8), [1, 1, 3, 0]), TypeError, r"^batch\.counts must be a torch\.Tensor, got list"),
    (ExpertBatch(torch.randn(5, 8), torch.tensor([1, 1, 2, 0])), ValueError, r"^batch\.counts must be >= 0 and sum "
     r"to the 5 rows of batch\.x"),
    (ExpertBatch(torch.randn(5, 8), torch.tensor([3, -1, 3, 0])), ValueError, r"^batch\.counts must be >= 0"),
    (ExpertBatch(torch.randn(4, 0, 8), torch.zeros(4, dtype=torch.int64), "masked"), ValueError,
     r"^masked batch\.x must be \[4, C >= 1, 8\], got \(4, 0, 8\)"),
    (ExpertBatch(torch.randn(3, 2, 8), torch.zeros(3, dtype=torch.int64), "masked"), ValueError,
     r"^batch\.counts must have one entry per local expert \(4\), got 3"),
    (ExpertBatch(torch.randn(4, 2, 8), torch.tensor([0, 3, 1, 0]), "masked"), ValueError,
     r"^batch\.counts must lie in \[0, C=2\]"),
    (ExpertBatch(torch.randn(4, 2, 8), torch.tensor([0, -1, 1, 0], dtype=torch.int32), "masked"), ValueError,
     r"^batch\.counts must lie in \[0, C=2\]"),
    ((torch.randn(5, 8), torch.tensor([1, 1, 3, 0])), TypeError, r"^batch must be an ExpertBatch"),
])
def test_expert_ffn_names_the_wrong_argument(batch, err, message):
    for backend in ("loop", "bmm"):
        with pytest.raises(err, match=message):
            expert_ffn(experts(), batch, backend)


def test_expert_ffn_wrong_params_and_good_edges():
    with pytest.raises(TypeError, match=r"^expert_params must be SwiGLUExperts or LinearExperts, got dict"):
        expert_ffn({"w": torch.randn(4, 8, 8)}, ExpertBatch(torch.randn(1, 8), torch.tensor([1, 0, 0, 0])))
    ok = [ExpertBatch(torch.randn(0, 8), torch.zeros(4, dtype=torch.int64)),
          ExpertBatch(torch.randn(4, 2, 8), torch.tensor([0, 2, 1, 0], dtype=torch.int32), "masked")]
    for batch in ok:  # empty batches and full experts are fine
        assert expert_ffn(experts(), batch).x.shape == batch.x.shape


# ---- two gloo ranks -------------------------------------------------------------------------------

def _err(fn, *args) -> str:
    try:
        fn(*args)
        return "no error"
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        return f"{type(err).__name__}: {err}"


def two_rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every rank passes wrong handles (refused, no collective), then combines properly; finally rank 0
    alone passes a wrong handle while rank 1 combines with the right one and must time out."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=10))
    groups = {kind: dist.new_group([0, 1]) for kind in ("torch", "torch_fixed")}
    x, routing, placement = inputs(T=5, W=world_size, seed=rank)
    comms = {"torch": TorchComm(groups["torch"], timeout_s=2), "torch_fixed": TorchFixedComm(8, None, groups[
        "torch_fixed"], timeout_s=2)}
    out, late = {}, {}
    for kind, comm in comms.items():
        other = comms["torch_fixed" if kind == "torch" else "torch"]
        twin = TorchComm(groups[kind], 2) if kind == "torch" else TorchFixedComm(8, None, groups[kind], 2)
        batch, handle = dispatch(x, routing, comm, placement)
        o_batch, o_handle = dispatch(x, routing, other, placement)
        out[f"{kind}/other_comm"] = _err(twin.combine_send, batch, handle)
        out[f"{kind}/other_layout"] = _err(comm.combine_send, batch, o_handle)
        out[f"{kind}/y_rows"] = _err(comm.combine_send, batch.with_x(batch.x[:-1]), handle)
        combine(o_batch, o_handle, other)
        diff = (combine(batch, handle, comm) - expected(x, routing)).abs().max()
        out[f"{kind}/round_trip"] = f"max error {float(diff):.2e}"
        out[f"{kind}/stale"] = _err(comm.combine_send, batch, handle)
        late[kind] = (handle, *dispatch(x, routing, comm, placement))
    for kind, (stale, batch, handle) in late.items():  # rank 0 alone passes a wrong handle
        t0 = time.monotonic()
        out[f"{kind}/one_wrong"] = _err(combine, batch, stale if rank == 0 else handle, comms[kind])
        out[f"{kind}/one_wrong_s"] = round(time.monotonic() - t0, 2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    deadline = time.monotonic() + 20  # keep rank 0 alive until rank 1 has timed out and written
    while rank == 0 and not os.path.exists(os.path.join(out_dir, "rank1.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)  # no teardown: a gloo thread may still hold the exchange rank 0 never joined


def test_two_ranks_wrong_handle_raises_everywhere_without_hanging(tmp_path):
    spawn_bounded(two_rank_worker, 2, (2, free_port(), str(tmp_path)), 90, "the 2-rank wrong-handle test")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, out in enumerate(res):
        for kind, other in (("torch", "torch_fixed"), ("torch_fixed", "torch")):
            assert out[f"{kind}/other_comm"].startswith(f"ValueError: handle comes from another comm (a {kind} comm's")
            assert out[f"{kind}/other_layout"].startswith(f"ValueError: handle comes from another comm (a {other}")
            assert out[f"{kind}/y_rows"].startswith("ValueError: y.x must be [")
            assert float(out[f"{kind}/round_trip"].split()[-1]) < 1e-5, out[f"{kind}/round_trip"]
            assert out[f"{kind}/stale"].startswith("ValueError: handle is stale"), out
            if rank == 0:  # refused at once, before any collective
                assert out[f"{kind}/one_wrong"].startswith("ValueError: handle is stale"), out
                assert out[f"{kind}/one_wrong_s"] < 1.0
            else:  # the peer ends with its comm's timeout (2 s) naming the stage, never an endless wait
                assert out[f"{kind}/one_wrong"].startswith("TimeoutError: rank 1: EP stage 'combine/payload'"), out
                assert 1.5 < out[f"{kind}/one_wrong_s"] < 10


def test_every_comm_backend_has_the_whole_interface():
    """Every registered comm implements the Comm protocol's methods (close included: callers such as the CLI
    and the workers call it on whatever comm they built); the single-rank comm still works after close."""
    import inspect

    from nanomoe_fn.comm import COMM_BACKENDS, Comm

    methods = [n for n, v in vars(Comm).items() if inspect.isfunction(v)]
    assert {"dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "close"} <= set(methods)
    for name, cls in COMM_BACKENDS.items():
        missing = [m for m in methods if not callable(getattr(cls, m, None))]
        assert not missing, f"comm {name!r} lacks {missing}"
    comm = LocalComm()
    comm.close()
    comm.close()
    x, routing, placement = inputs()
    batch, handle = dispatch(x, routing, comm, placement)
    torch.testing.assert_close(combine(batch, handle, comm), expected(x, routing))
