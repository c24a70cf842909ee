"""Multi-rank launch: CLI mistakes refused once in the parent (one line, nothing spawned), port checks,
and the config handshake on 2 gloo ranks (ranks that disagree fail together, naming the field)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanomoe_fn import MoEConfig
from nanomoe_fn.cli_util import UsageError, run_cli
from nanomoe_fn.comm.handshake import config_fields, config_hash, describe_mismatch, handshake
from nanomoe_fn.comm.launch import check_port, free_port, spawn_error_line, spawn_ranks
from tests.helpers import run_commands, spawn_bounded

SMALL = ["--batch-size", "4", "--hidden-dim", "32", "--num-experts", "8", "--warmup", "0", "--iters", "1"]


# ---- CLI mistakes: refused in the parent, before anything is spawned -------------------------------------------
# Each bench command line runs as a user runs it, in a subprocess (tests never import bench/); those of this
# module run once, side by side, in the `cli` fixture. "Nothing spawned": a spawned rank would print (its
# results, or its own error) and the refusal is exactly one stderr line, with stdout empty. One flag of each
# kind of check (each command line costs a torch import).

MULTI_FLAGS = [
    (["--world-size", "3", "--num-experts", "8"], r"^--world-size \(3\) must divide --num-experts \(8\)$"),
    (["--world-size", "0"], r"^--world-size must be an int >= 1, got 0$"),
    (["--batch-size", "0"], r"^--batch-size must be >= 1, got 0$"),
    (["--iters", "0"], r"^--iters must be >= 1"),
    (["--intermediate-dim", "0"], r"^--intermediate-dim must be >= 1 when given, got 0$"),
    (["--timeout", "nan"], r"^--timeout must be a finite number of seconds > 0"),
    (["--master-port", "70000"], r"^--master-port must be in 1\.\.65535, got 70000$"),
    (["--device", "cuda:0"], r"^--device: the multi-rank bench places ranks itself"),
    (["--cuda-graph", "--comm", "torch_fixed"], r"^--cuda-graph needs CUDA GPUs"),
]
SINGLE_FLAGS = [
    (["--cuda-graph", "--device", "cpu", "--mode", "triton"],
     r"^--cuda-graph needs a CUDA device \(this run is on cpu\)"),
    (["--device", "foo"], r"^--device: expected cpu or cuda\[:i\], got 'foo'$"),
]
MULTI = "bench/bench_ep_moe_multi.py"
SINGLE = "bench/bench_ep_moe.py"
TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2"}


@pytest.fixture(scope="module")
def cli() -> dict:
    """{key: CompletedProcess} of every refused command line below, with one port held taken meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmds = {("multi", i): [MULTI, "--backend", "gloo", *flags] for i, (flags, _) in enumerate(MULTI_FLAGS)}
        cmds |= {("single", i): [SINGLE, *flags] for i, (flags, _) in enumerate(SINGLE_FLAGS)}
        if torch.cuda.device_count() < 2:  # elsewhere it would run
            cmds["nccl"] = [MULTI, "--backend", "nccl", "--comm", "torch"]
        cmds |= {
            "port": [MULTI, "--backend", "gloo", "--master-port", str(port)],
            "torchrun_world": ([MULTI, "--backend", "gloo", "--world-size", "4"], TORCHRUN),
            "torchrun_port": ([MULTI, "--backend", "gloo", "--master-port", "29500"], TORCHRUN),
            "graph_modes": [SINGLE, "--cuda-graph", "--mode", "both"],
        }
        return {"taken_port": port, **run_commands(cmds)}


def refusal(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The one-line message of a refused command line: status 2, stdout empty, `prog: error: <message>`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"{prog}: error: "), proc.stderr
    return proc.stderr[len(f"{prog}: error: "):-1]


@pytest.mark.parametrize("case", range(len(MULTI_FLAGS)), ids=[" ".join(f) for f, _ in MULTI_FLAGS])
def test_multi_bench_flags_refused_in_parent(cli, case):
    """Each mistake: exit status 2 with one line, and no rank is ever spawned."""
    assert re.search(MULTI_FLAGS[case][1], refusal(cli[("multi", case)], "bench_ep_moe_multi.py"))


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_multi_bench_nccl_without_gpus_refused(cli):
    assert re.search(r"^--backend nccl needs 2 CUDA device\(s\), this machine has \d+; use ",
                     refusal(cli["nccl"], "bench_ep_moe_multi.py"))


def test_taken_master_port_refused_in_one_line(cli):
    port = cli["taken_port"]  # held by the fixture while its command lines ran
    assert re.search(rf"^--master-port {port} cannot be used: .*in use", refusal(cli["port"], "bench_ep_moe_multi.py"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ValueError, match=r"^master_port \d+ cannot be used"):  # the helper, for every bench
            spawn_ranks(_no_spawn, 2, taken)
    assert check_port(taken) == taken  # free again once the socket is closed


def _no_spawn(*_args: object) -> None:
    raise AssertionError("a rank was spawned for a flag mistake")


def test_torchrun_flags_that_do_not_apply(cli):
    assert re.search(r"^--world-size 4 differs from torchrun's WORLD_SIZE=2",
                     refusal(cli["torchrun_world"], "bench_ep_moe_multi.py"))
    assert re.search(r"^--master-port does not apply under torchrun",
                     refusal(cli["torchrun_port"], "bench_ep_moe_multi.py"))


@pytest.mark.parametrize("case", range(len(SINGLE_FLAGS)), ids=[" ".join(f) for f, _ in SINGLE_FLAGS])
def test_single_bench_flags_refused(cli, case):
    assert re.search(SINGLE_FLAGS[case][1], refusal(cli[("single", case)], "bench_ep_moe.py"))


def test_single_bench_cuda_graph_with_no_capturable_mode(cli):
    """--cuda-graph with only host-reading modes (loop, batched_gemm) would be silently eager: refused from the
    flags alone, before the device is even looked at (so on any machine)."""
    assert re.search(r"^--cuda-graph: none of the modes \['loop', 'batched_gemm'\] can be ",
                     refusal(cli["graph_modes"], "bench_ep_moe.py"))


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main() -> None:
        raise UsageError("--batch-size must be >= 1, got 0")

    with pytest.raises(SystemExit) as info:
        run_cli(main, "bench_ep_moe.py")
    assert info.value.code == 2
    assert capsys.readouterr().err == "bench_ep_moe.py: error: --batch-size must be >= 1, got 0\n"
    with pytest.raises(UsageError, match=r"^x$") as info:  # a UsageError is a SystemExit whose str is the message
        raise UsageError("x")
    assert isinstance(info.value, SystemExit) and "\n" not in str(info.value)


def test_command_line_exit_status_and_message(cli):
    """As a user runs it: status 2, exactly one stderr line, no traceback."""
    proc = cli[("multi", 0)]  # --world-size 3 --num-experts 8
    assert proc.returncode == 2
    assert proc.stderr == "bench_ep_moe_multi.py: error: --world-size (3) must divide --num-experts (8)\n"


def test_spawn_error_line_names_the_rank():
    exited = mp.ProcessExitedException("process 1 terminated with signal SIGABRT", 1, 1234, -6, "SIGABRT")
    assert spawn_error_line(exited) == "rank 1: killed by SIGABRT"
    assert spawn_error_line(mp.ProcessExitedException("process 0 terminated with exit code 3", 0, 1, 3)) == \
        "rank 0: exited with code 3"
    raised = mp.ProcessRaisedException("\n\n-- Process 0 terminated with the following error:\nTraceback (most "
                                       "recent call last):\n  File x\nValueError: rank 0: handshake: bad", 0, 99)
    assert spawn_error_line(raised) == "rank 0: ValueError: rank 0: handshake: bad"


# ---- the handshake's field names and messages (no processes) ---------------------------------------------------

def test_config_fields_names_and_stable_hash():
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2)
    fields = dict(config_fields((cfg, torch.float32, 4)))
    assert fields["MoEConfig.hidden"] == "32" and fields["[1]"] == "torch.float32" and fields["[2]"] == "4"
    named = dict(config_fields({"MoEConfig": cfg, "comm": ["torch"], "batch_size": 4}))
    assert named["MoEConfig.top_k"] == "2" and named["comm"] == "['torch']"
    assert config_hash(config_fields(cfg)) == config_hash(config_fields(MoEConfig(32, 16, 8, 2)))
    assert config_hash(config_fields(cfg)) != config_hash(config_fields(MoEConfig(16, 16, 8, 2)))
    with pytest.raises(TypeError, match="config field w is a tensor"):
        config_fields({"w": torch.zeros(2)})


def test_describe_mismatch_names_first_field_and_every_odd_rank():
    a, b = [("MoEConfig.hidden", "32"), ("x", "1")], [("MoEConfig.hidden", "16"), ("x", "1")]
    assert describe_mismatch([a, b], [None, None]) == (
        "ranks disagree on their config: rank 1 has MoEConfig.hidden=16, rank 0 has 32")
    c = [("MoEConfig.hidden", "8"), ("x", "2")]
    msg = describe_mismatch([a, a, c], [None] * 3)
    assert msg.startswith("ranks disagree on their config: rank 2 has MoEConfig.hidden=8, rank 0 has 32")
    assert "(also differing: x)" in msg
    assert "rank 1 has y=<missing>" in describe_mismatch([[("y", "1")], []], [None, None])
    assert "rank 1: boom" in describe_mismatch([a, None], [None, "boom"])


def test_handshake_without_process_group_or_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s must be a number > 0"):
        handshake({}, timeout_s=0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="no process group"):
            handshake({})


# ---- the handshake on 2 gloo ranks -----------------------------------------------------------------------------

def _cases(rank: int) -> dict:
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2)
    return {
        "same": {"MoEConfig": cfg, "dtype": torch.float32, "batch_size": 4},
        "hidden": MoEConfig(hidden=32 if rank == 0 else 16, intermediate=16, num_experts=8, top_k=2),
        "batch": {"MoEConfig": cfg, "dtype": torch.float32, "batch_size": 4 + rank},
        "tensor": {"w": torch.zeros(2) if rank == 1 else 1},
    }


def handshake_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every case in turn on this rank; then rank 1 stays away from one handshake. Results to a JSON file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    results = {}
    for name, cfg in _cases(rank).items():
        try:
            handshake(cfg, timeout_s=20)
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
            results[name] = f"{type(err).__name__}: {err}"
    if rank == 0:
        t0 = time.monotonic()
        try:
            handshake({"a": 1}, timeout_s=1.5)
            results["absent"] = "ok"
        except Exception as err:  # noqa: BLE001
            results["absent"] = f"{type(err).__name__}: {err}"
        results["absent_s"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if rank == 1:
        time.sleep(3)  # the absent peer: alive, never joins rank 0's last handshake
        os._exit(0)
    dist.destroy_process_group()


def run_bounded(fn: object, world_size: int, args: tuple, bound_s: float) -> None:
    """Spawn world_size ranks of fn; fail (killing them) if they are not all done within bound_s."""
    spawn_bounded(fn, world_size, (world_size, *args), bound_s)


def test_handshake_two_gloo_ranks(tmp_path):
    run_bounded(handshake_worker, 2, (free_port(), str(tmp_path)), bound_s=60)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["same"] == r1["same"] == "ok"
    want = "ranks disagree on their config: rank 1 has MoEConfig.hidden=16, rank 0 has 32"
    assert r0["hidden"] == f"ValueError: rank 0: handshake: {want}"
    assert r1["hidden"] == f"ValueError: rank 1: handshake: {want}"
    for r, res in enumerate((r0, r1)):
        assert res["batch"] == f"ValueError: rank {r}: handshake: ranks disagree on their config: " \
                               "rank 1 has batch_size=5, rank 0 has 4"
        assert res["tensor"].startswith(f"ValueError: rank {r}: handshake: some ranks could not hash their "
                                        "config: rank 1: handshake: config field w is a tensor")
    assert r0["absent"].startswith("TimeoutError: rank 0: stage 'handshake'"), r0["absent"]
    assert r0["absent_s"] < 10


def test_bench_ranks_with_different_flags_fail_together():
    """Two torchrun-style ranks of bench_ep_moe_multi.py started with different flags (as two torchrun command
    lines might): without the handshake they meet in an all_gather of different shapes, a native gloo abort."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = run_commands({r: ([MULTI, "--backend", "gloo", "--mode", "batched_gemm", *SMALL, "--hidden-dim",
                               "32" if r == 0 else "16", "--timeout", "20"], {**env, "RANK": str(r)})
                          for r in (0, 1)}, timeout_s=90)
    for r, proc in procs.items():
        assert proc.returncode == 1, proc.stderr[-2000:]
        last = proc.stderr.rstrip("\n").splitlines()[-1].removeprefix(f"[rank{r}]: ")  # torch tags rank output
        assert last == (
            f"ValueError: rank {r}: handshake: ranks disagree on their config: "
            "rank 1 has MoEConfig.hidden=16, rank 0 has 32 (also differing: MoEConfig.intermediate)"), proc.stderr
