"""Code that runs inside spawned gloo ranks for tests/test_pipeline.py: every schedule of the MoE layer over
the torch and torch_fixed comms, saved per rank for the parent to compare.

Dimension legend: T tokens on a rank, H hidden, E experts, W ranks.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from nanomoe_fn import TorchComm, TorchFixedComm, shard_moe_params
from nanomoe_fn.moe.layer import MOE_PROGRAM, run_moe
from nanomoe_fn.pipeline import sequential, shared_expert_overlap, two_batch_overlap
from tests.dist_worker import _init, case_inputs, case_placement

SCHEDULES = {
    "sequential": lambda: sequential(MOE_PROGRAM),
    "shared_overlap": lambda: sequential(shared_expert_overlap(MOE_PROGRAM)),
    "tbo": lambda: two_batch_overlap(MOE_PROGRAM),
    "tbo+shared": lambda: two_batch_overlap(shared_expert_overlap(MOE_PROGRAM)),
}


def _comms(case: dict, n: int) -> list:
    if case.get("comm") == "torch_fixed":
        return [TorchFixedComm(case["comm_capacity"], timeout_s=60) for _ in range(n)]
    return [TorchComm(timeout_s=60) for _ in range(n)]


def run_schedules(rank: int, world_size: int, port: int, cases: list[dict], out_dir: str) -> None:
    """Each case under every schedule (two-batch overlap with one comm and with one per micro-batch);
    saves {schedule: out} to out_dir/case{i}_rank{rank}.pt."""
    _init(rank, world_size, port, 60)
    try:
        for i, case in enumerate(cases):
            cfg, params, x = case_inputs(case, rank)
            placement = case_placement(case, cfg, world_size)
            local = shard_moe_params(params, placement, rank)
            outs = {}
            for name, make in SCHEDULES.items():
                plan = make()
                outs[name] = run_moe(plan, local, x, cfg, _comms(case, 1)[0], placement, case["backend"])
                if plan.micro_batches == 2:
                    outs[name + "/2comms"] = run_moe(plan, local, x, cfg, _comms(case, 2), placement, case["backend"])
            torch.save(outs, os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_compiled(rank: int, world_size: int, port: int, case: dict, out_dir: str) -> None:
    """One case through OpComm (the torch comm behind custom ops: its decode mode, or with case["gathered"] its
    prefill mode, whose batch size depends on the routing): every schedule eager, and compiled with
    fullgraph=True (aot_eager); also the plain comm eager. Saves {name: out}."""
    from nanomoe_fn.comm.ops import OpComm

    _init(rank, world_size, port, 60)
    try:
        cfg, params, x = case_inputs(case, rank)
        placement = case_placement(case, cfg, world_size)
        local = shard_moe_params(params, placement, rank)
        T_max = None if case.get("gathered") else max(case["tokens"])
        outs = {"plain": run_moe(SCHEDULES["sequential"](), local, x, cfg, TorchComm(max_tokens=T_max, timeout_s=60),
                                 placement, case["backend"])}
        for name, make in SCHEDULES.items():
            plan = make()
            comm = OpComm(TorchComm(max_tokens=T_max, timeout_s=60), placement)

            def layer(x: torch.Tensor, plan=plan, comm=comm) -> torch.Tensor:  # noqa: ANN001
                return run_moe(plan, local, x, cfg, comm, placement, case["backend"], case.get("capacity"))

            outs[name] = layer(x)
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
            outs[name + "+compile"] = compiled(x)
            outs[name + "+compile/again"] = compiled(x.flip(0))  # a second call: the graph, not the trace
            outs[name + "/again"] = layer(x.flip(0))
        torch.save(outs, os.path.join(out_dir, f"compiled_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
