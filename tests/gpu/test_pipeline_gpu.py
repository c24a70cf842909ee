"""Every schedule of the pipeline transform on 2 GPUs: sequential, shared-expert overlap, two-batch overlap and
both give the same MoE layer output as sequential and the single-rank layer, for the torch (exact splits and
decode mode), torch_fixed and nvlink comms (nvlink and two-batch overlap: one comm instance per micro-batch),
decode and prefill sizes, a rank whose second micro-batch is empty. The overlapped schedules run their
exchanges on exchange streams (pipeline/streams.py): at DeepSeek-like widths, over several rounds of new
tokens (a missing event would show as a mismatch), and captured in a CUDA graph (nvlink and the torch decode
mode), each replay equal to eager sequential on the same tokens; there too sequential and two-batch overlap
compiled as one graph (inductor, fullgraph=True) over OpComm (the comm's halves as custom ops).

Each test spawns one NCCL rank per GPU; ranks save their outputs and the parent compares on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nanomoe_fn import TorchComm, TorchFixedComm, moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.comm.ops import OpComm
from nanomoe_fn.moe.layer import MOE_PROGRAM, run_moe
from nanomoe_fn.pipeline import sequential, shared_expert_overlap, two_batch_overlap
from tests import dist_worker
from tests.helpers import (
    GPU_SAFE_ENV,
    MIN_MARGIN,
    assert_close_to_ref,
    graph_replays,
    init_nccl_rank,
    reference_layer,
    spawn_bounded,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
SAFE_ENV = GPU_SAFE_ENV
W = 2
PLANS = {"sequential": lambda: sequential(MOE_PROGRAM),
         "shared_overlap": lambda: sequential(shared_expert_overlap(MOE_PROGRAM)),
         "tbo": lambda: two_batch_overlap(MOE_PROGRAM),
         "tbo+shared": lambda: two_batch_overlap(shared_expert_overlap(MOE_PROGRAM)),
         "shared_stream": lambda: sequential(shared_expert_overlap(MOE_PROGRAM, window=None, stream=True)),
         "shared_stream_after_send": lambda: sequential(shared_expert_overlap(MOE_PROGRAM, stream=True)),
         "tbo+shared_stream": lambda: two_batch_overlap(shared_expert_overlap(MOE_PROGRAM, window=None, stream=True))}


def _init(rank: int, port: int) -> torch.device:
    return init_nccl_rank(rank, port, W)


def _on(dev: torch.device, tree):
    return pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, tree)


def _comms(case: dict, cfg, placement, dtype, n: int) -> list:
    if case["comm"] == "torch":
        return [TorchComm(timeout_s=30) for _ in range(n)]
    if case["comm"] == "torch_decode":
        return [TorchComm(max_tokens=max(1, max(case["tokens"])), timeout_s=30) for _ in range(n)]
    if case["comm"] == "torch_fixed":
        return [TorchFixedComm(max(1, max(case["tokens"])), timeout_s=30) for _ in range(n)]
    from nanomoe_fn.comm.nvlink import NvlinkComm

    return [NvlinkComm(max(1, max(case["tokens"])), cfg.hidden, cfg.top_k, placement.num_physical, dtype,
                       case["mode"], timeout_s=30) for _ in range(n)]


CASES = [
    dict(comm="torch", mode="prefill", tokens=[37, 20], dtype="bfloat16", backend="triton", seed=1),
    dict(comm="torch", mode="decode", tokens=[1, 6], dtype="bfloat16", backend="bmm", seed=2),
    dict(comm="torch_fixed", mode="decode", tokens=[9, 9], dtype="bfloat16", backend="triton", seed=3),
    dict(comm="nvlink", mode="decode", tokens=[16, 1], dtype="bfloat16", backend="triton", seed=4),
    dict(comm="nvlink", mode="prefill", tokens=[40, 33], dtype="bfloat16", backend="triton", seed=5),
    dict(comm="nvlink", mode="decode", tokens=[5, 0], dtype="float32", backend="loop", seed=6),
    dict(comm="torch_decode", mode="decode", tokens=[12, 3], dtype="bfloat16", backend="triton", seed=7),
]
CFG = dict(hidden=256, intermediate=64, num_experts=8, top_k=2, n_shared_experts=1)


def _run(rank: int, port: int, out_dir: str) -> None:
    dev = _init(rank, port)
    try:
        for i, case in enumerate(CASES):
            case = {**case, "cfg": CFG}
            cfg, params, x = dist_worker.case_inputs(case, rank)
            placement = dist_worker.case_placement(case, cfg, W)
            local = _on(dev, shard_moe_params(params, placement, rank))
            outs = {}
            for name, make in PLANS.items():
                plan = make()
                comms = _comms(case, cfg, placement, x.dtype, plan.micro_batches)
                outs[name] = run_moe(plan, local, x.to(dev), cfg, comms if len(comms) > 1 else comms[0],
                                     placement.to(dev), case["backend"]).cpu()
            torch.save(outs, os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_schedule_equals_sequential_and_single_rank_on_two_gpus(tmp_path):
    os.environ.update(SAFE_ENV)
    spawn_bounded(_run, W, (free_port(), str(tmp_path)), 300, "pipeline GPU workers")
    for i, case in enumerate(CASES):
        case = {**case, "cfg": CFG}
        for rank in range(W):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            outs = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            what = f"case {i} ({case['comm']} {case['mode']} {case['backend']}) rank {rank}"
            ref, margin = reference_layer(params, x, cfg)
            if margin > MIN_MARGIN:
                assert_close_to_ref(outs["sequential"], ref, x.dtype, what)
                assert_close_to_ref(outs["sequential"], moe_layer(params, x, cfg, backend="loop").double(), x.dtype,
                                    what + " vs single rank")
            for name, out in outs.items():
                assert out.shape == x.shape and out.dtype == x.dtype, what + " " + name
                assert_close_to_ref(out, outs["sequential"].double(), x.dtype, f"{what} {name} vs sequential")


WIDE = dict(hidden=2048, intermediate=512, num_experts=32, top_k=8, n_shared_experts=1, score_func="sigmoid",
            n_group=4, topk_group=2, correction_bias=True)
STREAM_CASES = [dict(comm="nvlink", mode="prefill", tokens=[300, 180], graph=False),
                dict(comm="torch", mode="prefill", tokens=[256, 256], graph=False),
                dict(comm="nvlink", mode="decode", tokens=[64, 64], graph=True),
                dict(comm="torch_decode", mode="decode", tokens=[64, 64], graph=True)]
ROUNDS = 3


def _stream_worker(rank: int, port: int, out_dir: str) -> None:
    dev = _init(rank, port)
    try:
        for i, case in enumerate(STREAM_CASES):
            case = {**case, "cfg": WIDE, "dtype": "bfloat16", "seed": 40 + i, "backend": "triton"}
            cfg, params, _ = dist_worker.case_inputs(case, rank)
            placement = dist_worker.case_placement(case, cfg, W).to(dev)
            local = _on(dev, shard_moe_params(params, placement, rank))
            gen = torch.Generator().manual_seed(1000 * i + rank)
            xs = [torch.randn(case["tokens"][rank], cfg.hidden, generator=gen).to(dev, torch.bfloat16)
                  for _ in range(ROUNDS)]
            outs: dict = {}
            for name, make in PLANS.items():
                plan = make()
                comms = _comms(case, cfg, placement, torch.bfloat16, plan.micro_batches)
                comm = comms if len(comms) > 1 else comms[0]

                def layer(x, plan=plan, comm=comm, local=local, cfg=cfg, placement=placement):
                    return run_moe(plan, local, x, cfg, comm, placement, "triton")

                outs[name] = [layer(x).cpu() for x in xs]  # back to back: events are all that orders the streams
                if case["graph"] and name != "sequential":
                    outs[name + "+graph"] = [r.cpu() for r in graph_replays(layer, xs[0], xs)]
                if case["graph"] and name in ("sequential", "tbo"):  # one graph over OpComm, inductor
                    ops = [OpComm(c, placement) for c in comms]
                    torch._dynamo.reset()
                    compiled = torch.compile(lambda x, plan=plan, ops=ops, local=local, cfg=cfg, placement=placement:
                                             run_moe(plan, local, x, cfg, ops if len(ops) > 1 else ops[0],
                                                     placement, "triton"), fullgraph=True, dynamic=False)
                    outs[name + "+fullgraph"] = [compiled(x).cpu() for x in xs]
            torch.save(outs, os.path.join(out_dir, f"stream{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_overlapped_schedules_on_exchange_streams_equal_sequential_every_round_and_in_graphs(tmp_path):
    os.environ.update(SAFE_ENV)
    spawn_bounded(_stream_worker, W, (free_port(), str(tmp_path)), 300, "pipeline stream workers")
    for i, case in enumerate(STREAM_CASES):
        for rank in range(W):
            outs = torch.load(tmp_path / f"stream{i}_rank{rank}.pt")
            want = len(PLANS) + (len(PLANS) - 1 + 2 if case["graph"] else 0)
            assert len(outs) == want, f"stream case {i} rank {rank}: ran {sorted(outs)}"
            for name, rounds in outs.items():
                for j, out in enumerate(rounds):
                    what = f"stream case {i} ({case['comm']} {case['mode']}) rank {rank} {name} round {j}"
                    assert_close_to_ref(out, outs["sequential"][j].double(), torch.bfloat16, what + " vs sequential")
            assert not torch.equal(outs["sequential"][0], outs["sequential"][1]), "the rounds' tokens must differ"
