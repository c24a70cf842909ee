"""The `nvlink` comm on 2+ GPUs of one host: EP layer == float64 reference == single-rank layer, CUDA-graph
replay == eager, and a peer that never arrives ends with a TimeoutError naming rank and stage.

Each test spawns one NCCL rank per GPU; ranks save their outputs and the parent compares on the CPU.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nanomoe_fn import moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from tests import dist_worker
from tests.helpers import (
    GPU_SAFE_ENV,
    MIN_MARGIN,
    assert_close_to_ref,
    init_nccl_rank,
    reference_layer,
    spawn_bounded,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
SAFE_ENV = GPU_SAFE_ENV
W = 2


def _init(rank: int, port: int) -> torch.device:
    return init_nccl_rank(rank, port, W)


def _spawn(fn, *args) -> None:
    os.environ.update(SAFE_ENV)
    spawn_bounded(fn, W, (free_port(), *args), 240, "nvlink GPU workers")


def draw_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        E = W * rng.choice([2, 4, 8])
        tokens = [rng.randint(0, 40) for _ in range(W)]
        if i == 0:
            tokens[1] = 0  # a rank with no tokens
        dtype = rng.choice(["bfloat16", "float16", "float32"])
        cases.append(dict(cfg=dict(hidden=rng.choice([64, 256, 1100]), intermediate=rng.choice([32, 64]),
                                   num_experts=E, top_k=rng.randint(1, min(4, E)), n_shared_experts=rng.randint(0, 1),
                                   expert_type=rng.choice(["swiglu", "linear"])),
                          dtype=dtype, seed=seed * 100 + i, tokens=tokens, mode=rng.choice(["decode", "prefill"]),
                          backend=rng.choice(["bmm", "triton"] if dtype != "float32" else ["bmm", "loop"]),
                          redundant=W * rng.choice([0, 1]), remap_policy=rng.choice(["static", "dynamic"])))
    base = dict(hidden=128, intermediate=64, num_experts=4 * W, top_k=2, expert_type="swiglu")
    cases.append(dict(cfg=base, dtype="bfloat16", seed=7, tokens=[0] * W, backend="bmm", mode="decode"))
    cases.append(dict(cfg=base, dtype="bfloat16", seed=8, tokens=[33] * W, backend="triton", hot=[1, 0], mode="decode"))
    cases.append(dict(cfg=base, dtype="bfloat16", seed=9, tokens=[17] * W, backend="bmm", hot=[1, 0],
                      replicate=[1, 0] * W, mode="prefill"))
    cases.append(dict(cfg=base, dtype="float32", seed=10, tokens=[5, 29], backend="loop", mode="prefill"))
    return cases


def _on(dev: torch.device, tree):
    return pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, tree)


def _run_cases(rank: int, port: int, cases: list[dict], out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    try:
        for i, case in enumerate(cases):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            placement = dist_worker.case_placement(case, cfg, W)
            comm = NvlinkComm(max(1, max(case["tokens"])), cfg.hidden, cfg.top_k, placement.num_physical,
                              x.dtype, case["mode"], timeout_s=30)
            local = _on(dev, shard_moe_params(params, placement, rank))
            outs = [moe_layer(local, x.to(dev), cfg, comm, placement.to(dev), backend=case["backend"])
                    for _ in range(2)]  # twice: the second call reuses the buffers (epochs move on)
            torch.save([o.cpu() for o in outs], os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nvlink_layer_equals_reference_and_single_rank(tmp_path):
    cases = draw_cases(8, seed=3)
    _spawn(_run_cases, cases, str(tmp_path))
    compared = 0
    for i, case in enumerate(cases):
        for rank in range(W):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            outs = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            ref, margin = reference_layer(params, x, cfg)
            if margin <= MIN_MARGIN and not case.get("hot"):
                continue
            compared += 1
            single = moe_layer(params, x, cfg, backend="loop")
            for j, out in enumerate(outs):
                what = f"case {i} ({case['mode']}, {case['dtype']}, {case['backend']}) rank {rank} call {j}"
                assert out.dtype == x.dtype and out.shape == x.shape, what
                assert_close_to_ref(out, ref, x.dtype, what)
                assert_close_to_ref(out, single.double(), x.dtype, what + " vs single rank")
    assert compared >= len(cases)


def _run_graph(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    try:
        case = dict(cfg=dict(hidden=512, intermediate=128, num_experts=16, top_k=4, n_shared_experts=1),
                    dtype="bfloat16", seed=21, tokens=[24, 24])
        cfg, params, x = dist_worker.case_inputs(case, rank)
        placement = dist_worker.case_placement(case, cfg, W).to(dev)
        comm = NvlinkComm(32, cfg.hidden, cfg.top_k, placement.num_physical, x.dtype, "decode", timeout_s=30)
        local = _on(dev, shard_moe_params(params, placement, rank))
        static_x = x.to(dev).clone()
        eager = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        outs = []
        for scale in (1.0, -0.5):  # new inputs through the same graph
            static_x.copy_(x.to(dev) * scale)
            graph.replay()
            outs.append(static_out.clone())
        torch.cuda.synchronize()
        again = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        torch.save({"eager": eager.cpu(), "graph": [o.cpu() for o in outs], "again": again.cpu()},
                   os.path.join(out_dir, f"graph_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nvlink_decode_layer_replays_in_a_cuda_graph(tmp_path):
    _spawn(_run_graph, str(tmp_path))
    for rank in range(W):
        saved = torch.load(tmp_path / f"graph_rank{rank}.pt")
        assert torch.isfinite(saved["graph"][0]).all()
        assert torch.equal(saved["graph"][0], saved["eager"]), f"rank {rank}: graph replay != eager"
        assert torch.equal(saved["graph"][1], saved["again"]), f"rank {rank}: replay on new input != eager"
        assert not torch.equal(saved["graph"][0], saved["graph"][1])


def _run_absent(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    cfg = dict(hidden=64, intermediate=32, num_experts=4, top_k=2)
    case = dict(cfg=cfg, dtype="bfloat16", seed=5, tokens=[6, 6])
    cfgo, params, x = dist_worker.case_inputs(case, rank)
    placement = dist_worker.case_placement(case, cfgo, W).to(dev)
    comm = NvlinkComm(8, 64, 2, 4, torch.bfloat16, "decode", timeout_s=3)
    if rank == 1:
        time.sleep(12)  # joined the comm, then never dispatches
        return
    t0 = time.monotonic()
    try:
        moe_layer(_on(dev, shard_moe_params(params, placement, 0)), x.to(dev), cfgo, comm, placement)
        torch.cuda.synchronize()
        comm.check()
        message = "no error"
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, "absent.txt"), "w") as f:
        f.write(f"{time.monotonic() - t0:.2f}\n{message}")


def test_nvlink_absent_peer_times_out_naming_rank_and_stage(tmp_path):
    _spawn(_run_absent, str(tmp_path))
    seconds, message = (tmp_path / "absent.txt").read_text().split("\n", 1)
    assert message.startswith("TimeoutError"), message
    assert "rank 0" in message and "dispatch/payload" in message and "rank 1" in message, message
    assert float(seconds) < 15, f"took {seconds}s to notice a missing peer"
