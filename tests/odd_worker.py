"""Code that runs inside spawned gloo ranks for tests/test_ranks_odd.py: one spawn of 3 ranks runs every case.

In order, on one process group of W ranks (the parent compares what each rank saved):
  1. value cases (tests/dist_worker.py's case format): moe_layer and every schedule of tests/pipeline_worker.py
     (two-batch overlap with one comm and with one per micro-batch) over the case's comm ('torch' exact
     splits, 'torch_decode' = TorchComm(max_tokens=...), 'torch_fixed');
  2. the same cases at world size 1, on rank 0 alone (a one-rank subgroup passed as the comms' `group`);
  3. a rebalance: serve a skewed layer, rebalance (EPLB, redundant slots), move the weights, serve again;
  4. errors: expert counts the world size does not divide, torch_fixed's rank capacity overflowing on every
     rank, then on one rank only (last: before the fix the other ranks waited for it until their timeout).

Dimension legend: T tokens on a rank, H hidden, E experts, W ranks.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nanomoe_fn import MoEConfig, MoEParams, Placement, TorchComm, TorchFixedComm, moe_layer, shard_moe_params
from nanomoe_fn.moe.layer import run_moe
from tests.dist_worker import _init, case_inputs, case_placement, error_of, serve_rebalance_serve
from tests.pipeline_worker import SCHEDULES


def make_comm(case: dict, group: object = None, timeout_s: float = 60) -> object:
    """The case's comm: 'torch' (exact splits, the default), 'torch_decode' or 'torch_fixed'."""
    if case.get("comm") == "torch_fixed":
        return TorchFixedComm(case["comm_capacity"], case.get("rank_capacity"), group=group, timeout_s=timeout_s)
    if case.get("comm") == "torch_decode":
        return TorchComm(group, timeout_s=timeout_s, max_tokens=case["comm_capacity"])
    return TorchComm(group, timeout_s=timeout_s)


def run_case(case: dict, rank: int, world_size: int, group: object = None) -> dict[str, torch.Tensor]:
    """{name: out} of this rank's tokens: moe_layer, then every schedule (one comm, and one per micro-batch)."""
    cfg, params, x = case_inputs(case, rank)
    placement = case_placement(case, cfg, world_size)
    local = shard_moe_params(params, placement, rank)
    outs = {"layer": moe_layer(local, x, cfg, make_comm(case, group), placement, case["backend"],
                               case.get("capacity"))}
    for name, make in SCHEDULES.items():
        plan = make()
        outs[name] = run_moe(plan, local, x, cfg, make_comm(case, group), placement, case["backend"],
                             case.get("capacity"))
        if plan.micro_batches == 2:
            comms = [make_comm(case, group) for _ in range(2)]
            outs[name + "/2comms"] = run_moe(plan, local, x, cfg, comms, placement, case["backend"],
                                             case.get("capacity"))
    return outs


def skewed_case(world_size: int, rank: int) -> tuple[MoEConfig, MoEParams, torch.Tensor]:
    """4 experts per rank; the router favours the last rank's experts, so the load is skewed."""
    case = dict(cfg=dict(hidden=16, intermediate=8, num_experts=4 * world_size, top_k=2, n_shared_experts=1),
                dtype="float32", seed=23, tokens=[3 + 4 * r for r in range(world_size)])
    cfg, params, x = case_inputs(case, rank)
    w = params.gate.weight.clone()
    w[-4:] *= 3.0
    return cfg, MoEParams(type(params.gate)(w, None), params.experts, params.shared), x


def _rebalance(rank: int, W: int) -> dict:
    cfg, params, x = skewed_case(W, rank)
    return serve_rebalance_serve(rank, W, cfg, params, x, rounds=2, after=(TorchComm(timeout_s=60, max_tokens=4 * W),))


def _errors(rank: int, W: int) -> dict[str, str]:
    """The error each host-side refusal gives on this rank (checks before any exchange: the group stays usable)."""
    from nanomoe_fn import init_moe_params
    from nanomoe_fn.eplb import rebalance_experts

    E = 3 * W - 1  # not a multiple of W
    cfg = MoEConfig(hidden=8, intermediate=4, num_experts=E, top_k=2)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 8)
    return {
        "identity": error_of(lambda: Placement.identity(E, W)),
        "phy2log": error_of(lambda: Placement.from_phy2log(torch.arange(E), E, W)),
        "layer": error_of(lambda: moe_layer(params, x, cfg, TorchComm(timeout_s=5))),
        "rebalance": error_of(lambda: rebalance_experts(torch.ones(1, E), E, 1, 1, W, "global")),
    }


def _overflow(rank: int, W: int, hot_ranks: list[int]) -> str:
    """torch_fixed with a rank capacity of 1 row: the ranks in hot_ranks send all 4 tokens to experts 0 and 1
    (both on rank 0: 8 rows for one rank), the others one token to an expert on their own rank and one on the
    next (one row for each: nothing overflows there)."""
    hot = [0, 1] if rank in hot_ranks else [2 * rank, 2 * ((rank + 1) % W)]
    case = dict(cfg=dict(hidden=16, intermediate=8, num_experts=2 * W, top_k=2), dtype="float32", seed=5,
                tokens=[4 if r in hot_ranks else 1 for r in range(W)], hot=hot)
    cfg, params, x = case_inputs(case, rank)
    placement = Placement.identity(cfg.num_experts, W)
    return error_of(lambda: moe_layer(shard_moe_params(params, placement, rank), x, cfg,
                                      TorchFixedComm(4, rank_capacity=1, timeout_s=3), placement))


def run_all(rank: int, world_size: int, port: int, cases: list[dict], out_dir: str) -> None:
    """Everything in the module docstring's order; saves out_dir/rank{rank}.pt."""
    _init(rank, world_size, port, 60)
    saved: dict = {}

    def save() -> None:
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))

    try:
        saved["cases"] = [run_case(case, rank, world_size) for case in cases]
        solo = dist.new_group([0])  # collective: every rank makes it, rank 0 alone uses it
        if rank == 0:
            saved["cases_w1"] = [run_case({**case, "tokens": case["tokens"][:1]}, 0, 1, solo) for case in cases]
        dist.barrier()
        saved["rebalance"] = _rebalance(rank, world_size)
        saved["errors"] = _errors(rank, world_size)
        saved["overflow_all"] = _overflow(rank, world_size, list(range(world_size)))
        save()
        saved["overflow_one"] = _overflow(rank, world_size, [0])  # last: a failure here leaves peers unpaired
        save()
        # every rank refused before the payload, so the group is still in step: a good round works
        cfg, params, x = case_inputs(cases[0], rank)
        placement = Placement.identity(cfg.num_experts, world_size)
        saved["after_overflow"] = moe_layer(shard_moe_params(params, placement, rank), x, cfg,
                                            TorchFixedComm(max(1, max(cases[0]["tokens"])), timeout_s=10), placement)
    finally:
        save()
        dist.destroy_process_group()
