"""The floor of a model decode step for bench_model.py: the bytes it must read, from the experts the routers
actually picked, over the bandwidth measured in the same run.

Dimension legend: B sequences, W ranks, E experts, k top-k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.model.forward import ModelContext, model_forward
from nanomoe_fn.model.params import ModelParams


def picked_experts(params: ModelParams, ctx: ModelContext, tokens: torch.Tensor, positions: torch.Tensor,
                   caches: tuple) -> list[int]:
    """Distinct experts of this rank each MoE layer's router picks for one decode step of every rank's tokens
    (an eager step with the route stage recorded; under EP the picks are all-gathered)."""
    from dataclasses import replace

    from nanomoe_fn.decoder import DECODER_MOE_PROGRAM
    from nanomoe_fn.pipeline.schedule import sequential

    picks: list[torch.Tensor] = []

    def record(stage):  # noqa: ANN001, ANN202 - a Stage
        def fn(p, env, c):  # noqa: ANN001, ANN202
            out = stage.fn(p, env, c)
            picks.append(out["routing"].topk_ids)
            return out
        return replace(stage, fn=fn)

    plan = sequential(DECODER_MOE_PROGRAM)
    plan = replace(plan, steps=tuple((mb, record(st) if st.name == "route" else st) for mb, st in plan.steps))
    plans = tuple(plan if ctx.cfg.is_moe_layer(i) else None for i in range(ctx.cfg.num_layers))
    with torch.no_grad():
        model_forward(params, tokens, positions, caches, replace(ctx, plans=plans))
    W = ctx.comm.world_size
    local = set(ctx.placement.local_slots(ctx.comm.rank).tolist()) if W > 1 else None
    counts = []
    for ids in picks:
        if W > 1:
            every = [torch.empty_like(ids) for _ in range(W)]
            dist.all_gather(every, ids.contiguous())
            ids = torch.cat(every)
        chosen = set(ids.flatten().tolist())
        counts.append(len(chosen if local is None else chosen & local))
    return counts


def step_bytes(cfg: ModelConfig, params: ModelParams, B: int, context: int, picked: list[int]) -> float:
    """Bytes one decode step must read on one rank: every weight but the routed experts no token picked
    (picked[j]: the distinct local experts of MoE layer j, from picked_experts), the LM head, one embedding
    row per token, and the cache rows attended."""
    total, j = 0.0, 0
    for layer in params.layers:
        for t in torch.utils._pytree.tree_leaves(layer):
            total += 0 if t is None else t.numel() * t.element_size()
        if layer.moe is not None:
            w = layer.moe.experts
            per_expert = (w.w13.numel() * w.w13.element_size() + w.w2.numel() * w.w2.element_size()) / w.num_experts
            total -= per_expert * (w.num_experts - picked[j])
            j += 1
    total += params.lm_head.numel() * params.lm_head.element_size() + params.norm.numel() * 2
    total += B * cfg.hidden * params.embed.element_size()
    total += cfg.num_layers * B * context * cfg.mla.cache_dim * params.embed.element_size()
    return total


def add_floor(rows: list[dict], cfg: ModelConfig, params: ModelParams, B: int, context: int, picked: list[int],
              ceilings: dict) -> None:
    """floor_step_ms (the step's bytes, with the experts our eager step picked, over the measured bandwidth) and
    share_of_floor on each timed row of this batch size."""
    floor_s = step_bytes(cfg, params, B, context, picked) / (ceilings["hbm_gbps"] * 1e9)
    for r in rows:
        if "decode_step_ms" in r:
            r.update(picked_experts=picked, floor_step_ms=round(floor_s * 1e3, 3),
                     share_of_floor=round(floor_s / (r["decode_step_ms"] * 1e-3), 3))
