"""EPLB on 2 GPUs over NCCL: serve, record, rebalance, move the expert weights, serve again.

Dimension legend: T tokens per rank, H hidden, I intermediate, E logical experts, R redundant slots,
P = E + R physical slots, W ranks, S = P // W slots per rank, k experts per token.

Each rank serves a skewed layer (the router favours rank 0's experts, one expert above all) with the
identity placement, records the routed load, rebalances with R redundant slots (every rank computes the
same placement from the load summed over ranks), moves the weights over NCCL round by round while it
keeps serving with the old weights between rounds, and serves again with the new placement (static
and dynamic remap) and then with zero tokens on rank 1. Checked in the ranks, with messages naming
rank, dtype and step: outputs equal the identity outputs within the dtype's tolerance and match the
float64 reference; the moved weights equal, bit for bit, the logical experts their new slots name;
moving back gives the old weights bit for bit; the received rows are better balanced after the move.
The whole run has a hard wall-clock bound (a hang fails the test and the ranks are terminated).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import nanomoe_reference as reference
import pytest
import torch
import torch.distributed as dist

from nanomoe_fn import MoEConfig, MoEParams, Placement, TorchComm, init_moe_params, moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.eplb import balancedness, placement_for_layer, rebalance_experts
from nanomoe_fn.eplb.move import begin_move, finish_move, plan_weight_moves, replace_expert_weights, run_move_round
from nanomoe_fn.eplb.placement import tokens_per_gpu
from nanomoe_fn.eplb.recorder import advance, global_load, init_recorder, record
from nanomoe_fn.moe.params import expert_tensors, select_experts
from nanomoe_fn.moe.route import route
from tests.helpers import MIN_MARGIN, TOL, spawn_bounded

pytestmark = pytest.mark.gpu

W, E, R, T = 2, 32, 8, 64
WALL_S = 200  # hard bound for the whole spawned run (NCCL init, Triton compiles, 3 combinations)
COMBOS = [("bfloat16", "triton"), ("bfloat16", "bmm"), ("float32", "bmm")]  # Triton fp32 dots are TF32
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-30))


def _inputs(rank: int, dtype: torch.dtype, device: torch.device) -> tuple[MoEConfig, MoEParams, torch.Tensor]:
    """Skewed layer (same on every rank) and this rank's tokens x [T, H]."""
    cfg = MoEConfig(hidden=512, intermediate=256, num_experts=E, top_k=4)
    params = init_moe_params(cfg, dtype, device, torch.Generator().manual_seed(11))
    gate = params.gate.weight.clone()
    gate[: E // W] *= 3.0  # rank 0's experts are favoured
    gate[3] *= 2.0  # and one of them above all
    x = torch.randn(T, cfg.hidden, generator=torch.Generator().manual_seed(100 + rank)).to(device, dtype)
    return cfg, MoEParams(type(params.gate)(gate, None), params.experts, None), x


def _received_balance(pl: Placement, ids: torch.Tensor, rank: int) -> float:
    """Balancedness (mean / max) of the rows each rank receives for everyone's ids under pl."""
    per_gpu = tokens_per_gpu(pl.to(ids.device).physical_ids(ids, rank), pl)
    dist.all_reduce(per_gpu)
    return float(balancedness(per_gpu.cpu()))


def _check(out: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> float:
    assert bool(torch.isfinite(out).all()), f"{what}: NaN/Inf in the output"
    assert tuple(out.shape) == tuple(want.shape), f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    err = _rel(out, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
    return err


def _run_combo(rank: int, dtype_name: str, backend: str, device: torch.device) -> dict:
    dtype = getattr(torch, dtype_name)
    tol, tag = TOL[dtype], f"rank {rank} {dtype_name}/{backend}"
    cfg, params, x = _inputs(rank, dtype, device)
    comm = TorchComm(timeout_s=60)
    old = Placement.identity(E, W)
    local = shard_moe_params(params, old, rank)
    routing = route(params.gate, x, cfg)
    # float64 reference on this rank's tokens, with the layer's own routing (checked against the reference
    # router where no near-tie makes float32 and float64 choices legitimately differ)
    ref_ids, _, margin = reference.route(x, params.gate.weight, cfg.top_k)
    if margin > MIN_MARGIN:
        assert torch.equal(routing.topk_ids.cpu().long(), ref_ids), f"{tag}: routing differs from the reference"
    ref = reference.moe_experts(x, routing.topk_ids.cpu(), routing.topk_weights.cpu(),
                                tuple(w.cpu() for w in expert_tensors(params.experts)))
    rec = init_recorder(window=4, num_layers=1, num_experts=E, device=device)
    outs = []
    for _ in range(3):  # serve, recording the load
        rec = advance(record(rec, route(params.gate, x, cfg).topk_ids, 0))
        outs.append(moe_layer(local, x, cfg, comm, old, backend))
    before = outs[0]
    errs = {"before_vs_ref": _check(before, ref, tol, f"{tag} before the move vs float64 reference")}
    for i, out in enumerate(outs[1:]):
        _check(out, before, tol, f"{tag} serving step {i + 1} vs step 0")
    load = global_load(rec).double()  # [1, E] summed over ranks: the same on every rank
    phy2log, _, _ = rebalance_experts(load, E + R, 1, 1, W, "global")
    new = placement_for_layer(phy2log, 0, E, W)
    assert not torch.equal(new.phy2log[:E], old.phy2log), f"{tag}: the rebalance moved nothing"
    # the move, round by round, serving with the old weights and placement between rounds
    plan = plan_weight_moves(old, new, chunk_experts=2)
    assert plan.num_rounds >= 2, f"{tag}: expected a multi-round move, got {plan.num_rounds} rounds"
    staging = begin_move(plan, rank, local.experts)
    for r in range(plan.num_rounds):
        run_move_round(plan, r, rank, local.experts, staging, timeout_s=60)
        _check(moe_layer(local, x, cfg, comm, old, backend), before, tol, f"{tag} serving during move round {r}")
    experts = finish_move(plan, rank, staging)
    want = select_experts(params.experts, new.local_slots(rank))
    for name, got, exp in zip(("w13", "w2"), expert_tensors(experts), expert_tensors(want)):
        assert tuple(got.shape) == ((E + R) // W, *exp.shape[1:]), f"{tag}: moved {name} shape {tuple(got.shape)}"
        bad = [j for j in range(got.shape[0]) if not torch.equal(got[j], exp[j])]
        assert not bad, (f"{tag}: moved {name} of local slots {bad[:8]} differ from logical experts "
                         f"{new.local_slots(rank)[bad[:8]].tolist()}")
    moved = MoEParams(local.gate, experts, None)
    for policy in ("static", "dynamic"):
        pl = new.with_policy(policy).to(device)
        after = moe_layer(moved, x, cfg, comm, pl, backend)
        errs[f"{policy}_vs_before"] = _check(after, before, tol, f"{tag} after the move ({policy}) vs before")
        errs[f"{policy}_vs_ref"] = _check(after, ref, tol, f"{tag} after the move ({policy}) vs reference")
    # zero tokens on rank 1, the new placement
    x0 = x if rank == 0 else x[:0]
    out0 = moe_layer(moved, x0, cfg, comm, new.to(device), backend)
    _check(out0, before if rank == 0 else before[:0], tol, f"{tag} after the move, rank 1 with zero tokens")
    # moving back gives the old weights, bit for bit
    back = replace_expert_weights(new, old, experts, rank, chunk_experts=3, timeout_s=60)
    for name, got, exp in zip(("w13", "w2"), expert_tensors(back), expert_tensors(local.experts)):
        assert torch.equal(got, exp), f"{tag}: {name} moved to the new placement and back differs"
    ids = routing.topk_ids
    bal = {"before": _received_balance(old, ids, rank), "after_static": _received_balance(new, ids, rank),
           "after_dynamic": _received_balance(new.with_policy("dynamic"), ids, rank)}
    return {"errs": errs, "balancedness": bal, "slots_moved": plan.sent_slots(), "rounds": plan.num_rounds}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One NCCL rank: every (dtype, backend) combination; writes its summary to out_dir/rank{rank}.json."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        summary = {f"{d}/{b}": _run_combo(rank, d, b, torch.device("cuda", rank)) for d, b in COMBOS}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(summary, f, indent=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < W, reason=f"needs {W} CUDA devices")
def test_eplb_rebalance_and_weight_move_on_two_gpus(tmp_path, monkeypatch):
    for key, value in NCCL_ENV.items():  # NVLink multicast stays off; the ranks inherit this
        monkeypatch.setenv(key, value)
    spawn_bounded(_worker, W, (W, free_port(), str(tmp_path)), WALL_S, "EPLB GPU run")
    for rank in range(W):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no summary"
        summary = json.loads(path.read_text())
        assert sorted(summary) == sorted(f"{d}/{b}" for d, b in COMBOS)
        for combo, res in summary.items():
            bal = res["balancedness"]
            assert bal["after_dynamic"] > bal["before"], f"rank {rank} {combo}: no better balance: {bal}"
            assert bal["after_static"] > bal["before"], f"rank {rank} {combo}: no better balance: {bal}"
            assert res["slots_moved"] > 0 and res["rounds"] >= 2, res
            print(f"rank {rank} {combo}: {res}")
