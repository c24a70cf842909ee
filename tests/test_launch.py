"""Multi-rank launch: CLI mistakes refused once in the parent (one line, nothing spawned), port checks,
and the config handshake on 2 gloo ranks (ranks that disagree fail together, naming the field)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import bench_ep_moe, bench_ep_moe_multi
from bench.common import UsageError, run_cli
from nanomoe_fn import MoEConfig
from nanomoe_fn.comm.handshake import config_fields, config_hash, describe_mismatch, handshake
from nanomoe_fn.comm.launch import check_port, free_port, spawn_error_line, spawn_ranks
from tests.helpers import spawn_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "4", "--hidden-dim", "32", "--num-experts", "8", "--warmup", "0", "--iters", "1"]


# ---- CLI mistakes: refused in the parent, before anything is spawned -------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--world-size", "3", "--num-experts", "8"], r"^--world-size \(3\) must divide --num-experts \(8\)$"),
    (["--world-size", "0"], r"^--world-size must be an int >= 1, got 0$"),
    (["--batch-size", "0"], r"^--batch-size must be >= 1, got 0$"),
    (["--batch-size", "-2"], r"^--batch-size must be >= 1, got -2$"),
    (["--iters", "0"], r"^--iters must be >= 1"),
    (["--warmup", "-1"], r"^--warmup must be >= 0"),
    (["--intermediate-dim", "0"], r"^--intermediate-dim must be >= 1 when given, got 0$"),
    (["--tokens-per-expert", "0"], r"^--tokens-per-expert must be >= 1 when given"),
    (["--max-num-tokens", "0"], r"^--max-num-tokens must be >= 1 when given"),
    (["--timeout", "0"], r"^--timeout must be a finite number of seconds > 0"),
    (["--timeout", "nan"], r"^--timeout must be a finite number of seconds > 0"),
    (["--master-port", "0"], r"^--master-port must be in 1\.\.65535, got 0$"),
    (["--master-port", "70000"], r"^--master-port must be in 1\.\.65535, got 70000$"),
    (["--device", "cuda:0"], r"^--device: the multi-rank bench places ranks itself"),
    (["--cuda-graph", "--comm", "torch_fixed"], r"^--cuda-graph needs CUDA GPUs"),
])
def test_multi_bench_flags_refused_in_parent(flags, match, monkeypatch):
    """Each mistake: a UsageError (a SystemExit) with one line, and no rank is ever spawned."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(bench_ep_moe_multi, "spawn_ranks", _no_spawn)
    with pytest.raises(UsageError, match=match) as info:
        bench_ep_moe_multi.main(["--backend", "gloo", *flags])
    assert "\n" not in str(info.value)


def _no_spawn(*_args: object) -> None:
    raise AssertionError("a rank was spawned for a flag mistake")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs a machine with fewer than 2 GPUs")
def test_multi_bench_nccl_without_gpus_refused(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(bench_ep_moe_multi, "spawn_ranks", _no_spawn)
    with pytest.raises(UsageError, match=r"^--backend nccl needs 2 CUDA device\(s\), this machine has \d+; use "):
        bench_ep_moe_multi.main(["--backend", "nccl", "--comm", "torch"])


def test_taken_master_port_refused_in_one_line(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(bench_ep_moe_multi, "spawn_ranks", _no_spawn)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=rf"^--master-port {port} cannot be used: .*in use") as info:
            bench_ep_moe_multi.main(["--backend", "gloo", "--master-port", str(port)])
        assert "\n" not in str(info.value)
        with pytest.raises(ValueError, match=r"^master_port \d+ cannot be used"):  # the helper, for every bench
            spawn_ranks(_no_spawn, 2, port)
    assert check_port(port) == port  # free again once the socket is closed


def test_torchrun_flags_that_do_not_apply(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(bench_ep_moe_multi, "run_rank", _no_spawn)
    with pytest.raises(UsageError, match=r"^--world-size 4 differs from torchrun's WORLD_SIZE=2"):
        bench_ep_moe_multi.main(["--backend", "gloo", "--world-size", "4"])
    with pytest.raises(UsageError, match=r"^--master-port does not apply under torchrun"):
        bench_ep_moe_multi.main(["--backend", "gloo", "--master-port", "29500"])


@pytest.mark.parametrize("flags, match", [
    (["--cuda-graph", "--device", "cpu"], r"^--cuda-graph needs a CUDA device \(this run is on cpu\)"),
    (["--batch-size", "0", "--device", "cpu"], r"^--batch-size must be >= 1, got 0$"),
    (["--device", "foo"], r"^--device: expected cpu or cuda\[:i\], got 'foo'$"),
    (["--device", "meta"], r"^--device: expected cpu or cuda\[:i\], got 'meta'$"),
])
def test_single_bench_flags_refused(flags, match):
    if "--device" in flags and torch.cuda.is_available() and "--cuda-graph" in flags:
        pytest.skip("a CUDA machine runs --cuda-graph")
    with pytest.raises(UsageError, match=match):
        bench_ep_moe.main(flags)


def test_single_bench_cuda_graph_with_no_capturable_mode(monkeypatch):
    """On a GPU, --cuda-graph with only host-reading modes (loop, batched_gemm) would be silently eager."""
    monkeypatch.setattr(bench_ep_moe, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(bench_ep_moe, "make_inputs", _no_spawn)  # refused before any tensor is made
    with pytest.raises(UsageError, match=r"^--cuda-graph: none of the modes \['loop', 'batched_gemm'\] can be "):
        bench_ep_moe.main(["--cuda-graph", "--mode", "both"])


def test_run_cli_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: bench_ep_moe.main(["--batch-size", "0", "--device", "cpu"]), "bench_ep_moe.py")
    assert info.value.code == 2
    assert capsys.readouterr().err == "bench_ep_moe.py: error: --batch-size must be >= 1, got 0\n"


def test_command_line_exit_status_and_message():
    """As a user runs it: status 2, exactly one stderr line, no traceback."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_ep_moe_multi.py"), "--backend", "gloo",
           "--world-size", "3", "--num-experts", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
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


def bench_rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """bench_ep_moe_multi's rank with flags that differ per rank (as two torchrun command lines might)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    args = bench_ep_moe_multi.build_parser().parse_args(
        ["--backend", "gloo", "--mode", "batched_gemm", *SMALL, "--hidden-dim", "32" if rank == 0 else "16",
         "--timeout", "20"])
    bench_ep_moe_multi.check_launch_flags(args, torchrun=False)
    try:
        bench_ep_moe_multi.run_rank(rank, world_size, args)
        message = "ok"
    except BaseException as err:  # noqa: BLE001 - the test inspects whatever was raised
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"bench{rank}.txt"), "w") as f:
        f.write(message)


def test_bench_ranks_with_different_flags_fail_together(tmp_path):
    """Without the handshake these ranks meet in an all_gather of different shapes: a native gloo abort."""
    run_bounded(bench_rank_worker, 2, (free_port(), str(tmp_path)), bound_s=60)
    for r in (0, 1):
        msg = (tmp_path / f"bench{r}.txt").read_text()
        assert msg == (f"ValueError: rank {r}: handshake: ranks disagree on their config: "
                       "rank 1 has MoEConfig.hidden=16, rank 0 has 32 (also differing: MoEConfig.intermediate)")
