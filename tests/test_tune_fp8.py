"""bench/tune_fused_moe_fp8.py --check cpu, run as a user runs it (a subprocess, interpreter): every candidate
of both FP8 GEMMs runs on a small case and up/down pairs give the same FFN output (the tuner would otherwise
reject, at best, or keep a config that computes something else)."""

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_every_fp8_candidate_runs_and_pairs_agree():
    r = subprocess.run([sys.executable, "bench/tune_fused_moe_fp8.py", "--check", "cpu"], cwd=ROOT,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    n = int(r.stdout.split("checked ")[1].split()[0])
    assert n >= 30, r.stdout
