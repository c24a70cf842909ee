"""Code that runs inside spawned gloo ranks for tests/test_distributed.py (importable by child processes).

Dimension legend: T tokens on a rank, H hidden, E experts, W ranks.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from nanomoe_fn import (
    MoEConfig,
    MoEParams,
    Placement,
    TorchComm,
    TorchFixedComm,
    init_moe_params,
    moe_layer,
    shard_moe_params,
)


def error_of(fn) -> str:  # noqa: ANN001 - any zero-argument callable
    """'no error' when fn() returns, else 'ExceptionType: message' (the tests inspect whatever was raised)."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return "no error"


def case_inputs(case: dict, rank: int) -> tuple[MoEConfig, MoEParams, torch.Tensor]:
    """The config, full parameters and rank `rank`'s tokens for one test case (same on every rank)."""
    cfg = MoEConfig(**case["cfg"])
    dtype = getattr(torch, case["dtype"])
    params = init_moe_params(cfg, dtype, generator=torch.Generator().manual_seed(case["seed"]))
    T = case["tokens"][rank]
    x = torch.randn(T, cfg.hidden, generator=torch.Generator().manual_seed(case["seed"] * 31 + rank + 1))
    if case.get("hot"):
        # every token picks the same top-k experts: distinct positive weights on positive inputs
        w = torch.zeros_like(params.gate.weight)
        for j, e in enumerate(case["hot"]):
            w[e] = 4.0 / (j + 1)
        params = MoEParams(type(params.gate)(w, params.gate.bias), params.experts, params.shared)
        x = x.abs() + 0.1
    return cfg, params, x.to(dtype)


def case_placement(case: dict, cfg: MoEConfig, world_size: int) -> Placement:
    """Identity, or extra slots holding copies of case["replicate"] (or case["redundant"] random experts),
    all slots shuffled over the ranks."""
    gen = torch.Generator().manual_seed(case["seed"] + 99)
    if case.get("replicate"):
        extra = torch.tensor(case["replicate"])
    elif case.get("redundant"):
        extra = torch.randint(0, cfg.num_experts, (case["redundant"],), generator=gen)
    else:
        return Placement.identity(cfg.num_experts, world_size)
    phy2log = torch.cat([torch.arange(cfg.num_experts), extra])
    placement = Placement.from_phy2log(phy2log[torch.randperm(phy2log.numel(), generator=gen)], cfg.num_experts,
                                       world_size)
    return placement.with_policy(case.get("remap_policy", "static"))


def _init(rank: int, world_size: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def run_cases(rank: int, world_size: int, port: int, cases: list[dict], out_dir: str) -> None:
    """EP forward of every case on this rank; saves each output to out_dir/case{i}_rank{rank}.pt."""
    _init(rank, world_size, port, 60)
    try:
        for i, case in enumerate(cases):
            cfg, params, x = case_inputs(case, rank)
            if case.get("comm") == "torch_fixed":
                comm = TorchFixedComm(case["comm_capacity"], case.get("rank_capacity"), timeout_s=60)
            elif case.get("comm") == "torch_decode":  # the torch comm's fixed blocks
                comm = TorchComm(timeout_s=60, max_tokens=case["comm_capacity"])
            else:
                comm = TorchComm(timeout_s=60)
            placement = case_placement(case, cfg, world_size)
            out = moe_layer(shard_moe_params(params, placement, rank), x, cfg, comm, placement,
                            backend=case["backend"], capacity=case.get("capacity"))
            torch.save(out, os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_absent_peer(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 0 runs a layer; the others never join the exchange. Rank 0 saves the error it gets."""
    _init(rank, world_size, port, 30)
    if rank != 0:
        time.sleep(8)  # a peer that never arrives (then exits without a word)
        return
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(0))
    placement = Placement.identity(4, world_size)
    t0 = time.monotonic()
    message = error_of(lambda: moe_layer(shard_moe_params(params, placement, 0), torch.randn(3, 16), cfg,
                                         TorchComm(timeout_s=1.5), placement))
    with open(os.path.join(out_dir, "error.txt"), "w") as f:
        f.write(f"{time.monotonic() - t0:.2f}\n{message}")


def run_overflow(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every token on the same experts with a rank capacity of 1 row: each rank saves its error."""
    _init(rank, world_size, port, 30)
    try:
        case = dict(cfg=dict(hidden=16, intermediate=8, num_experts=2 * world_size, top_k=2), dtype="float32",
                    seed=5, tokens=[4] * world_size, hot=[0, 1])
        cfg, params, x = case_inputs(case, rank)
        placement = Placement.identity(cfg.num_experts, world_size)
        message = error_of(lambda: moe_layer(shard_moe_params(params, placement, rank), x, cfg,
                                             TorchFixedComm(4, rank_capacity=1, timeout_s=3), placement))
        with open(os.path.join(out_dir, f"overflow_rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


def run_bad_ids(rank: int, world_size: int, port: int, out_dir: str, max_tokens: int | None = None) -> None:
    """Rank 1 dispatches an expert id outside [0, E) through the torch comm: every rank saves its error,
    then every rank runs a good round on the same comm (it must still work) and saves whether it matched."""
    _init(rank, world_size, port, 30)
    try:
        from nanomoe_fn import Routing, combine, dispatch

        E, k, H, T = 4 * world_size, 2, 8, 5
        g = torch.Generator().manual_seed(rank)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        w, x = torch.rand(T, k, generator=g), torch.randn(T, H, generator=g)
        bad = ids.clone()
        if rank == 1:
            bad[2, 1] = E + 5
        comm, placement = TorchComm(timeout_s=5, max_tokens=max_tokens), Placement.identity(E, world_size)
        message = error_of(lambda: dispatch(x, Routing(bad, w), comm, placement))
        batch, handle = dispatch(x, Routing(ids, w), comm, placement)
        out = combine(batch.materialize(), handle, comm)  # identity experts
        ok = torch.allclose(out, x * w.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
        with open(os.path.join(out_dir, f"bad_ids_rank{rank}.txt"), "w") as f:
            f.write(f"{ok}\n{message}")
    finally:
        dist.destroy_process_group()


def run_oversized(rank: int, world_size: int, port: int, out_dir: str, kind: str, backend: str = "gloo") -> None:
    """Rank 0 dispatches more tokens than max_tokens=4 through a fixed-size comm (kind 'torch_decode',
    'torch_fixed', 'nvlink' / 'nvlink_prefill' (GPUs only) or 'deepep_ll': DeepEP's low-latency mode, bf16 rows of
    2048), the others 3; identity experts.
    Each rank saves whether its output matched (or the error), then runs a good round on the same comm and saves
    whether that matched too. backend 'nccl': rank r on GPU r (the Triton kernels' path)."""
    dev = torch.device("cpu")
    if backend == "nccl":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=30), device_id=dev)
    else:
        _init(rank, world_size, port, 30)
    try:
        from nanomoe_fn import Routing, combine, dispatch

        E, k, H, dtype, tol = 4 * world_size, 2, 8, torch.float32, 1e-5
        if kind == "deepep_ll":
            from nanomoe_fn.comm.deepep import DeepEPComm

            E, H, dtype, tol = 8 * world_size, 2048, torch.bfloat16, 2e-2
            comm = DeepEPComm("low_latency", hidden=H, num_slots=E, max_tokens=4, top_k=k)
        elif kind.startswith("nvlink"):   # nvlink, nvlink_prefill: GPUs only
            from nanomoe_fn.comm.nvlink import NvlinkComm

            comm = NvlinkComm(4, H, k, E, dtype=dtype, mode="prefill" if kind == "nvlink_prefill" else "decode",
                              timeout_s=5)
        elif kind == "torch_decode":
            comm = TorchComm(timeout_s=5, max_tokens=4)
        else:
            comm = TorchFixedComm(4, timeout_s=5)
        placement, lines = Placement.identity(E, world_size), []
        for T in ((6 if rank == 0 else 3), 4):
            g = torch.Generator().manual_seed(10 * rank + T)
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
            w, x = torch.rand(T, k, generator=g).to(dev), torch.randn(T, H, generator=g).to(dev, dtype)
            batch, handle = dispatch(x, Routing(ids.to(dev), w), comm, placement)
            out: list = []
            message = error_of(lambda b=batch, h=handle, o=out: o.append(combine(b.materialize(), h, comm)))
            want = x.float() * w.sum(1, keepdim=True)
            lines.append(message if not out else str(torch.allclose(out[0].float(), want, rtol=tol, atol=tol)))
        comm.close()
        comm.close()   # idempotent
        if kind.startswith("nvlink") or kind == "deepep_ll":   # comms that hold buffers refuse use after close
            message = error_of(lambda: dispatch(x, Routing(ids.to(dev), w), comm, placement))
            lines.append(str(message.startswith("RuntimeError") and "closed" in message))
        with open(os.path.join(out_dir, f"oversized_rank{rank}.txt"), "w") as f:
            f.write("\n".join(lines))
    finally:
        dist.destroy_process_group()


def skewed_case(world_size: int, rank: int) -> tuple[MoEConfig, MoEParams, torch.Tensor]:
    """4 experts per rank; the router favours rank 0's experts (sharper logits), so load is skewed."""
    case = dict(cfg=dict(hidden=16, intermediate=8, num_experts=4 * world_size, top_k=2, n_shared_experts=1),
                dtype="float32", seed=21, tokens=[12] * world_size)
    cfg, params, x = case_inputs(case, rank)
    w = params.gate.weight.clone()
    w[:4] *= 3.0
    return cfg, MoEParams(type(params.gate)(w, None), params.experts, params.shared), x


def serve_rebalance_serve(rank: int, W: int, cfg: MoEConfig, params: MoEParams, x: torch.Tensor, rounds: int,
                          after: tuple = ()) -> dict:
    """Serve the layer `rounds` times on a placement with one spare slot a rank while recording its load,
    rebalance (EPLB, global policy), move the expert weights between ranks, serve again on the exact-split torch
    comm and on each comm in `after`. {"outs": every output in order, "load", "phy2log_old", "phy2log_new"}."""
    from nanomoe_fn.eplb import placement_for_layer, rebalance_experts
    from nanomoe_fn.eplb.move import replace_expert_weights
    from nanomoe_fn.eplb.recorder import advance, global_load, init_recorder, record
    from nanomoe_fn.moe.route import route

    E = cfg.num_experts
    old = Placement.from_phy2log(torch.cat([torch.arange(E), torch.arange(W)]), E, W)  # one spare slot a rank
    local = shard_moe_params(params, old, rank)
    comm = TorchComm(timeout_s=60)
    rec = init_recorder(window=rounds + 1, num_layers=1, num_experts=E)
    outs = []
    for _ in range(rounds):
        rec = advance(record(rec, route(params.gate, x, cfg).topk_ids, 0))
        outs.append(moe_layer(local, x, cfg, comm, old))
    load = global_load(rec)
    phy2log, _, _ = rebalance_experts(load.double(), old.num_physical, 1, 1, W, "global")
    new = placement_for_layer(phy2log, 0, E, W).with_policy("dynamic")
    moved = MoEParams(local.gate, replace_expert_weights(old, new, local.experts, rank, chunk_experts=1), local.shared)
    outs += [moe_layer(moved, x, cfg, c, new) for c in (comm, *after)]
    return {"outs": outs, "load": load, "phy2log_old": old.phy2log, "phy2log_new": new.phy2log}


def run_rebalance(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Serve a skewed layer, record its load, rebalance (EPLB, redundant slots), move the expert weights
    between ranks, serve again. Saves this rank's tokens' outputs before and after the move."""
    _init(rank, world_size, port, 60)
    try:
        cfg, params, x = skewed_case(world_size, rank)
        saved = serve_rebalance_serve(rank, world_size, cfg, params, x, rounds=3)
        torch.save({**saved, "x": x}, os.path.join(out_dir, f"rebalance_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_mismatched_max_tokens(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Each rank builds the torch comm's decode mode with its own max_tokens: each saves the error it gets."""
    _init(rank, world_size, port, 30)
    try:
        message = error_of(lambda: TorchComm(timeout_s=5, max_tokens=3 + rank))
        with open(os.path.join(out_dir, f"max_tokens_rank{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()
