"""EPLB weight re-placement: the move plan replayed in one process, and real moves over 2 and 4 gloo ranks.

Dimension legend: E logical experts, P physical slots, W ranks, S_old / S_new local slots per rank.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.eplb import (
    begin_move,
    finish_move,
    global_load,
    init_recorder,
    placement_for_layer,
    plan_weight_moves,
    rebalance_experts,
    record,
    replace_expert_weights,
    run_move_round,
)
from nanomoe_fn.eplb.placement import Placement
from tests.helpers import spawn_bounded


def _random_placement(g: torch.Generator, E: int, P: int, W: int) -> Placement:
    """Every expert once, the P - E extra slots random experts, all slots shuffled."""
    extra = torch.randint(E, (P - E,), generator=g)
    phy2log = torch.cat([torch.arange(E), extra])[torch.randperm(P, generator=g)]
    return Placement.from_phy2log(phy2log, E, W)


def _expert_weights(pl: Placement, rank: int) -> dict[str, object]:
    """A pytree of per-slot leaves whose values are a function of the slot's logical expert."""
    e = pl.local_slots(rank)
    return {"w13": (e.double()[:, None, None] * 10 + torch.arange(6.0).view(1, 2, 3)).float(),
            "scale": (e * 7 + 1).to(torch.bfloat16)[:, None],
            "ids": [e.clone()]}


@given(st.sampled_from([1, 2, 3, 4]), st.integers(1, 6), st.integers(0, 3), st.integers(0, 3),
       st.integers(1, 4), st.integers(0, 2**16))
def test_move_plan_reproduces_new_layout(W: int, E: int, extra_old: int, extra_new: int, chunk: int,
                                         seed: int) -> None:
    """Replay the plan in one process: every rank ends with exactly the weights the new layout asks for."""
    g = torch.Generator().manual_seed(seed)
    E = E * W
    old = _random_placement(g, E, E + W * extra_old, W)
    new = _random_placement(g, E, E + W * extra_new, W)
    plan = plan_weight_moves(old, new, chunk)
    olds = [_expert_weights(old, r) for r in range(W)]
    news = [{"w13": torch.zeros(new.local_experts, 2, 3), "scale": torch.zeros(new.local_experts, 1,
             dtype=torch.bfloat16), "ids": [torch.full((new.local_experts,), -1)]} for _ in range(W)]
    flat = torch.utils._pytree.tree_leaves
    for r in range(W):
        for i, j in plan.copies[r]:
            for a, b in zip(flat(olds[r]), flat(news[r])):
                b[j] = a[i]
    for rnd in plan.rounds:
        for r in range(W):
            assert sum(t.src_rank == r for t in rnd) <= chunk and sum(t.dst_rank == r for t in rnd) <= chunk
        for t in rnd:
            assert old.phy2log[t.src_rank * old.local_experts + t.src_slot] not in old.local_slots(t.dst_rank)
            for a, b in zip(flat(olds[t.src_rank]), flat(news[t.dst_rank])):
                b[t.dst_slot] = a[t.src_slot]
    for r in range(W):
        for i, j in plan.duplicates[r]:
            for b in flat(news[r]):
                b[j] = b[i]
        want = _expert_weights(new, r)
        assert all(torch.equal(a, b) for a, b in zip(flat(news[r]), flat(want)))


def test_replace_expert_weights_single_rank_and_errors() -> None:
    old, new = Placement.identity(4, 1), Placement.from_phy2log(torch.tensor([3, 1, 0, 2, 3, 3]), 4, 1)
    got = replace_expert_weights(old, new, _expert_weights(old, 0), rank=0)
    want = _expert_weights(new, 0)
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(got),
                                                 torch.utils._pytree.tree_leaves(want)))
    with pytest.raises(ValueError, match="world_size"):
        plan_weight_moves(Placement.identity(4, 2), Placement.identity(4, 1))
    with pytest.raises(ValueError, match="chunk_experts"):
        plan_weight_moves(old, new, 0)
    with pytest.raises(ValueError, match=r"leaf 0 must be a tensor \[4"):
        replace_expert_weights(old, new, {"w": torch.zeros(3, 2)}, rank=0)


def _gloo_worker(rank: int, W: int, port: int, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=30))
    leaves = torch.utils._pytree.tree_leaves
    if mode == "timeout":  # rank 1 never joins the round: rank 0 must fail fast, naming itself
        old, new = Placement.identity(4, 2), Placement.from_phy2log(torch.tensor([2, 3, 0, 1]), 4, 2)
        if rank == 0:
            plan = plan_weight_moves(old, new, 1)
            staging = begin_move(plan, 0, _expert_weights(old, 0))
            with pytest.raises(RuntimeError, match="rank 0: EPLB weight move round 0"):
                run_move_round(plan, 0, 0, _expert_weights(old, 0), staging, timeout_s=1.0)
        else:
            time.sleep(3.0)
        return  # the timed-out pair is closed: no further collectives
    if mode == "agreement":  # rank 0 only sends (its round completes); rank 1 stops before finishing
        old = Placement.identity(4, 2)  # rank 0 holds experts 0, 1; rank 1 holds 2, 3
        new = Placement.from_phy2log(torch.tensor([0, 1, 1, 2, 3, 0]), 4, 2)  # rank 1 gains expert 0 from rank 0
        plan = plan_weight_moves(old, new, 1)
        weights = _expert_weights(old, rank)
        staging = begin_move(plan, rank, weights)
        for r in range(plan.num_rounds):
            run_move_round(plan, r, rank, weights, staging, timeout_s=1.0)
        if rank == 1:
            time.sleep(3.0)  # failed after its rounds (say): it never reaches the agreement step
            return
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 0: EPLB weight move: not every rank finished"):
            finish_move(plan, 0, staging, timeout_s=1.0)
        assert time.monotonic() - t0 < 2.5
        assert all(torch.equal(a, b) for a, b in zip(leaves(weights), leaves(_expert_weights(old, 0))))
        return
    state = record(init_recorder(2, 1, 4), torch.full((3, 1), rank), 0)  # rank r saw expert r 3 times
    assert torch.equal(global_load(state), torch.tensor([[3] * W + [0] * (4 - W)]))
    g = torch.Generator().manual_seed(1234)  # same cases on every rank
    for case in range(7):
        E = W * int(torch.randint(1, 5, (1,), generator=g))
        old = _random_placement(g, E, E + W * int(torch.randint(0, 3, (1,), generator=g)), W)
        new = _random_placement(g, E, E + W * int(torch.randint(0, 3, (1,), generator=g)), W)
        chunk = 1 + case % 3
        if case == 6:  # identity -> what EPLB asks for under Zipf load, 2 redundant slots per rank
            E = 8 * W
            old = Placement.identity(E, W)
            weight = 1.0 / (torch.randperm(E, generator=g).double() + 1)
            phy2log, _, _ = rebalance_experts(weight[None], E + 2 * W, 1, 1, W, "global")
            new = placement_for_layer(phy2log, 0, E, W)
        if case % 2:  # incremental: one round per serving step
            plan = plan_weight_moves(old, new, chunk)
            got = begin_move(plan, rank, _expert_weights(old, rank))
            for r in range(plan.num_rounds):
                run_move_round(plan, r, rank, _expert_weights(old, rank), got, timeout_s=20.0)
            got = finish_move(plan, rank, got)
        else:
            got = replace_expert_weights(old, new, _expert_weights(old, rank), rank, chunk, timeout_s=20.0)
        want = _expert_weights(new, rank)
        assert all(torch.equal(a, b) for a, b in zip(leaves(got), leaves(want))), (rank, case)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(W: int, mode: str, limit_s: float = 90.0) -> None:
    """Run _gloo_worker on W processes; fail (never hang) if they are not done within limit_s."""
    spawn_bounded(_gloo_worker, W, (W, free_port(), mode), limit_s, f"gloo EPLB test with {W} ranks ({mode})")


@pytest.mark.slow
@pytest.mark.parametrize("W", [2, 4])
def test_replace_expert_weights_over_gloo(W: int) -> None:
    _spawn(W, "move")


@pytest.mark.slow
def test_replace_expert_weights_peer_timeout() -> None:
    _spawn(2, "timeout")


@pytest.mark.slow
def test_no_rank_switches_placement_unless_every_rank_finished() -> None:
    # without the agreement step in finish_move, rank 0 (which only sends) would take the new placement
    # while rank 1 stayed on the old one: every later dispatch would then route with different tables
    _spawn(2, "agreement")
