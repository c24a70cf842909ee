"""Expert parallelism at an odd world size: 3 gloo ranks (and 1), every gloo comm, every schedule.

One spawn of 3 ranks (tests/odd_worker.py) runs all of it; the tests below read what each rank saved:
- values: for the torch comm (exact splits), its decode mode (max_tokens) and torch_fixed, with 6, 8 (over 9
  slots: a redundant slot makes them divide) and 12 experts, uneven token counts with a rank of 0 tokens and
  all ranks at 0, every token on one rank's experts, redundant EPLB slots (static and dynamic remap): moe_layer
  and every schedule (sequential, shared-expert overlap, two-batch overlap with one comm and with two, both)
  on every rank equal the single-rank layer and the float64 reference; the same cases at world size 1;
- a rebalance at 3 ranks (record the load, rebalance, move the weights) leaves the output unchanged;
- errors: expert counts that 3 does not divide are refused naming the argument; torch_fixed's rank capacity
  overflowing is a ValueError on every rank, also when only one rank's tokens overflow.
"""

from __future__ import annotations

import pytest
import torch

from nanomoe_fn import moe_layer
from nanomoe_fn.comm.launch import free_port
from tests import odd_worker
from tests.dist_worker import case_inputs
from tests.helpers import MIN_MARGIN, assert_close_to_ref, reference_layer, spawn_bounded

pytestmark = pytest.mark.slow

W = 3
SIX = dict(hidden=16, intermediate=8, num_experts=6, top_k=2, n_shared_experts=1)
TWELVE = dict(hidden=16, intermediate=8, num_experts=12, top_k=3, score_func="sigmoid", correction_bias=True,
              n_group=3, topk_group=2, n_shared_experts=1)
EIGHT = dict(hidden=8, intermediate=8, num_experts=8, top_k=2, expert_type="linear")  # over 9 slots


def _cases() -> list[dict]:
    cases = []
    for n, comm in enumerate(("torch", "torch_decode", "torch_fixed")):
        shapes = [
            dict(cfg=SIX, dtype="float32", tokens=[5, 0, 9], backend="bmm"),  # uneven, a rank with no tokens
            dict(cfg=SIX, dtype="float32", tokens=[0, 0, 0], backend="loop"),  # every rank idle
            dict(cfg=SIX, dtype="float32", tokens=[4, 7, 3], backend="bmm", hot=[2, 3]),  # all on rank 1's experts
            dict(cfg=TWELVE, dtype="float64", tokens=[3, 8, 1], backend="loop", redundant=3,
                 remap_policy="dynamic"),
            dict(cfg=EIGHT, dtype="float32", tokens=[6, 2, 0], backend="bmm", redundant=1),
            dict(cfg=SIX, dtype="float32", tokens=[7, 1, 5], backend="loop", hot=[4, 5], replicate=[4, 5, 4],
                 remap_policy="dynamic"),
        ]
        for i, case in enumerate(shapes):
            case.update(seed=100 * n + i, comm=comm, comm_capacity=max(1, max(case["tokens"])))
        shapes[0]["capacity"] = 14 if comm == "torch" else None  # the experts on a fixed capacity
        if comm == "torch_fixed":
            shapes[2]["rank_capacity"] = 14  # rank 1 sends itself 7 tokens x 2 experts: exactly full
        cases += shapes
    return cases


CASES = _cases()
RUNS = {"layer", "sequential", "shared_overlap", "tbo", "tbo/2comms", "tbo+shared", "tbo+shared/2comms"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("odd")
    spawn_bounded(odd_worker.run_all, W, (W, free_port(), CASES, str(out)), 180, "3 gloo ranks")
    return [torch.load(out / f"rank{r}.pt") for r in range(W)]


def _check_case(i: int, case: dict, rank: int, outs: dict) -> int:
    """Every run of case i on `rank` equals the single-rank layer and (away from routing near-ties) the
    reference; returns 1 when the reference was compared."""
    assert set(outs) == RUNS, f"case {i} rank {rank}: {sorted(outs)}"
    cfg, params, x = case_inputs(case, rank)
    single = moe_layer(params, x, cfg, backend=case["backend"]).double()
    ref, margin = reference_layer(params, x, cfg)
    what = f"case {i} ({case.get('comm', 'torch')}, tokens {case['tokens']}) rank {rank}"
    tol = torch.float32 if x.dtype == torch.float64 else x.dtype  # router and combine sum in float32
    for name, out in outs.items():
        assert out.dtype == x.dtype, f"{what} {name}: {out.dtype}"
        assert_close_to_ref(out, single, tol, f"{what} {name} vs single-rank")
        if margin > MIN_MARGIN or case.get("hot"):
            assert_close_to_ref(out, ref, tol, f"{what} {name} vs reference")
    return int(margin > MIN_MARGIN or bool(case.get("hot")))


def test_every_comm_and_schedule_at_three_ranks_equals_single_rank(saved):
    compared = 0
    for i, case in enumerate(CASES):
        for rank in range(W):
            compared += _check_case(i, case, rank, saved[rank]["cases"][i])
    assert compared >= len(CASES) * W * 3 // 4


def test_the_same_cases_at_one_rank(saved):
    got = saved[0]["cases_w1"]
    assert len(got) == len(CASES)
    for i, case in enumerate(CASES):
        _check_case(i, {**case, "tokens": case["tokens"][:1]}, 0, got[i])


def test_rebalance_at_three_ranks_keeps_the_output(saved):
    from nanomoe_fn.eplb import balancedness, gpu_loads

    for rank in range(W):
        reb = saved[rank]["rebalance"]
        cfg, params, x = odd_worker.skewed_case(W, rank)
        ref, _ = reference_layer(params, x, cfg)
        assert len(reb["outs"]) == 4
        for step, out in enumerate(reb["outs"]):  # 2 before the move, 2 after (exact splits, decode mode)
            assert_close_to_ref(out, ref, torch.float32, f"rank {rank} step {step}")
        assert torch.equal(reb["phy2log_new"], saved[0]["rebalance"]["phy2log_new"]), "ranks disagree"
        load = reb["load"].double()
        before = balancedness(gpu_loads(load, reb["phy2log_old"][None], W))
        after = balancedness(gpu_loads(load, reb["phy2log_new"][None], W))
        assert float(after.min()) > float(before.min()), (before, after)


def test_expert_counts_three_does_not_divide_are_refused_by_name(saved):
    for rank in range(W):
        err = saved[rank]["errors"]
        for key in ("identity", "layer"):
            assert err[key].startswith("ValueError: ") and "world_size (3)" in err[key] \
                and "num_experts (8)" in err[key], (key, err[key])
        assert err["phy2log"].startswith("ValueError: world_size (3) must divide") and "len(phy2log)" in \
            err["phy2log"], err["phy2log"]
        assert err["rebalance"] == "ValueError: num_replicas (8) must be a multiple of num_gpus (3)", err["rebalance"]


def test_rank_capacity_overflow_is_an_error_on_every_rank(saved):
    for key in ("overflow_all", "overflow_one"):  # every rank overflows; only rank 0's tokens do
        for rank in range(W):
            message = saved[rank][key]
            assert message.startswith(f"ValueError: rank {rank}: more than rank_capacity=1 rows for one "
                                      f"destination rank"), (key, rank, message)
            senders = "[0]" if key == "overflow_one" else "[0, 1, 2]"
            assert f"(sent by rank(s) {senders})" in message, (key, rank, message)
    # every rank raised before the payload: the group is still in step, the next round is right
    for rank in range(W):
        cfg, params, x = case_inputs(CASES[0], rank)
        assert_close_to_ref(saved[rank]["after_overflow"], moe_layer(params, x, cfg).double(), torch.float32,
                            f"rank {rank} after the overflow")
