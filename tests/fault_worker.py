"""Code that runs inside spawned gloo ranks for tests/test_faults.py: one rank (the victim) dies or stalls
in the middle of a stage, and every other rank (a survivor) reports what it saw.

The faulty peer is the test's own construction; the survivors run the library unchanged. The victim's
comm is a subclass whose `_a2a` stops the process when it reaches the named stage (after every earlier
exchange of the call completed on the victim), and its weight move stops between two rounds. Ways to
stop: "kill" (SIGKILL of itself: no cleanup, the kernel closes its sockets), "exit" (os._exit(3)) and
"stall" (alive but silent for longer than the survivors' timeout, then exits).

Each rank writes out_dir/rank{r}.json. The victim: its death time, written just before it stops. A
survivor: the error of the faulty call (type: message), seconds from the start of that call to the error
and the time of the error, the same for one more call made after the failure, how long tearing the group
down took, and for a weight move the checks of its state and its old experts (rank{r}_old.pt).

Dimension legend: E logical experts, W ranks, S_old / S_new slots per rank, T tokens, H hidden.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

import nanomoe_fn.eplb.move as eplb_move
from nanomoe_fn import MoEConfig, MoEParams, Placement, TorchComm, TorchFixedComm, init_moe_params, moe_layer
from nanomoe_fn.moe.params import shard_moe_params

COMM_TIMEOUT_S = 2.0  # TorchComm(timeout_s) and run_move_round(timeout_s) of every rank
PG_TIMEOUT_S = 5.0  # the process group's own timeout: a bit larger than the comm's (rendezvous, teardown)
DIE_DELAY_S = 0.2  # the victim lingers this long in the stage first, so survivors are surely inside it
STALL_S = COMM_TIMEOUT_S + 3.0  # a stalled victim stays silent this long, then exits


def layer_case(W: int, rank: int) -> tuple[MoEConfig, MoEParams, torch.Tensor]:
    """The config, full parameters and rank `rank`'s tokens x [T=6, H=16] (same params on every rank)."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=2 * W, top_k=2, n_shared_experts=1)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(7))
    x = torch.randn(6, cfg.hidden, generator=torch.Generator().manual_seed(100 + rank))
    return cfg, params, x


def move_case(W: int) -> tuple[Placement, Placement, int, int]:
    """(old placement, new placement, chunk_experts, round the victim never starts) of a weight move in
    which every survivor receives from the victim (the last rank) in that round, so each must fail."""
    if W == 2:  # swap the two ranks' experts, one slot per round: rounds [0->1, 1->0] twice
        return Placement.identity(4, 2), Placement.from_phy2log(torch.tensor([2, 3, 0, 1]), 4, 2), 1, 1
    if W == 3:  # to 3 slots a rank (redundant copies of 4 and 5); round 1 is [2->0, 2->1]
        new = Placement.from_phy2log(torch.tensor([3, 4, 5, 0, 4, 5, 2, 1, 5]), 6, 3)
        return Placement.identity(6, 3), new, 2, 1
    raise ValueError(f"move_case needs W in (2, 3), got {W}")


def _write(out_dir: str, rank: int, report: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def stop(how: str, rank: int, out_dir: str, stage: str) -> NoReturn:
    """The victim stops here: record when, then die (or stall, then exit)."""
    time.sleep(DIE_DELAY_S)
    _write(out_dir, rank, {"role": "victim", "how": how, "stage": stage, "t_death": time.time()})
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "stall":
        time.sleep(STALL_S)
        os._exit(0)
    os._exit(3)


class _StopAt:
    """Mixin for the victim's comm: stop the process at the exchange of stage `stop_stage`."""

    stop_how, stop_stage, stop_dir = "kill", "", ""

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Any, in_splits: Any, stage: str,
             async_op: bool = True) -> Any:
        if stage == self.stop_stage:
            if getattr(self, "_last", None) is not None:
                self._last.work.wait()  # torch_fixed starts its count exchange unjoined: finish it first
            stop(self.stop_how, self.rank, self.stop_dir, stage)
        self._last = super()._a2a(out, inp, out_splits, in_splits, stage, async_op)
        return self._last


class StopTorchComm(_StopAt, TorchComm):
    """TorchComm that stops its process at one stage (test-only: the faulty peer)."""


class StopFixedComm(_StopAt, TorchFixedComm):
    """TorchFixedComm that stops its process at one stage (test-only: the faulty peer)."""


def _make_comm(scenario: dict, victim: bool, out_dir: str) -> TorchComm:
    fixed = scenario["comm"] == "torch_fixed"
    cls = (StopFixedComm if fixed else StopTorchComm) if victim else (TorchFixedComm if fixed else TorchComm)
    comm = cls(8, timeout_s=COMM_TIMEOUT_S) if fixed else cls(timeout_s=COMM_TIMEOUT_S)
    if victim:
        comm.stop_how, comm.stop_stage, comm.stop_dir = scenario["how"], scenario["stage"], out_dir
    return comm


def _timed(fn: Any) -> dict[str, Any]:
    """Run fn(); its error ('Type: message', or None), seconds taken and the wall time it ended."""
    t0 = time.monotonic()
    try:
        fn()
        error = None
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        error = f"{type(err).__name__}: {err}"
    return {"error": error, "seconds": time.monotonic() - t0, "t_end": time.time()}


def _layer_fault(rank: int, W: int, scenario: dict, out_dir: str) -> dict[str, Any]:
    """A healthy layer call, then the faulty one (the victim stops in it), then one more call."""
    cfg, params, x = layer_case(W, rank)
    placement = Placement.identity(cfg.num_experts, W)
    local = shard_moe_params(params, placement, rank)
    healthy = moe_layer(local, x, cfg, _make_comm(scenario, False, out_dir), placement)
    comm = _make_comm(scenario, rank == scenario["victim"], out_dir)
    dist.barrier()
    faulty = _timed(lambda: moe_layer(local, x, cfg, comm, placement))
    again = _timed(lambda: moe_layer(local, x, cfg, comm, placement))
    return {"healthy_finite": bool(torch.isfinite(healthy).all()), "faulty": faulty, "again": again}


def _stop_between_rounds(scenario: dict, out_dir: str, run_round: Any) -> Any:
    """run_move_round for the victim: stops instead of starting round scenario['stop_round']."""
    def victim_round(plan: Any, round_index: int, rank: int, *args: Any, **kwargs: Any) -> None:
        if round_index == scenario["stop_round"]:
            stop(scenario["how"], rank, out_dir, f"move round {round_index}")
        run_round(plan, round_index, rank, *args, **kwargs)
    return victim_round


def _storages(tree: Any) -> set[int]:
    return {leaf.untyped_storage().data_ptr() for leaf in pytree.tree_leaves(tree)}


def _move_fault(rank: int, W: int, scenario: dict, out_dir: str) -> dict[str, Any]:
    """Re-place this rank's experts from the old to the new placement; the victim stops between rounds."""
    _, params, _ = layer_case(W, 0)
    old, new, chunk, stop_round = move_case(W)
    scenario = {**scenario, "stop_round": stop_round}
    experts = shard_moe_params(params, old, rank).experts  # this rank's old experts, [S_old, ...] leaves
    leaves_before = [id(t) for t in pytree.tree_leaves(experts)]
    run_round = eplb_move.run_move_round
    if rank == scenario["victim"]:
        run_round = _stop_between_rounds(scenario, out_dir, run_round)
        eplb_move.run_move_round = run_round  # what replace_expert_weights calls (victim's process only)
    plan = eplb_move.plan_weight_moves(old, new, chunk)
    staging: list[Any] = []
    dist.barrier()
    if scenario["mode"] == "rounds":  # one round per serving step
        def move() -> None:
            staging.append(eplb_move.begin_move(plan, rank, experts))
            for r in range(plan.num_rounds):
                run_round(plan, r, rank, experts, staging[0], timeout_s=COMM_TIMEOUT_S)
            eplb_move.finish_move(plan, rank, staging[0])
    else:  # all rounds back to back
        def move() -> None:
            eplb_move.replace_expert_weights(old, new, experts, rank, chunk, timeout_s=COMM_TIMEOUT_S)
    faulty = _timed(move)
    again = _timed(move)  # a second attempt on the broken group fails as well (and fast)
    fresh = shard_moe_params(params, old, rank).experts
    report: dict[str, Any] = {"faulty": faulty, "again": again}
    report["old_placement_same"] = torch.equal(old.phy2log, move_case(W)[0].phy2log)
    report["old_leaves_same_objects"] = [id(t) for t in pytree.tree_leaves(experts)] == leaves_before
    report["old_weights_bit_exact"] = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(experts),
                                                                              pytree.tree_leaves(fresh)))
    if staging:
        report["staging_shares_storage"] = bool(_storages(staging[0]) & _storages(experts))
        want_new = shard_moe_params(params, new, rank).experts
        report["staging_is_complete"] = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(staging[0]),
                                                                                 pytree.tree_leaves(want_new)))
    torch.save(experts, os.path.join(out_dir, f"rank{rank}_old.pt"))
    return report


def run_fault(rank: int, world_size: int, port: int, scenario: dict, out_dir: str) -> None:
    """One scenario on this rank. scenario: kind ('dispatch', 'combine' or 'move'), victim (rank), how
    ('kill', 'exit' or 'stall'); for a layer: comm ('torch' or 'torch_fixed'), stage (where the victim
    stops: 'dispatch/payload' or 'combine/payload'); for a move: mode ('rounds' or 'replace')."""
    torch.set_num_threads(1)
    # the rendezvous may wait long for a slow peer to start (tests run scenarios side by side on 2 cores);
    # once every rank is connected, the group itself runs with the short PG_TIMEOUT_S
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    if scenario["kind"] == "move":
        report = _move_fault(rank, world_size, scenario, out_dir)
    else:
        report = _layer_fault(rank, world_size, scenario, out_dir)
    t0 = time.monotonic()
    dist.destroy_process_group()
    report.update(role="survivor", teardown_s=time.monotonic() - t0, t_exit=time.time())
    _write(out_dir, rank, report)
