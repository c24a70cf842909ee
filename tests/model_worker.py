"""Spawned ranks of tests/test_model_ep.py: generation with expert parallelism over gloo on the CPU."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from nanomoe_fn.comm.torch_dist import TorchComm
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext
from nanomoe_fn.model.generate import generate
from nanomoe_fn.model.params import init_model_params
from nanomoe_fn.model.sampling import SamplingConfig


def run_generate(rank: int, world_size: int, port: int, cases: list[dict], out_dir: str) -> None:
    """Each case: this rank generates for prompts[rank::world_size] (its own sequences) with the experts of
    its placement; writes out_dir/rank{rank}.json = one list of outputs per case."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        cfg = model_preset("tiny")
        results = []
        for case in cases:
            gen = torch.Generator().manual_seed(case["placement_seed"])
            phy2log = torch.cat([torch.arange(cfg.moe.num_experts),
                                 torch.randint(0, cfg.moe.num_experts, (case["redundant"],), generator=gen)])
            placement = Placement.from_phy2log(phy2log[torch.randperm(phy2log.numel(), generator=gen)],
                                               cfg.moe.num_experts, world_size)
            params = init_model_params(cfg, torch.float32, seed=case["seed"], placement=placement, rank=rank)
            ctx = ModelContext(cfg, TorchComm(timeout_s=60), placement, expert_backend=case["backend"])
            mine = case["prompts"][rank::world_size] if not case.get("all_on_0") else (
                case["prompts"] if rank == 0 else [])
            results.append(generate(params, mine, ctx, SamplingConfig(**case["sampling"]), paged=case["paged"],
                                    check_every=case["check_every"]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
