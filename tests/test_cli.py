"""The `nanomoe` command, run as a user runs it (a subprocess): generate with a random tiny model on the CPU,
text and --json output, several ranks equal one rank, a checkpoint folder, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext
from nanomoe_fn.model.generate import generate
from nanomoe_fn.model.params import init_model_params
from nanomoe_fn.model.sampling import SamplingConfig
from tests.helpers import ROOT


def nanomoe(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanomoe_fn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_generate_random_tiny_json_equals_the_library():
    r = nanomoe("generate", "--prompt", "Hello", "--prompt", "MoE!", "--max-new-tokens", "6", "--json",
                "--device", "cpu", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = model_preset("tiny")
    params = init_model_params(cfg, torch.float32, seed=3)
    want = generate(params, [list(b"Hello"), list(b"MoE!")], ModelContext(cfg),
                    SamplingConfig(max_new_tokens=6, seed=3))
    assert [o["tokens"] for o in out["outputs"]] == want
    assert [o["prompt"] for o in out["outputs"]] == ["Hello", "MoE!"]
    assert out["new_tokens"] == sum(len(w) for w in want) and out["world_size"] == 1


@pytest.mark.slow
def test_generate_two_ranks_equals_one():
    args = ["generate", "--prompt", "a", "--prompt", "bcd", "--prompt", "ef", "--max-new-tokens", "5", "--json",
            "--device", "cpu"]
    one, two = nanomoe(*args), nanomoe(*args, "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["outputs"] == b["outputs"] and b["world_size"] == 2


def test_generate_text_output():
    r = nanomoe("generate", "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi") and "tokens/s" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--checkpoint", "/nonexistent/x"], "--checkpoint /nonexistent/x: not a folder"),
    (["generate", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "--preset", "nope"], "preset must be one of"),
])
def test_errors_are_one_line(args, needle):
    r = nanomoe(*args, "--device", "cpu")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanomoe: error:") and needle in lines[0], r.stderr


def test_bench_subcommand_runs_the_checkout_benchmark():
    r = nanomoe("bench", "--help")  # the benchmark's own flags
    assert r.returncode == 0 and "--mode" in r.stdout and "--expert-type" in r.stdout, r.stdout + r.stderr
