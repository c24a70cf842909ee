"""The EP MoE bench workload: config, parameters and tokens from the seed's flags, its floors, and checks.

Dimension legend: T tokens per rank, H hidden, I intermediate, E experts, k experts per token.
"""

from __future__ import annotations

import argparse

import nanomoe_reference as reference
import torch

from nanomoe_fn import MoEConfig, MoEParams, expert_tensors, init_moe_params
from nanomoe_fn.moe.route import route


def config_from_args(args: argparse.Namespace) -> MoEConfig:
    """Softmax top-k routing as in the seed, with the chosen expert type."""
    return MoEConfig(hidden=args.hidden_dim, intermediate=args.intermediate_dim or args.hidden_dim,
                     num_experts=args.num_experts, top_k=args.experts_per_token, expert_type=args.expert_type)


def make_inputs(cfg: MoEConfig, args: argparse.Namespace, dtype: torch.dtype, device: torch.device,
                rank: int = 0) -> tuple[MoEParams, torch.Tensor]:
    """Parameters (same on every rank for one seed) and this rank's tokens [T, H]."""
    gen = torch.Generator().manual_seed(args.seed)
    params = init_moe_params(cfg, dtype, device, gen)
    gen_x = torch.Generator().manual_seed(args.seed + 1 + rank)
    x = torch.randn(args.batch_size, cfg.hidden, generator=gen_x).to(device=device, dtype=dtype)
    return params, x


def floors(params: MoEParams, x: torch.Tensor, cfg: MoEConfig) -> tuple[float, float]:
    """(bytes, FLOPs) the layer's experts must move and compute: the weights of every expert some
    token picked, read once, plus the tokens in and out; 2 * rows * weights-per-expert FLOPs."""
    ids = route(params.gate, x, cfg).topk_ids
    touched = int(torch.unique(ids).numel())
    per_expert = sum(w[0].numel() for w in expert_tensors(params.experts))
    itemsize = expert_tensors(params.experts)[0].element_size()
    bytes_moved = touched * per_expert * itemsize + 2 * x.numel() * x.element_size()
    return float(bytes_moved), float(2 * ids.numel() * per_expert)


def rank_floors(params: MoEParams, x: torch.Tensor, cfg: MoEConfig, rank: int, world_size: int) -> tuple[float,
                                                                                                          float]:
    """floors() for one EP rank of an identity placement (a collective over the default process group):
    the weights of this rank's experts that any rank's token picked, read once, plus the rows it
    receives in and sends out, and 2 * rows received * weights-per-expert FLOPs; the max over the ranks
    (the slowest rank sets the layer's pace). Every rank must hold the same number of tokens."""
    import torch.distributed as dist

    ids = route(params.gate, x, cfg).topk_ids.long()
    every = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(every, ids)
    ids_all = torch.cat(every).flatten()
    per_rank = cfg.num_experts // world_size
    mine = ids_all[(ids_all >= rank * per_rank) & (ids_all < (rank + 1) * per_rank)]
    per_expert = sum(w[0].numel() for w in expert_tensors(params.experts))
    itemsize = expert_tensors(params.experts)[0].element_size()
    rows = float(mine.numel())
    bytes_moved = torch.unique(mine).numel() * per_expert * itemsize + 2 * rows * x.shape[1] * x.element_size()
    out = torch.tensor([float(bytes_moved), 2 * rows * per_expert], dtype=torch.float64, device=x.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out[0]), float(out[1])


def check_against_reference(out: torch.Tensor, params: MoEParams, x: torch.Tensor, cfg: MoEConfig,
                            n_tokens: int = 4) -> float:
    """Relative error of the first tokens' outputs against reference/ (float64); raises if too large."""
    n = min(n_tokens, x.shape[0])
    if n == 0:
        return 0.0
    ref, _ = reference.moe_layer(x[:n], params.gate.weight, expert_tensors(params.experts), cfg.top_k,
                                 cfg.expert_type, score_func=cfg.score_func)
    err = float((out[:n].double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[x.dtype]
    if not err <= tol:
        raise SystemExit(f"output differs from reference/: relative error {err:.3g} > {tol:g}")
    return err


def agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative difference of two modes' outputs; raises if they disagree."""
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    if not err <= tol:
        raise SystemExit(f"modes disagree: relative difference {err:.3g} > {tol:g}")
    return err
