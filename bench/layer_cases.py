"""The layers bench/bench_layer.py times, as one record each: the MoE layer alone, or the whole DeepSeek-V3
decoder layer (RMSNorm, MLA, residual, RMSNorm, MoE with its shared expert, residual).

Dimension legend: T tokens per rank, B sequences per rank, S new tokens per sequence, L context (cache rows a
decode step attends to), H hidden, W ranks.

Decoder inputs per rank (attention is data parallel: every rank holds all heads and its own sequences; the
experts are sharded): decode = B = T sequences of one new token each at position L, over a contiguous cache
of L + 1 rows whose first L rows are random latents; prefill = T / S sequences of S new tokens from position 0
(S = min(T, prefill_len); T must be a multiple). Every call rewrites the same cache rows and returns new
lens, so repeated calls (timing, CUDA-graph replays) see the same inputs. The value checks of mla (host
syncs) are off, as in the model's CUDA-graph decode step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanomoe_fn.attention.cache import ContiguousCache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.params import init_mla_params
from nanomoe_fn.decoder import DECODER_MOE_PROGRAM, DecoderContext, DecoderParams, decoder_layer
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.layer import MOE_PROGRAM, MoEContext, run_moe
from nanomoe_fn.moe.params import MoEParams
from nanomoe_fn.pipeline import Plan, Program

LAYERS = ("moe", "decoder")


@dataclass(frozen=True)
class LayerCase:
    """One layer on this rank. call(plan, inputs) runs the public entry (run_moe / decoder_layer) on inputs
    (the whole batch, or one of program.split's micro-batches) -> the output tensor; stage_params and
    stage_ctx are what the program's stages take (for timing stages one at a time)."""

    layer: str
    program: Program
    inputs: dict
    call: Callable[[Plan, dict], torch.Tensor]
    stage_params: Any
    stage_ctx: Any
    info: dict

    def half(self) -> dict:
        """The first micro-batch two-batch overlap runs (program.split): what the ideal TBO time is built from."""
        return self.program.split(self.inputs, 2)[0]

    def compute_stages(self) -> tuple[str, ...]:
        """The stages that are not an exchange half."""
        return tuple(s.name for s in self.program.stages if s.kind == "compute")


def moe_case(cfg: MoEConfig, local: MoEParams, x: torch.Tensor, comms: Sequence[Any], placement: Placement,
             backend: str) -> LayerCase:
    """The MoE layer on x [T, H] (local: this rank's experts); comms: one, or one per micro-batch."""
    def call(plan: Plan, inputs: dict) -> torch.Tensor:
        return run_moe(plan, local, inputs["x"], cfg, list(comms) if plan.micro_batches == 2 else comms[0],
                       placement, backend)

    return LayerCase("moe", MOE_PROGRAM, {"x": x}, call, local,
                     MoEContext(cfg, comms[0], placement, backend), {})


def decoder_inputs(mla_cfg: MLAConfig, phase: str, T: int, context: int, prefill_len: int,
                   device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """{"x" [B, S, H], "positions" [B, S], "cache", "part"} for T tokens of `phase` (module docstring)."""
    if T < 1:
        raise ValueError(f"the decoder layer needs at least one token per rank, got T={T}")
    if phase == "decode":
        B, S, start, rows = T, 1, context, context + 1
    else:
        S = min(T, prefill_len)
        if T % S:
            raise ValueError(f"prefill tokens per rank ({T}) must be a multiple of --prefill-len ({prefill_len})")
        B, start, rows = T // S, 0, S
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(B, rows, mla_cfg.cache_dim, generator=g, device=device, dtype=torch.float32).to(dtype)
    cache = ContiguousCache(kv=kv, lens=torch.full((B,), start, dtype=torch.int32, device=device))
    positions = (start + torch.arange(S, device=device))[None].expand(B, S).contiguous()
    x = torch.randn(B, S, mla_cfg.hidden_size, generator=g, device=device, dtype=torch.float32).to(dtype)
    return {"x": x, "positions": positions, "cache": cache, "part": ("seq", cache)}


def decoder_case(mla_cfg: MLAConfig, cfg: MoEConfig, local: MoEParams, comms: Sequence[Any], placement: Placement,
                 backend: str, attn_backend: str, inputs: dict, seed: int) -> LayerCase:
    """The decoder layer on `inputs` (decoder_inputs), local: this rank's MoE parameters; attention weights
    drawn from `seed` (the same on every rank)."""
    x = inputs["x"]
    g = torch.Generator(device=x.device).manual_seed(seed)
    attn = init_mla_params(mla_cfg, x.dtype, x.device, generator=g)
    norms = [1 + 0.1 * torch.randn(mla_cfg.hidden_size, generator=g, device=x.device) for _ in range(2)]
    params = DecoderParams(norms[0].to(x.dtype), attn, norms[1].to(x.dtype), moe=local)
    ctxs = [DecoderContext(mla_cfg, attn_backend, MoEContext(cfg, c, placement, backend), check=False) for c in comms]

    def call(plan: Plan, inp: dict) -> torch.Tensor:
        ctx = ctxs if plan.micro_batches == 2 else ctxs[0]
        return decoder_layer(params, inp["x"], inp["positions"], inp["cache"], ctx, plan)[0]

    return LayerCase("decoder", DECODER_MOE_PROGRAM, inputs, call, params, ctxs[0],
                     {"sequences": int(x.shape[0]), "new_tokens": int(x.shape[1]),
                      "context": int(inputs["positions"][0, 0]) if x.shape[1] == 1 else 0,
                      "heads": mla_cfg.num_heads})
