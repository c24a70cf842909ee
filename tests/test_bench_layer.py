"""bench/bench_layer.py --quick on 2 gloo ranks (run as a command, as users run it): every schedule of every
case is checked against sequential before it is timed, and each row carries what bench_layer.py's docstring
promises (speedup_vs.sequential; share_of_ideal and ideal_us on TBO rows; shared_hidden on the shared-overlap
rows (dispatch window and own stream); stage times of every stage), in the record bench/common.py's
write_record describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = ("sequential", "shared_overlap", "shared_stream", "shared_stream_after_route", "shared_stream_after_send",
             "tbo", "tbo+shared", "tbo+shared_stream", "tbo_compute_first")
STAGES = {"route", "dispatch_send", "dispatch_recv", "experts", "combine_send", "combine_recv", "shared", "add"}


@pytest.mark.slow
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


@pytest.mark.slow
def test_layer_bench_decoder_rows(tmp_path):
    """--layer decoder: the whole decoder layer (MLA + MoE) per schedule, its decode step also compiled as one
    graph (OpComm and MLA's custom ops), prefill's one-graph variant skipped with the reason. Two schedules keep
    the suite's time: tests/test_pipeline_compile.py compiles every schedule of the MoE layer as one graph."""
    out = tmp_path / "decoder.json"
    proc = subprocess.run([sys.executable, "bench/bench_layer.py", "--quick", "--layer", "decoder", "--comms",
                           "torch_decode", "--decode-tokens", "3", "--prefill-tokens", "16", "--context", "5",
                           "--prefill-len", "8", "--schedules", "tbo", "--fullgraph",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["failed"] == []
    decoder_stages = STAGES | {"attn_norm", "attention", "attn_residual", "ffn_norm", "ffn_residual", "result"}
    cases = {}
    for r in rec["rows"]:
        c = r["case"]
        cases.setdefault((c["phase"], c["sequences"], c["new_tokens"], c["context"]), set()).add(r["variant"])
        assert c["layer"] == "decoder" and set(r["stage_us"]) == decoder_stages, r
        assert ("share_of_ideal" in r) == r["variant"].startswith("tbo"), r
    plain = {"sequential", "tbo"}
    # decode: 3 sequences at position 5; prefill: 16 tokens = 2 sequences of 8 from position 0
    assert cases == {("decode", 3, 1, 5): plain | {v + "+fullgraph" for v in plain}, ("prefill", 2, 8, 0): plain}
    assert [(s["case"]["phase"], s["variant"]) for s in rec["skipped"]] == [("prefill", "+fullgraph")]
