"""bench/bench_layer.py --quick on 2 gloo ranks (run as a command, as users run it): every schedule of every
case is checked against sequential before it is timed, and each row carries what the DESIGN.md schema asks
for the layer bench (speedup_vs.sequential; share_of_ideal and ideal_us on TBO rows; shared_hidden on the
shared-overlap rows (dispatch window and own stream); stage times of every stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ("sequential", "shared_overlap", "shared_stream", "shared_stream_after_route", "shared_stream_after_send",
             "tbo", "tbo+shared", "tbo+shared_stream", "tbo_compute_first")
STAGES = {"route", "dispatch_send", "dispatch_recv", "experts", "combine_send", "combine_recv", "shared", "add"}


def test_layer_bench_quick_rows(tmp_path):
    out = tmp_path / "layer.json"
    proc = subprocess.run([sys.executable, "bench/bench_layer.py", "--quick", "--comms", "torch,torch_fixed",
                           "--decode-tokens", "1,5", "--prefill-tokens", "", "--profile", str(tmp_path / "prof"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["bench"] == "layer" and rec["world_size"] == 2 and rec["failed"] == []
    cases = {(r["case"]["comm"], r["case"]["tokens"]) for r in rec["rows"]}
    assert cases == {(c, t) for c in ("torch", "torch_fixed") for t in (1, 5)}
    for r in rec["rows"]:
        v = r["variant"]
        assert r["median_us"] > 0 and r["speedup_vs"]["sequential"] > 0, r
        assert set(r["stage_us"]) == STAGES, r["stage_us"]
        assert ("share_of_ideal" in r and r["ideal_us"] > 0) == v.startswith("tbo"), r
        assert ("shared_hidden" in r) == (v.startswith("shared")), r
    assert {r["variant"] for r in rec["rows"]} == set(SCHEDULES)
    assert [r["speedup_vs"]["sequential"] for r in rec["rows"] if r["variant"] == "sequential"] == [1.0] * 4
    traces = sorted(os.listdir(tmp_path / "prof"))  # the first case of each comm, every schedule
    assert traces == sorted(f"layer_{c}_decode_t1_{v}.json" for c in ("torch", "torch_fixed")
                            for v in (s.replace("+", "_") for s in SCHEDULES))
    def names(trace: str) -> set:
        return {e.get("name", "") for e in json.loads((tmp_path / "prof" / trace).read_text())["traceEvents"]}

    seq, tbo = names("layer_torch_decode_t1_sequential.json"), names("layer_torch_decode_t1_tbo.json")
    assert any("alltoall" in n.lower() or "all_to_all" in n.lower() for n in seq), "no collective in the trace"
    assert {f"moe/{s}/mb0" for s in STAGES} <= seq and not any("/mb1" in n for n in seq)  # one range per stage
    assert {f"moe/{s}/mb{mb}" for s in STAGES for mb in (0, 1)} <= tbo
