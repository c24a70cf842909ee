"""Faults over gloo on the CPU: a rank dies (SIGKILL of itself, or os._exit) or stalls in the middle of
dispatch, of combine and of an EPLB weight move. Every other rank must end that call within its comm
timeout with an error naming itself and the stage, fail a later call as fast (never hang), and tear the
group down; after a failed weight move its old placement and old weights are intact (the staging never
replaced them) and still compute the layer (a fresh single-rank call equals the reference).

The worker code is tests/fault_worker.py. Timings go to stdout (`-s`) and to junit properties.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree

from nanomoe_fn import LocalComm, MoEParams, Placement, moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from tests import fault_worker as fw
from tests.helpers import assert_close_to_ref, reference_layer

pytestmark = pytest.mark.slow

MARGIN_S = 1.5  # scheduling slack on 2 busy cores, on top of the comm timeout
LIMIT_S = 90.0  # hard wall-clock bound of all scenarios together (spawn included): past it, ranks are killed

SCENARIOS = {  # name: (world size, scenario); see fault_worker.run_fault
    "dispatch-torch-kill-W3": (3, dict(kind="dispatch", comm="torch", stage="dispatch/payload", how="kill",
                                       victim=2)),
    "dispatch-fixed-exit-W2": (2, dict(kind="dispatch", comm="torch_fixed", stage="dispatch/payload", how="exit",
                                       victim=0)),
    "dispatch-torch-stall-W2": (2, dict(kind="dispatch", comm="torch", stage="dispatch/payload", how="stall",
                                        victim=1)),
    "combine-torch-kill-W2": (2, dict(kind="combine", comm="torch", stage="combine/payload", how="kill", victim=1)),
    "combine-fixed-kill-W2": (2, dict(kind="combine", comm="torch_fixed", stage="combine/payload", how="kill",
                                      victim=0)),
    "move-rounds-kill-W3": (3, dict(kind="move", mode="rounds", how="kill", victim=2)),
    "move-replace-exit-W2": (2, dict(kind="move", mode="replace", how="exit", victim=1)),
}
LAYER = [n for n in SCENARIOS if not n.startswith("move")]
MOVE = [n for n in SCENARIOS if n.startswith("move")]


@pytest.fixture(scope="module")
def fault_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Run every selected scenario side by side (spawn dominates: one at a time would take ~7x as long):
    name -> (reports by rank with their exit codes, or None; what went wrong, or None; its out dir)."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params}
    started = {}
    for name in sorted(wanted):
        W, scenario = SCENARIOS[name]
        out = tmp_path_factory.mktemp(name)
        started[name] = (mp.start_processes(fw.run_fault, args=(W, free_port(), scenario, str(out)), nprocs=W,
                                            join=False, start_method="spawn"), out)
    deadline = time.monotonic() + LIMIT_S
    results = {}
    for name, (ctx, out) in started.items():
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
        for r in hung:
            ctx.processes[r].kill()
            ctx.processes[r].join(5)
        missing = [r for r in range(len(ctx.processes)) if not (out / f"rank{r}.json").exists()]
        if hung or missing:
            codes = [p.exitcode for p in ctx.processes]
            results[name] = (None, f"ranks {hung} hung past {LIMIT_S:g}s; ranks {missing} wrote no report "
                                   f"(exit codes {codes}; see their stderr)", out)
            continue
        reports = {r: {**json.loads((out / f"rank{r}.json").read_text()), "exitcode": p.exitcode}
                   for r, p in enumerate(ctx.processes)}
        results[name] = (reports, None, out)
    return results


def _reports(fault_runs: dict[str, tuple], name: str) -> tuple[dict[int, dict], Path]:
    reports, problem, out = fault_runs[name]
    assert problem is None, f"{name}: {problem}"
    return reports, out


def _check_survivors(reports: dict[int, dict], scenario: dict, error_type: str, stage: str,
                     record_property: Callable[[str, object], None]) -> dict[int, dict]:
    """The victim stopped as told; every other rank ended the faulty call, and a later one, within the
    timeout with an error naming itself and the stage; returns the survivors' reports."""
    victim = reports[scenario["victim"]]
    assert victim["role"] == "victim", victim
    want_code = {"kill": -signal.SIGKILL, "exit": 3, "stall": 0}[scenario["how"]]
    assert victim["exitcode"] == want_code, f"victim exit code {victim['exitcode']}, wanted {want_code}"
    survivors = {r: rep for r, rep in reports.items() if r != scenario["victim"]}
    assert survivors and all(rep["role"] == "survivor" for rep in survivors.values()), reports
    for r, rep in survivors.items():
        assert rep["exitcode"] == 0, f"rank {r} exit code {rep['exitcode']}"
        faulty, again = rep["faulty"], rep["again"]
        assert faulty["error"] is not None, f"rank {r}: the call with a dead peer returned without an error"
        assert faulty["error"].startswith(f"{error_type}: rank {r}: ") and stage in faulty["error"], faulty
        after_death = faulty["t_end"] - victim["t_death"]
        assert faulty["seconds"] < fw.COMM_TIMEOUT_S + fw.DIE_DELAY_S + MARGIN_S, faulty
        assert after_death < fw.COMM_TIMEOUT_S + MARGIN_S, f"rank {r} ended {after_death:.2f}s after the fault"
        if scenario["how"] == "stall":  # a silent peer is waited for the whole timeout, not less
            assert after_death > fw.COMM_TIMEOUT_S - 0.5, f"rank {r} gave up {after_death:.2f}s into the stall"
        assert again["error"] is not None and again["error"].startswith(f"{error_type}: rank {r}: "), again
        assert again["seconds"] < fw.COMM_TIMEOUT_S + MARGIN_S, again
        assert rep["teardown_s"] < fw.PG_TIMEOUT_S, rep
        timings = (f"error {after_death:.3f}s after the fault ({faulty['seconds']:.3f}s into the call), "
                   f"next call {again['seconds']:.3f}s, teardown {rep['teardown_s']:.3f}s, "
                   f"exit {rep['t_exit'] - victim['t_death']:.3f}s after the fault")
        print(f"\n{scenario}: rank {r}: {timings}")
        record_property(f"rank{r}_timings", timings)
    return survivors


@pytest.mark.parametrize("name", LAYER)
def test_peer_fault_mid_layer_ends_every_rank_with_the_stage(name, fault_runs, record_property):
    reports, _ = _reports(fault_runs, name)
    scenario = SCENARIOS[name][1]
    survivors = _check_survivors(reports, scenario, "TimeoutError", f"EP stage '{scenario['stage']}'",
                                 record_property)
    for rep in survivors.values():
        assert rep["healthy_finite"], "the healthy call before the fault failed"
        assert "EP stage '" in rep["again"]["error"], rep["again"]


@pytest.mark.parametrize("name", MOVE)
def test_peer_fault_mid_weight_move_keeps_old_weights(name, fault_runs, record_property):
    W, scenario = SCENARIOS[name]
    old, new, chunk, stop_round = fw.move_case(W)
    plan = fw.eplb_move.plan_weight_moves(old, new, chunk)
    assert scenario["victim"] == W - 1 and stop_round < plan.num_rounds
    for r in range(W - 1):  # each survivor receives from the victim in the round it never starts: must fail
        assert any(t.src_rank == W - 1 and t.dst_rank == r for t in plan.rounds[stop_round]), (r, plan)
    reports, out = _reports(fault_runs, name)
    survivors = _check_survivors(reports, scenario, "RuntimeError", f"EPLB weight move round {stop_round}",
                                 record_property)
    cfg, params, _ = fw.layer_case(W, 0)
    for r, rep in survivors.items():
        assert rep["old_placement_same"] and rep["old_leaves_same_objects"], rep
        assert rep["old_weights_bit_exact"], f"rank {r}: the failed move changed the old weights"
        if scenario["mode"] == "rounds":  # the half-moved state lives in the staging only
            assert rep["staging_shares_storage"] is False and rep["staging_is_complete"] is False, rep
    # the old weights still compute the layer: every rank's old slots (the survivors' as they were left, the
    # victim's rebuilt) in one fresh single-rank call, against the float64 reference
    shards = [torch.load(out / f"rank{r}_old.pt", weights_only=False) if r in survivors  # our own file
              else shard_moe_params(params, old, r).experts for r in range(W)]
    experts = pytree.tree_map(lambda *leaves: torch.cat(leaves), *shards)
    x = torch.randn(40, cfg.hidden, generator=torch.Generator().manual_seed(3))
    single = Placement.from_phy2log(old.phy2log, cfg.num_experts, 1)
    got = moe_layer(MoEParams(params.gate, experts, params.shared), x, cfg, LocalComm(), single)
    ref, _ = reference_layer(params, x, cfg)
    assert_close_to_ref(got, ref, torch.float32, "layer on the old weights after a failed move")
