"""bench/bench_model.py on the CPU (a smoke run of the tiny preset, as a subprocess): one device next to
transformers (the same weights give the same greedy tokens in float32), and 2 gloo ranks with EP; the FP8
expert rows (tiny-fp8, the Triton interpreter) beside bf16 rows on the same rounded weights."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT, run_commands

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_model_rows(tmp_path):
    one, two, fp8 = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "fp8.json"
    base = ["bench/bench_model.py", "--preset", "tiny", "--batch", "1", "2", "--prompt-len", "6",
            "--steps", "4"]
    runs = run_commands({"one": [*base, "--device", "cpu", "--json", str(one)],
                         "two": [*base, "--world-size", "2", "--decode-comm", "torch", "--json", str(two)],
                         "fp8": ([*base, "--device", "cpu", "--json", str(fp8), "--expert-weights", "bf16,fp8",
                                  "--preset", "tiny-fp8"],
                                 {"TRITON_INTERPRET": "1"})},
                        timeout_s=300)
    for name, r in runs.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
    rec = json.loads(one.read_text())
    assert rec["bench"] == "model" and rec["world_size"] == 1 and ROOT
    rows = {(r["variant"], r["batch"]): r for r in rec["rows"]}
    assert set(rows) == {("transformers", 1), ("transformers", 2), ("nanomoe", 1), ("nanomoe", 2)}
    for b in (1, 2):
        ours, hf = rows["nanomoe", b], rows["transformers", b]
        # the bench rounds the ratio to 2 decimals: on a slow CPU it is ~0.04, where that rounding is 10% of it
        assert ours["speedup_vs"]["transformers"] == pytest.approx(ours["decode_tok_s"] / hf["decode_tok_s"],
                                                                   rel=0.02, abs=0.005)
        assert ours["tokens_agree"] == 5  # every greedy token (float32, the same weights)
        assert ours["decode_tok_s"] == pytest.approx(b / (ours["decode_step_ms"] * 1e-3), rel=0.01)
        assert ours["floor_step_ms"] > 0 and ours["share_of_floor"] == pytest.approx(
            ours["floor_step_ms"] / ours["decode_step_ms"], rel=0.01, abs=1e-3)
        # distinct experts each of the 2 MoE layers picked for b tokens (top-2 of 8)
        assert len(ours["picked_experts"]) == 2 and all(2 <= c <= min(8, 2 * b) for c in ours["picked_experts"])
        assert hf["floor_step_ms"] == ours["floor_step_ms"]
    ep = json.loads(two.read_text())
    assert ep["world_size"] == 2 and [r["batch"] for r in ep["rows"]] == [1, 2]
    assert all(r["decode_comm"] == "torch" and r["decode_tok_s"] > 0 for r in ep["rows"])
    # this rank's share (4 of 8 experts) of what both ranks' tokens picked
    assert all(0 <= c <= 4 for r in ep["rows"] for c in r["picked_experts"])
    # FP8 experts: tiny-fp8 (the fp8 run's --preset comes last and wins)
    rec = json.loads(fp8.read_text())
    assert rec["expert_weights"] == ["bf16", "fp8"]
    for b in (1, 2):
        hf, bf, f8 = ([r for r in rec["rows"] if r["batch"] == b and r.get("expert_weights") == w]
                      for w in (None, "bf16", "fp8"))
        assert len(hf) == len(bf) == len(f8) == 1 and hf[0]["variant"] == "transformers"
        bf, f8 = bf[0], f8[0]
        assert (bf["expert_backend"], f8["expert_backend"]) == ("bmm", "triton_fp8")
        # bf16 rows run transformers' weights rounded to the FP8 values: the same greedy tokens
        assert bf["tokens_agree"] == 5 and hf[0]["floor_step_ms"] == bf["floor_step_ms"]
        assert 0 < f8["floor_step_ms"] < bf["floor_step_ms"]  # one byte per expert weight instead of four
        assert 0 <= f8["tokens_agree"] <= 5 and f8["decode_tok_s"] > 0
