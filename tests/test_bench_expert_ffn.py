"""bench/bench_expert_ffn.py dry runs on the CPU (Triton under its interpreter, float32, tiny dims): every
variant that can run here is checked against the float reference and lands in the JSON with its config and
speedups; the ones that cannot (DeepGEMM without CUDA, SGLang without its files) are listed with a reason;
--ranking writes its table. Run as subprocesses (tests never import bench/); no timing is asserted.

Dimension legend: T tokens, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_SGL = os.path.isfile(os.path.join(ROOT, ".peers", "sgl", "fused_moe_triton_kernels.py"))
TINY = ["--device", "cpu", "--dtype", "float32", "--hidden", "64", "--intermediate", "32", "--top-k", "2"]
ENV = {"TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ffn")
    cmds = {
        "all": (["bench/bench_expert_ffn.py", *TINY, "--tokens", "8", "--experts", "4", "--json",
                 str(out / "all.json")], ENV),
        "ranking": (["bench/bench_expert_ffn.py", *TINY, "--ranking", "--tokens", "4", "8", "--experts", "4", "6",
                     "--gpu-stats", "--settle-ms", "1", "--warmup-ms", "1", "--json", str(out / "ranking.json")], ENV),
        "unknown": (["bench/bench_expert_ffn.py", *TINY, "--variants", "loop,cublas"], ENV),
    }
    procs = run_commands(cmds, timeout_s=300)
    recs = {k: json.loads((out / f"{k}.json").read_text()) for k in ("all", "ranking") if procs[k].returncode == 0}
    return {"procs": procs, "recs": recs}


@pytest.mark.slow
def test_every_variant_checked_or_skipped_with_reason(runs):
    proc = runs["procs"]["all"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = runs["recs"]["all"]
    ran = [r["variant"] for r in rec["rows"]]
    skipped = {s["variant"]: s["reason"] for s in rec["skipped"]}
    want = ["loop", "bmm", "triton", "triton+align", "bmm_padded"] + (["sglang"] if HAVE_SGL else []) + ["grouped_mm"]
    assert ran == want
    assert {"deepgemm", "deepgemm_glue"} <= set(skipped) and "CUDA" in skipped["deepgemm"]
    if not HAVE_SGL:
        assert "put sglang 0.5.23's kernel files in .peers/sgl" in skipped["sglang"]
    for r in rec["rows"]:
        assert r["ok"] and r["check_rel_err"] < 1e-5, r
        assert r["case"] == {"phase": "decode", "tokens": 8, "experts": 4, "top_k": 2, "hidden": 64,
                             "intermediate": 32, "expert_type": "swiglu", "dtype": "float32"}
        # speedups against the peers that ran in this case, never against the row itself
        assert set(r["speedup_vs"]) == {"triton", "bmm_padded", "sglang", "grouped_mm"} & set(ran) - {r["variant"]}
    by = {r["variant"]: r for r in rec["rows"]}
    cfg = by["triton"]["config"]
    assert set(cfg) == {"up", "down", "align_block"} and cfg == by["triton+align"]["config"]
    # the pre-aligned rows use triton's own alignment block (fused_moe's), whatever else the run builds
    assert cfg["align_block"] == min(c["SPLIT_M"] or c["BLOCK_M"] for c in (cfg["up"], cfg["down"]))
    if HAVE_SGL:
        assert by["sglang"]["config"]["source"] == "tuned-style" and by["sglang"]["config"]["BLOCK_SIZE_M"] == 16


def test_ranking_table(runs):
    proc = runs["procs"]["ranking"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = runs["recs"]["ranking"]
    assert [r["variant"] for r in rec["rows"][:3]] == ["loop", "bmm", "triton"]  # deepgemm: skipped on a CPU
    for r in rec["rows"]:   # --ranking times 3 interleaved rounds per case; the row is their median
        assert len(r["rounds_us"]) == 3 and r["median_us"] == sorted(r["rounds_us"])[1], r
        # --gpu-stats: the GPU's state before and after each window (None here: no nvidia-smi reading a GPU)
        assert [sorted(w) for w in r["window_gpu_state"]] == [["after", "before"]] * 3, r
    table = rec["ranking"]
    assert [(t["experts"], t["tokens"]) for t in table] == [(4, 4), (4, 8), (6, 4), (6, 8)]
    for t in table:
        assert sorted(t["us"]) == ["bmm", "loop", "triton"] and sorted(t["order"]) == sorted(t["us"])
        assert [t["us"][v] for v in t["order"]] == sorted(t["us"].values())
        # the interpreter is far slower than torch: the expected order is violated, and said so
        assert "triton not faster than bmm" in t["violations"]
    assert "ranking (median us" in proc.stdout and "VIOLATES" in proc.stdout


def test_unknown_variant_is_refused(runs):
    proc = runs["procs"]["unknown"]
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--variants: unknown ['cublas']" in proc.stderr
