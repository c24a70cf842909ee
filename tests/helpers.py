"""Test helpers: dtype-scaled comparison with the float64 reference, config/input drawing, bounded rank
spawning, and bench command lines run as subprocesses (tests never import bench/)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import nanomoe_reference as reference
import torch
from hypothesis import strategies as st

from nanomoe_fn import MoEConfig, MoEParams, expert_tensors

# relative (norm-wise) error allowed against the float64 reference, by activation dtype
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# routing decisions whose relative top-k margin is below this are near-ties: float32 vs float64 may differ
MIN_MARGIN = 2e-5


# every multi-GPU test's environment: NVLink multicast off (it can take the shared host's GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """NaN/Inf first, then shape, then norm-wise relative error within the dtype's tolerance."""
    assert torch.isfinite(out).all(), f"{what} has NaN/Inf"
    assert tuple(out.shape) == tuple(ref.shape), f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


def route_kwargs(cfg: MoEConfig, params: MoEParams) -> dict:
    """The reference router's keyword arguments for this config and parameters."""
    return dict(score_func=cfg.score_func, bias=params.gate.bias, n_group=cfg.n_group,
                topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor, group_score=cfg.group_score)


def reference_layer(params: MoEParams, x: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, float]:
    """reference.moe_layer on these parameters: (out [T, H] float64, routing margin)."""
    shared = None if params.shared is None else (params.shared.w13, params.shared.w2)
    return reference.moe_layer(x, params.gate.weight, expert_tensors(params.experts), cfg.top_k,
                               cfg.expert_type, shared, **route_kwargs(cfg, params))


@st.composite
def moe_configs(draw: st.DrawFn, max_experts: int = 64, max_hidden: int = 256) -> MoEConfig:
    """Valid configs: experts 1-64, top-k 1-8, hidden 8-256, groups, both score functions, both expert types."""
    E = draw(st.integers(1, max_experts))
    n_group = draw(st.sampled_from([g for g in (1, 2, 4, 8) if E % g == 0]))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, min(8, topk_group * (E // n_group))))
    score_func = draw(st.sampled_from(["softmax", "sigmoid"]))
    return MoEConfig(
        hidden=draw(st.integers(8, max_hidden)), intermediate=draw(st.integers(4, 64)), num_experts=E,
        top_k=top_k, score_func=score_func, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=draw(st.booleans()), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
        correction_bias=score_func == "sigmoid" and draw(st.booleans()),
        n_shared_experts=draw(st.integers(0, 1)), expert_type=draw(st.sampled_from(["swiglu", "linear"])),
        group_score=draw(st.sampled_from([None, "max", "top2_sum"])),
    )


def spawn_bounded(fn: object, nprocs: int, args: tuple, limit_s: float, what: str = "spawned ranks") -> None:
    """Run fn(rank, *args) in nprocs spawned processes; a rank's exception propagates (with its traceback),
    and ranks still running after limit_s are killed and the test fails: a hang never eats the run."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    try:
        while not ctx.join(timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish within {limit_s:g} s (a hang): ranks killed")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # torchrun's: not inherited


def run_commands(commands: Mapping[Any, Sequence[str] | tuple[Sequence[str], Mapping[str, str]]],
                 timeout_s: float = 240.0, parallel: int | None = None) -> dict[Any, subprocess.CompletedProcess]:
    """Run command lines as they are typed, `python <argv...>` from the repository root, each its own
    `sys.executable` process, `parallel` at a time (default: cores + 1; torch's import, ~1.5 s of CPU,
    dominates a refused command line, so they share the cores instead of queueing).

    commands: {key: argv} or {key: (argv, env overrides)}, argv starting with the script's path
    (e.g. ["bench/bench_ep_moe.py", "--iters", "1"]). The environment is this one without torchrun's
    variables (a command is no rank unless its overrides say so). Returns {key: CompletedProcess} with
    text stdout/stderr; a command past timeout_s raises subprocess.TimeoutExpired (after killing it).
    """
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}

    def one(spec: Sequence[str] | tuple[Sequence[str], Mapping[str, str]]) -> subprocess.CompletedProcess:
        argv, extra = (spec if isinstance(spec, tuple) else (spec, {}))
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env={**base, **extra}, capture_output=True,
                              text=True, timeout=timeout_s)

    workers = parallel or (os.cpu_count() or 1) + 1
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(one, spec) for key, spec in commands.items()}
        return {key: f.result() for key, f in futures.items()}


GPU_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def init_nccl_rank(rank: int, port: int, world_size: int, timeout_s: float = 60.0) -> torch.device:
    """One spawned GPU test rank: NVLink multicast off, its GPU current, an NCCL process group -> its device."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(GPU_SAFE_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", rank)


def capture_graph(run: Callable[[], Any], warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, its output): run() warmed up (JIT compiles included) on a side stream, as torch.cuda.graph wants,
    then captured. Other threads (a process group's or a comm's watchdog) may keep making CUDA calls meanwhile
    (thread_local). Replay after changing run's inputs in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = run()
    return graph, out


def graph_replays(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, inputs: Sequence[torch.Tensor],
                  warmup: int = 2) -> list[torch.Tensor]:
    """fn on a static copy of example, captured by capture_graph; then one replay per input (copied into the
    static tensor) -> clones of the outputs."""
    static = example.clone()
    graph, out = capture_graph(lambda: fn(static), warmup)
    replays = []
    for x in inputs:
        static.copy_(x)
        graph.replay()
        replays.append(out.clone())
    torch.cuda.synchronize()
    del graph
    return replays
