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
    assert out["cuda_graph"] is False  # the CPU: eager steps


def test_cuda_graph_default_and_refusals():
    """--cuda-graph defaults to on for CUDA with a capturable expert backend (the default triton), off on the
    CPU and for loop / bmm; asked for explicitly where it cannot run, it is refused by name before any load."""
    from argparse import Namespace

    from nanomoe_fn.cli_util import check_cuda_graph, use_cuda_graph

    def flags(graph=None, experts=None):
        return Namespace(cuda_graph=graph, expert_backend=experts, attn_backend=None)

    assert use_cuda_graph(flags(), cuda=True) and use_cuda_graph(flags(experts="triton_fp8"), cuda=True)
    assert not use_cuda_graph(flags(), cuda=False) and not use_cuda_graph(flags(experts="bmm"), cuda=True)
    assert not use_cuda_graph(flags(graph=False), cuda=True) and use_cuda_graph(flags(graph=True), cuda=True)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    check_cuda_graph(flags(True), cuda)
    check_cuda_graph(flags(None, "bmm"), cuda)  # the default just stays eager there
    with pytest.raises(ValueError, match=r"^--cuda-graph: expert backend 'loop' reads expert counts on the host"):
        check_cuda_graph(flags(True, "loop"), cuda)
    with pytest.raises(ValueError, match=r"^--cuda-graph needs a CUDA device \(this run is on cpu\)"):
        check_cuda_graph(flags(True), cpu)


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


def main_lines(*args: str) -> tuple[int, list[str]]:
    """Run the command in this process (as the console script does): (exit status, non-empty stderr lines)."""
    import contextlib
    import io

    from nanomoe_fn.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's own errors exit
            rc = e.code
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.mark.parametrize("args,needle", [
    ([], "the following arguments are required: command"),
    (["generate", "--frob"], "unrecognized arguments: --frob (see nanomoe generate --help)"),
    (["generate", "--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value: 'abc'"),
    (["generate", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--max-new-tokens", "600"], "--max-new-tokens 600: the longest prompt (5 tokens) plus the new "
     "tokens exceeds the model's max_position_embeddings (512)"),
    (["generate", "--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["generate", "--nproc", "3"], "--nproc 3 must divide the model's 8 routed experts"),
    (["generate", "--checkpoint", "/nonexistent/x"], "--checkpoint /nonexistent/x: not a folder"),
    (["generate", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["generate", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["generate", "--top-k", "-5"], "--top-k must be an int >= 0, got -5"),
    (["generate", "--stop", "256"], "--stop 256 is not a token id of this model (vocab_size=256)"),
    (["generate", "--prompt", "a", "--prompt", ""], "--prompt #2 is empty: every prompt needs at least one token"),
    (["generate", "--preset", "nope"], "--preset: model preset must be one of"),
    (["generate", "--attn-backend", "cuda"], "--attn-backend: MLA backend must be one of ['torch', 'triton']"),
    (["generate", "--expert-backend", "foo"], "--expert-backend: expert backend must be one of"),
    (["generate", "--expert-backend", "triton_fp8"], "--expert-backend: expert backend 'triton_fp8' cannot run "
     "here: FP8 block scales need hidden (64)"),
    (["generate", "--device", "foo"], "--device: expected cpu or cuda[:i], got 'foo'"),
    (["generate", "--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["generate", "--cuda-graph"], "--cuda-graph needs a CUDA device (this run is on cpu)"),
])
def test_errors_are_one_line(args, needle):
    if args[:1] == ["generate"] and "--device" not in args:
        args = [*args, "--device", "cpu"]
    rc, lines = main_lines(*args)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("nanomoe: error: ") and needle in lines[0], lines


def test_bad_flag_is_one_line_as_a_command():
    r = nanomoe("generate", "--top-k", "many")  # the console script: argparse's error without its usage block
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["nanomoe: error: argument --top-k: invalid int value: 'many' "
                                     "(see nanomoe generate --help)"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_error_itself(where):
    args = ["generate", "--top-p", "2", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"--top-p must be in \(0, 1\]"):
        main_lines(*(["--debug", *args] if where == "before" else [*args, "--debug"]))


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


@pytest.mark.parametrize("change,needle,nproc", [  # 2 ranks: the spawned rank's error, one line too
    (_without("model.layers.2.mlp.experts.3.up_proj.weight"), "missing tensor 'model.layers.2.mlp.experts.3.up_proj",
     "2"),
    (_with("model.norm.weight", torch.ones(7)), "model.norm.weight", "1"),
    (_with("model.layers.0.input_layernorm.weight", torch.ones(64, dtype=torch.int64)),
     "model.layers.0.input_layernorm.weight", "1"),
])
def test_bad_checkpoint_is_one_line(checkpoint, tmp_path, change, needle, nproc):
    import shutil

    from tests.model_fixtures import rewrite

    src, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    rewrite(bad, change)
    r = nanomoe("generate", "--checkpoint", str(bad), "--device", "cpu", "--nproc", nproc)
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


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a host of 2 GPUs (device parsing and placement only: nothing touches a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_device_flag_on_two_gpus(two_gpus):
    from nanomoe_fn.cli import _parser
    from nanomoe_fn.cli_util import UsageError, check_generate_args, rank_device

    def args(*flags):
        return _parser().parse_args(["generate", *flags])

    assert rank_device(args("--device", "cuda:1"), 0, 1) == torch.device("cuda", 1)  # was cuda:0
    assert rank_device(args("--device", "cuda"), 0, 1) == torch.device("cuda", 0)
    assert rank_device(args(), 3, 4) == torch.device("cuda", 1)  # rank r of several: cuda:(r % GPUs)
    assert rank_device(args("--device", "cpu"), 1, 2) == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1$"):
        rank_device(args("--device", "cuda:2"), 0, 1)
    with pytest.raises(ValueError, match=r"--nproc 4 needs 4 CUDA devices, this machine has 2"):
        check_generate_args(args("--nproc", "4"))
    with pytest.raises(ValueError, match=r"--device cuda:1 picks one GPU; with --nproc 2"):
        check_generate_args(args("--nproc", "2", "--device", "cuda:1"))
    with pytest.raises(ValueError, match=r"--expert-backend: expert backend must be one of"):
        check_generate_args(args("--nproc", "2", "--expert-backend", "cutlass"))  # names only, no GPU touched
