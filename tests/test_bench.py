"""The seed-compatible benches run on a CPU-only build, check themselves, and write the JSON schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import bench_ep_moe, bench_ep_moe_multi
from bench.common import cuda_profiler, nvtx_range

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


@pytest.mark.parametrize("expert_type", ["linear", "swiglu"])
def test_single_device_bench(tmp_path, expert_type):
    out = tmp_path / "r.json"
    rows = bench_ep_moe.main(["--batch-size", "4", "--hidden-dim", "32", "--num-experts", "16", "--warmup", "1",
                              "--iters", "3", "--expert-type", expert_type, "--device", "cpu", "--cuda-profiler",
                              "--json", str(out)])
    assert len(rows) == 2
    check_record(str(out), "ep_moe", 1, ["loop", "batched_gemm"])


def test_single_device_bench_rejects_bad_flags():
    with pytest.raises(SystemExit, match="experts-per-token"):
        bench_ep_moe.main(["--num-experts", "4", "--experts-per-token", "8", "--device", "cpu"])
    with pytest.raises(SystemExit, match="max-num-tokens"):
        bench_ep_moe.main(["--batch-size", "9", "--max-num-tokens", "8", "--device", "cpu"])
    with pytest.raises(SystemExit, match="tokens-per-expert"):  # refused before any rank starts
        bench_ep_moe_multi.main(["--backend", "gloo", "--comm", "torch_fixed", "--tokens-per-expert", "4"])


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


def test_nvtx_and_profiler_are_noops_without_cuda():
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
    assert variants == {"torch", "torch_fixed", "gloo_a2a"}
    for r in rec["rows"]:
        assert r["dispatch_us"] > 0 and r["gbps"] > 0
        assert (r["variant"] == "gloo_a2a") == ("combine_us" not in r)
