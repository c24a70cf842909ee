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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint written by transformers' save_pretrained, with a tiny BPE tokenizer."""
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_v3
    from tests.model_fixtures import tiny_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    model = tiny_v3("random", vocab_size=320)
    model.save_pretrained(path)
    tiny_tokenizer(path)
    return path, model


def test_generate_from_checkpoint_equals_transformers(checkpoint):
    path, model = checkpoint
    from nanomoe_fn.model.tokenizer import load_tokenizer

    r = nanomoe("generate", "--checkpoint", str(path), "--prompt", "hello experts", "--max-new-tokens", "12",
                "--ignore-eos", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["outputs"][0]
    ids = load_tokenizer(path).encode("hello experts")
    with torch.no_grad():
        x = torch.tensor([ids])  # starts with the BOS (id 0): an explicit mask, or transformers masks it as padding
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert got["tokens"] == want
    assert got["text"] == load_tokenizer(path).decode(want)


def _without(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _with(name, value):
    return lambda t: {**t, name: value}


@pytest.mark.parametrize("change,needle", [
    (_without("model.layers.2.mlp.experts.3.up_proj.weight"), "missing tensor 'model.layers.2.mlp.experts.3.up_proj"),
    (_with("model.norm.weight", torch.ones(7)), "model.norm.weight"),
    (_with("model.layers.0.input_layernorm.weight", torch.ones(64, dtype=torch.int64)),
     "model.layers.0.input_layernorm.weight"),
])
def test_bad_checkpoint_is_one_line(checkpoint, tmp_path, change, needle):
    import shutil

    from tests.model_fixtures import rewrite

    src, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    rewrite(bad, change)
    r = nanomoe("generate", "--checkpoint", str(bad), "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_unknown_config_field_is_one_line(checkpoint, tmp_path):
    import shutil

    from tests.model_fixtures import rewrite

    src, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    rewrite(bad, config={**json.loads((src / "config.json").read_text()), "frobnicate_experts": 3})
    r = nanomoe("generate", "--checkpoint", str(bad), "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "frobnicate_experts" in lines[0], r.stderr
