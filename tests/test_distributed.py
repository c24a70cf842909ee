"""Expert parallelism over gloo on the CPU: EP output == single-rank output == reference.

Each test spawns W processes that run many cases (spawning is the slow part). Cases are drawn with a
seeded generator over configs, dtypes, backends and token counts, plus the edge cases: a rank with
zero tokens, all ranks with zero tokens, every token on the same experts (one rank gets all work), and placements with
redundant slots (replicas of experts, shuffled over ranks, as EPLB produces).
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.multiprocessing as mp

from nanomoe_fn import init_moe_params, moe_layer
from nanomoe_fn.comm.launch import free_port
from tests import dist_worker
from tests.helpers import MIN_MARGIN, TOL, assert_close_to_ref, reference_layer

pytestmark = pytest.mark.slow


def draw_cases(world_size: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        E = world_size * rng.choice([1, 2, 4, 8])
        n_group = rng.choice([g for g in (1, 2, 4) if E % g == 0])
        topk_group = rng.randint(1, n_group)
        score = rng.choice(["softmax", "sigmoid"])
        cfg = dict(hidden=rng.choice([8, 16, 48]), intermediate=rng.choice([8, 16]), num_experts=E,
                   top_k=rng.randint(1, min(6, topk_group * (E // n_group))), score_func=score, n_group=n_group,
                   topk_group=topk_group, norm_topk_prob=rng.random() < 0.5,
                   correction_bias=score == "sigmoid" and rng.random() < 0.5,
                   n_shared_experts=rng.randint(0, 1), expert_type=rng.choice(["swiglu", "linear"]))
        tokens = [rng.randint(0, 24) for _ in range(world_size)]
        if i == 0:
            tokens[-1] = 0  # a rank with zero tokens
        comm = ("torch", "torch_fixed", "torch_decode")[i % 3]  # the last two: no host sync
        dtype = rng.choice(["float32", "float16", "bfloat16"])
        # triton runs through its interpreter on the CPU, which gets bfloat16 wrong: bf16 Triton is a GPU test
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # set by the conftest where there is no GPU
        backends = ["loop", "bmm"] + (["triton"] if dtype != "bfloat16" and interpreted else [])
        cases.append(dict(cfg=cfg, dtype=dtype, seed=seed * 100 + i,
                          tokens=tokens, backend=rng.choice(backends),
                          capacity=max(1, sum(tokens)) if comm == "torch" and rng.random() < 0.3 else None,
                          comm=comm, comm_capacity=max(1, max(tokens)) + rng.randint(0, 2),
                          redundant=world_size * rng.choice([0, 1, 2]),
                          remap_policy=rng.choice(["static", "dynamic"])))
    base = dict(hidden=16, intermediate=8, num_experts=4 * world_size, top_k=2, expert_type="swiglu")
    cases.append(dict(cfg=base, dtype="float32", seed=7, tokens=[0] * world_size, backend="bmm"))
    cases.append(dict(cfg=base, dtype="float32", seed=8, tokens=[5] * world_size, backend="loop", hot=[1, 0]))
    cases.append(dict(cfg=base, dtype="float32", seed=9, tokens=[9] * world_size, backend="bmm", hot=[1, 0]))
    cases.append(dict(cfg=base, dtype="float32", seed=10, tokens=[9] * world_size, backend="bmm", hot=[1, 0],
                      comm="torch_fixed", comm_capacity=9))
    cases.append(dict(cfg=base, dtype="float32", seed=13, tokens=[7] * world_size, backend="loop",
                      comm="torch_fixed", comm_capacity=8, rank_capacity=14))
    # the hot experts replicated on every rank (EPLB-style redundant slots)
    cases.append(dict(cfg=base, dtype="float32", seed=12, tokens=[9] * world_size, backend="bmm", hot=[1, 0],
                      replicate=[1, 0] * world_size))
    cases.append(dict(cfg=base, dtype="float32", seed=14, tokens=[9] * world_size, backend="loop", hot=[0, 1],
                      replicate=[0, 1] * world_size, remap_policy="dynamic", comm="torch_fixed", comm_capacity=9))
    cases.append(dict(cfg=base, dtype="float32", seed=11, tokens=[0] * world_size, backend="loop",
                      comm="torch_fixed", comm_capacity=1))
    # the torch comm's decode mode: every token on two experts, replicas, an idle rank, all ranks idle
    cases.append(dict(cfg=base, dtype="float32", seed=15, tokens=[9] * world_size, backend="bmm", hot=[1, 0],
                      comm="torch_decode", comm_capacity=9))
    cases.append(dict(cfg=base, dtype="float32", seed=16, tokens=[6] * (world_size - 1) + [0], backend="loop",
                      hot=[0, 1], replicate=[0, 1] * world_size, remap_policy="dynamic", comm="torch_decode",
                      comm_capacity=7))
    cases.append(dict(cfg=base, dtype="float32", seed=17, tokens=[0] * world_size, backend="bmm",
                      comm="torch_decode", comm_capacity=1))
    return cases


@pytest.mark.parametrize("world_size", [2, 4])
def test_ep_equals_single_rank_equals_reference(world_size, tmp_path):
    cases = draw_cases(world_size, 10, seed=world_size)
    mp.start_processes(dist_worker.run_cases, args=(world_size, free_port(), cases, str(tmp_path)),
                       nprocs=world_size, join=True, start_method="spawn")
    compared = 0
    for i, case in enumerate(cases):
        for rank in range(world_size):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            ep = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            single = moe_layer(params, x, cfg, backend=case["backend"])
            ref, margin = reference_layer(params, x, cfg)
            if margin <= MIN_MARGIN and not case.get("hot"):
                continue  # a near-tie in routing: float32 and float64 may choose differently
            compared += 1
            assert ep.dtype == x.dtype and ep.shape == x.shape, f"case {i} rank {rank}"
            assert_close_to_ref(ep, ref, x.dtype, f"EP case {i} rank {rank}")
            # EP must reproduce the single-rank computation up to summation order
            assert_close_to_ref(ep, single.double(), x.dtype, f"EP vs single-rank case {i} rank {rank}")
    assert compared >= len(cases) * world_size // 2


def test_absent_peer_times_out_naming_rank_and_stage(tmp_path):
    mp.start_processes(dist_worker.run_absent_peer, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    seconds, message = (tmp_path / "error.txt").read_text().split("\n", 1)
    assert message.startswith("TimeoutError"), message
    assert "rank 0" in message and "dispatch/counts" in message, message
    assert float(seconds) < 10, f"took {seconds}s to notice a missing peer"


def test_fixed_capacity_overflow_is_an_error_on_every_rank(tmp_path):
    mp.start_processes(dist_worker.run_overflow, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        message = (tmp_path / f"overflow_rank{rank}.txt").read_text()
        assert message.startswith("ValueError") and "rank_capacity=1" in message and f"rank {rank}" in message, message


@pytest.mark.parametrize("max_tokens", [None, 5])
def test_torch_comm_reports_bad_ids_on_every_rank_and_stays_usable(tmp_path, max_tokens):
    # rank 1 holds an id outside [0, 8): both ranks learn it from the count tables and raise (exact splits:
    # before the rows move; decode mode on CPUs: from the block headers, before unpack)
    mp.start_processes(dist_worker.run_bad_ids, args=(2, free_port(), str(tmp_path), max_tokens), nprocs=2,
                       join=True, start_method="spawn")
    for rank in range(2):
        ok, message = (tmp_path / f"bad_ids_rank{rank}.txt").read_text().split("\n", 1)
        assert message.startswith(f"ValueError: rank {rank}: routing.topk_ids holds expert ids outside [0, 8) on "
                                  f"rank(s) [1] (1 ids"), message
        assert ok == "True", f"rank {rank}: the round after the refused one was wrong"


@pytest.mark.parametrize("kind", ["torch_decode", "torch_fixed"])
def test_oversized_rank_refused_at_combine_while_peers_finish(tmp_path, kind):
    # rank 0 gets 6 tokens with max_tokens=4: it sends none, takes part in both exchanges and its combine raises;
    # rank 1's output is right (no wait, no timeout), and the next round works on both ranks
    mp.start_processes(dist_worker.run_oversized, args=(2, free_port(), str(tmp_path), kind), nprocs=2, join=True,
                       start_method="spawn")
    name = "torch" if kind == "torch_decode" else "torch_fixed"
    first, second = (tmp_path / "oversized_rank0.txt").read_text().split("\n")
    assert first.startswith(f"ValueError: rank 0: x had 6 tokens, more than this {name} comm's max_tokens=4; none "
                            f"of them was sent"), first
    assert second == "True"
    assert (tmp_path / "oversized_rank1.txt").read_text().split("\n") == ["True", "True"]


def test_tolerances_are_not_vacuous():
    # the distributed comparison above uses these; make sure they would catch a wrong expert
    cfg_case = draw_cases(2, 1, seed=0)[0]
    cfg, params, x = dist_worker.case_inputs(cfg_case, 0)
    if x.shape[0] == 0:
        x = torch.randn(4, cfg.hidden).to(x.dtype)
    out = moe_layer(params, x, cfg)
    other = init_moe_params(cfg, x.dtype, generator=torch.Generator().manual_seed(123))
    wrong = moe_layer(type(params)(params.gate, other.experts, params.shared), x, cfg)
    err = float((wrong.double() - out.double()).norm() / out.double().norm())
    assert err > TOL[x.dtype]


def test_ep_output_is_unchanged_across_a_rebalance(tmp_path):
    from nanomoe_fn.eplb import balancedness, gpu_loads

    W = 2
    mp.start_processes(dist_worker.run_rebalance, args=(W, free_port(), str(tmp_path)), nprocs=W, join=True,
                       start_method="spawn")
    for rank in range(W):
        saved = torch.load(tmp_path / f"rebalance_rank{rank}.pt")
        cfg, params, x = dist_worker.skewed_case(W, rank)
        assert torch.equal(saved["x"], x)
        ref, _ = reference_layer(params, x, cfg)
        for i, out in enumerate(saved["outs"]):  # 3 steps before the move, 1 after
            assert_close_to_ref(out, ref, torch.float32, f"rank {rank} step {i}")
        assert not torch.equal(saved["phy2log_old"], saved["phy2log_new"]), "rebalance moved nothing"
        load = saved["load"].double()
        before = balancedness(gpu_loads(load, saved["phy2log_old"][None], W))
        after = balancedness(gpu_loads(load, saved["phy2log_new"][None], W))
        assert float(after.min()) > float(before.min()), (before, after)


def test_torch_fixed_refuses_prefill_sized_buffers():
    # one in-process gloo rank: the refusal is host arithmetic at the first dispatch, before any buffer exists
    import torch.distributed as dist

    from nanomoe_fn import Placement, Routing
    from nanomoe_fn.comm.torch_fixed import TorchFixedComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="max_buffer_bytes"):
            TorchFixedComm(8, max_buffer_bytes=0)
        comm = TorchFixedComm(4096)  # prefill-sized, DeepSeek-V3 dims: masked batch [256, 4096, 7168] bf16
        x = torch.zeros(2, 7168, dtype=torch.bfloat16)
        routing = Routing(torch.arange(16, dtype=torch.int32).view(2, 8), torch.full((2, 8), 0.125))
        need = comm.buffer_bytes(7168, torch.bfloat16, 8, 256)
        assert need == (256 * 4096 + 3 * 4096 * 8) * 7168 * 2
        with pytest.raises(ValueError, match=r"max_tokens=4096 would need 15\.\d\d GiB.*`torch` or `nvlink`"):
            comm.dispatch_send(x, routing, Placement.identity(256, 1))
        small = TorchFixedComm(2, max_buffer_bytes=need)  # decode-sized: runs
        batch, handle = small.dispatch_recv(small.dispatch_send(x, routing, Placement.identity(256, 1)))
        assert batch.layout == "masked" and tuple(batch.x.shape) == (256, 2, 7168)
        assert int(batch.counts.sum()) == 16
        comm.close()
        small.close()
    finally:
        dist.destroy_process_group()


def test_torch_decode_mode_refuses_bad_sizes_by_name():
    # one in-process gloo rank: the decode mode's checks are host arithmetic before any exchange
    import torch.distributed as dist

    from nanomoe_fn import Placement, Routing, combine, dispatch
    from nanomoe_fn.comm.torch_blocks import buffer_bytes
    from nanomoe_fn.comm.torch_dist import TorchComm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for bad in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="max_tokens must be None or a positive int"):
                TorchComm(max_tokens=bad)
        for bad in (1, "yes", None):
            with pytest.raises(ValueError, match="graphs must be True or False"):
                TorchComm(max_tokens=2, graphs=bad)
        x = torch.randn(3, 16)
        routing = Routing(torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32), torch.full((3, 2), 0.5))
        small = TorchComm(max_tokens=2)  # too many tokens: nothing sent, refused by combine after its exchange
        batch, handle = dispatch(x, routing, small, Placement.identity(4, 1))
        assert batch.counts.tolist() == [0, 0, 0, 0]
        with pytest.raises(ValueError, match=r"rank 0: x had 3 tokens, more than this torch comm's max_tokens=2"):
            combine(batch.materialize(), handle, small)
        small.close()
        need = buffer_bytes(4096, 1, 7168, torch.bfloat16, 8, 256)  # prefill-sized at V3 dims: 14 GiB
        assert need > 2 << 30
        with pytest.raises(ValueError, match=r"max_tokens=4096 needs 1\d\.\d\d GiB.*max_tokens=None"):
            TorchComm(max_tokens=4096).dispatch_send(torch.zeros(2, 7168, dtype=torch.bfloat16),
                                                     Routing(torch.arange(16, dtype=torch.int32).view(2, 8),
                                                             torch.full((2, 8), 0.125)), Placement.identity(256, 1))
        comm = TorchComm(max_tokens=5, graphs=True)  # one rank: the round is the identity on sum_k(w) * x
        batch, handle = dispatch(x, routing, comm, Placement.identity(4, 1))
        assert batch.layout == "masked" and tuple(batch.x.shape) == (4, 5, 16) and batch.counts.tolist() == [1, 2, 2, 1]
        assert torch.allclose(combine(batch, handle, comm), x, rtol=1e-6, atol=1e-6)
        assert comm._graph_sets == {}  # CPU: the graphs (comm/torch_graphs.py) are never used
        comm.close()
    finally:
        dist.destroy_process_group()


def test_torch_decode_mode_needs_one_max_tokens_on_every_rank(tmp_path):
    mp.start_processes(dist_worker.run_mismatched_max_tokens, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in range(2):
        message = (tmp_path / f"max_tokens_rank{rank}.txt").read_text()
        assert message == (f"ValueError: rank {rank}: TorchComm(max_tokens=...) must be the same on every rank (its "
                           f"blocks are equal splits), got [3, 4] (by rank)"), message
