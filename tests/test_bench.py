"""The seed-compatible benches run on a CPU-only build, check themselves, and write the JSON schema.

Benches are run as their users run them, `python bench/<bench>.py ...` in a subprocess (tests never
import bench/); the command lines that need no second rank share one fixture and run side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nanomoe_fn.profiling import cuda_profiler, nvtx_range
from tests.helpers import run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_KEYS = {"bench", "command", "date", "device", "world_size", "versions", "ceilings", "rows"}


def check_record(path: str, bench: str, world_size: int, variants: list[str]) -> dict:
    with open(path) as f:
        rec = json.load(f)
    assert SCHEMA_KEYS <= set(rec), set(rec) ^ SCHEMA_KEYS
    assert rec["bench"] == bench and rec["world_size"] == world_size and rec["device"] == "cpu"
    assert rec["ceilings"]["hbm_gbps"] > 0 and rec["ceilings"]["bf16_tflops"] > 0
    assert [r["variant"] for r in rec["rows"]] == variants
    for row in rec["rows"]:
        assert row["median_us"] > 0 and 0 < row["roofline"] < 1.5 and row["gbps"] > 0
        assert row["case"]["phase"] == "decode" and row["case"]["tokens"] == 4
    return rec


SINGLE = ["bench/bench_ep_moe.py", "--batch-size", "4", "--hidden-dim", "32", "--num-experts", "16", "--warmup", "1",
          "--iters", "3", "--device", "cpu", "--cuda-profiler"]
MULTI = ["bench/bench_ep_moe_multi.py", "--backend", "gloo"]
# command lines refused before any rank starts: (argv, status, the one stderr line's start)
REFUSED = {
    "single_experts_per_token": (["bench/bench_ep_moe.py", "--num-experts", "4", "--experts-per-token", "8",
                                  "--device", "cpu"], 2, "bench_ep_moe.py: error: --experts-per-token"),
    "single_max_num_tokens": (["bench/bench_ep_moe.py", "--batch-size", "9", "--max-num-tokens", "8", "--device",
                               "cpu"], 2, "bench_ep_moe.py: error: --batch-size (9) exceeds --max-num-tokens"),
    "multi_tokens_per_expert": ([*MULTI, "--comm", "torch_fixed", "--tokens-per-expert", "4"], 2,
                                "bench_ep_moe_multi.py: error: --tokens-per-expert does not apply"),
    "nvlink": ([*MULTI, "--comm", "nvlink"], 2, "bench_ep_moe_multi.py: error: --comm nvlink needs CUDA"),
    "deepep_ll": ([*MULTI, "--comm", "torch,deepep_ll"], 2,
                  "bench_ep_moe_multi.py: error: --comm deepep_ll needs CUDA"),
    "mpi": ([*MULTI, "--comm", "mpi"], 2, "bench_ep_moe_multi.py: error: --comm: unknown"),
    "graph_on_gloo": ([*MULTI, "--comm", "torch_fixed", "--cuda-graph"], 2,
                      "bench_ep_moe_multi.py: error: --cuda-graph needs CUDA"),
    "graph_torch": (["bench/bench_ep_moe_multi.py", "--backend", "nccl", "--comm", "torch", "--cuda-graph"], 2,
                    "bench_ep_moe_multi.py: error: --cuda-graph needs a sync-free comm"),
    "graph_deepep": (["bench/bench_ep_moe_multi.py", "--backend", "nccl", "--comm", "deepep", "--cuda-graph"], 2,
                     "bench_ep_moe_multi.py: error: --cuda-graph needs a sync-free comm"),
    "graph_loop": (["bench/bench_ep_moe_multi.py", "--backend", "nccl", "--comm", "torch_fixed", "--cuda-graph",
                    "--mode", "loop"], 2, "bench_ep_moe_multi.py: error: --cuda-graph: --mode loop reads expert "
                   "counts on the host and cannot be captured"),
    "dispatch_variant": (["bench/bench_dispatch.py", "--backend", "gloo", "--variants", "torch,carrier_pigeon"], 1,
                         "--variants: unknown ['carrier_pigeon']"),
    # every flag checked before any work (a representative subset: each command costs a torch import)
    "graph_on_cpu": (["bench/bench_ep_moe.py", "--cuda-graph", "--mode", "triton", "--device", "cpu"], 2,
                     "bench_ep_moe.py: error: --cuda-graph needs a CUDA device"),  # not "use --mode triton"
    "eplb_divides": (["bench/bench_eplb.py", "--gpus", "3"], 2, "bench_eplb.py: error: --gpus 3 must divide --experts"),
    "layer_iters": (["bench/bench_layer.py", "--backend", "gloo", "--iters", "0"], 2,  # DeepSeek-V3 sizes: no drawing
                    "bench_layer.py: error: --iters must be >= 1"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every command line of this module that needs no second rank, run once, side by side."""
    out = tmp_path_factory.mktemp("bench")
    cmds = {key: argv for key, (argv, _, _) in REFUSED.items()}
    for expert_type in ("linear", "swiglu"):
        cmds[expert_type] = [*SINGLE, "--expert-type", expert_type, "--json", str(out / f"{expert_type}.json")]
    return {"dir": out, **run_commands(cmds)}


@pytest.mark.parametrize("expert_type", ["linear", "swiglu"])
def test_single_device_bench(runs, expert_type):
    proc = runs[expert_type]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if "ms/iter" in line] == ["loop", "batched_gemm"]
    check_record(str(runs["dir"] / f"{expert_type}.json"), "ep_moe", 1, ["loop", "batched_gemm"])


def test_single_device_bench_rejects_bad_flags(runs):
    for key in ("single_experts_per_token", "single_max_num_tokens", "multi_tokens_per_expert"):
        assert_refused(runs[key], *REFUSED[key][1:])  # the multi-rank one: refused before any rank starts


@pytest.mark.parametrize("key", ["nvlink", "deepep_ll", "mpi", "graph_on_gloo", "graph_torch", "graph_deepep",
                                 "graph_loop"])
def test_multi_bench_refuses_what_cannot_run(runs, key):
    """Refused with a message before any rank starts (on a CPU, and for impossible graph captures anywhere)."""
    assert_refused(runs[key], *REFUSED[key][1:])


def test_dispatch_bench_rejects_unknown_variant(runs):
    assert_refused(runs["dispatch_variant"], *REFUSED["dispatch_variant"][1:])


@pytest.mark.parametrize("key", ["graph_on_cpu", "eplb_divides", "layer_iters"])
def test_bench_flags_refused_in_one_line(runs, key):
    """A bad flag is one stderr line naming it, exit status 2, before anything is built (no traceback)."""
    assert_refused(runs[key], *REFUSED[key][1:])


def assert_refused(proc, status: int, start: str) -> None:
    """Exit status `status`, nothing on stdout (no rank ran), one stderr line starting with `start`."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(start), proc.stderr


@pytest.mark.slow
def test_multi_rank_bench_gloo(tmp_path):
    out = tmp_path / "m.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_ep_moe_multi.py"), "--world-size", "2",
           "--backend", "gloo", "--mode", "both", "--batch-size", "4", "--hidden-dim", "32", "--num-experts", "8",
           "--warmup", "1", "--iters", "3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loop:" in proc.stdout and "batched_gemm:" in proc.stdout
    check_record(str(out), "ep_moe_multi", 2, ["loop", "batched_gemm"])


@pytest.mark.slow
def test_multi_rank_bench_gloo_comm_list(tmp_path):
    """--comm torch_fixed,torch: one process, each comm checked against the single-rank layer and timed."""
    out = tmp_path / "m.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_ep_moe_multi.py"), "--world-size", "2",
           "--backend", "gloo", "--mode", "batched_gemm", "--batch-size", "4", "--hidden-dim", "32",
           "--num-experts", "8", "--warmup", "1", "--iters", "3", "--comm", "torch_fixed,torch", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = check_record(str(out), "ep_moe_multi", 2, ["batched_gemm", "batched_gemm"])
    assert [r["case"]["comm"] for r in rec["rows"]] == ["torch_fixed", "torch"]
    assert all(r["case"]["cuda_graph"] is False for r in rec["rows"]) and "failed" not in rec


def test_nvtx_and_profiler_are_noops_without_cuda():  # the benches' markers, from the package
    with nvtx_range("x"), cuda_profiler(True):
        pass


@pytest.mark.slow
def test_dispatch_bench_gloo(tmp_path):
    out = tmp_path / "d.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_dispatch.py"), "--world-size", "2", "--backend", "gloo",
           "--quick", "--dtype", "float32", "--warmup", "1", "--iters", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        rec = json.load(f)
    assert rec["bench"] == "dispatch" and rec["world_size"] == 2
    variants = {r["variant"] for r in rec["rows"]}
    assert variants == {"torch", "torch_nograph", "torch_exact", "torch_fixed", "gloo_a2a"}
    assert rec["failed"] == []
    for r in rec["rows"]:  # torch: its decode mode at decode, exact splits at prefill; torch_exact: always exact
        if r["variant"].startswith("torch_e") or (r["variant"] == "torch" and r["case"]["phase"] == "prefill"):
            assert r["mode"] == "exact", r
        elif r["variant"] == "torch":
            assert r["mode"] == "decode", r
    for r in rec["rows"]:
        assert r["dispatch_us"] > 0 and r["gbps"] > 0 and r["median_us"] == r["dispatch_us"]
        assert r["row_bytes"] == 4 * r["case"]["hidden"] and r["bytes_per_rank"] >= r["row_bytes"]  # float32 rows
        assert (r["variant"] == "gloo_a2a") == ("combine_us" not in r)
        assert "graph_round_us" not in r  # no CUDA graphs on a CPU
        # one row per (token, destination rank) <= one row per (token, k) pair, and at least 1 per token
        assert r["case"]["tokens"] <= r["recv_rows"] <= r["pair_rows"] <= r["case"]["tokens"] * 2 * r["case"]["top_k"]
        if r["variant"] != "gloo_a2a":
            assert r["speedup_vs"]["gloo_a2a"] > 0 and r["combine_gbps"] > 0
    # every case's rows share one byte count: GB/s * us equal across variants of a case
    by_case: dict = {}
    for r in rec["rows"]:
        by_case.setdefault(json.dumps(r["case"], sort_keys=True), []).append(r["gbps"] * r["dispatch_us"])
    for vals in by_case.values():
        assert max(vals) == pytest.approx(min(vals), rel=1e-3)
    skipped = {(s["variant"], s["case"]["phase"]) for s in rec["skipped"]}
    assert ("torch_fixed", "prefill") in skipped  # decode-only: prefill sizes are refused
    assert all(s["reason"] for s in rec["skipped"])
    if not torch.cuda.is_available():  # GPU-only comms are skipped with their reason, never silently
        assert {"nvlink", "deepep", "deepep_ll", "nvlink_fp8", "deepep_ll_fp8"} <= {v for v, _ in skipped}
