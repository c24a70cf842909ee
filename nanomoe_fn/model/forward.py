"""The model's pure forward: token ids -> logits over the MLA caches, prefill and decode alike.

Dimension legend: B sequences (this rank's, under expert parallelism), S new tokens per sequence
(right-padded with position -1), H hidden, V vocabulary, Ld layers, L_max cache rows per sequence.

tokens [B, S] -> embed -> Ld decoder layers (nanomoe_fn/decoder.py: MLA, then the dense FFN or the MoE
with its comm) -> final norm -> LM head at the requested rows -> logits [B, V] (or [B, S, V]).
Expert parallelism is attention-data-parallel: each rank runs its own sequences through attention and
joins every MoE layer's dispatch/combine with its tokens (zero tokens included); ModelContext carries the
comm and placement. Each layer has its own cache; the caches' kv buffers are written in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanomoe_fn.attention.cache import MLACache, init_contiguous_cache, init_paged_cache
from nanomoe_fn.attention.mla import rms_norm
from nanomoe_fn.comm.base import Comm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.decoder import DecoderContext, decoder_layer
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.model.params import ModelParams
from nanomoe_fn.moe.layer import MoEContext
from nanomoe_fn.pipeline.run import scope
from nanomoe_fn.pipeline.schedule import Plan


@dataclass(frozen=True)
class ModelContext:
    """Static per call: the config, the EP comm and placement (LocalComm and all experts by default), the
    attention and expert backends, `check` (value checks with host syncs; a CUDA-graph decode passes False),
    and optional per-layer plans (a pipeline schedule per decoder layer; default sequential)."""

    cfg: ModelConfig
    comm: Comm = field(default_factory=LocalComm)
    placement: Placement | None = None
    attn_backend: str = "torch"
    expert_backend: str = "bmm"
    check: bool = True
    capacity: int | None = None
    plans: tuple[Plan | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.placement is None:
            object.__setattr__(self, "placement",
                               Placement.identity(self.cfg.moe.num_experts, self.comm.world_size))
        if self.plans is not None and len(self.plans) != self.cfg.num_layers:
            raise ValueError(f"plans must hold one plan (or None) per layer ({self.cfg.num_layers}), "
                             f"got {len(self.plans)}")

    def layer(self, i: int) -> DecoderContext:
        """Layer i's DecoderContext."""
        moe = (MoEContext(self.cfg.moe, self.comm, self.placement, self.expert_backend, self.capacity)
               if self.cfg.is_moe_layer(i) else None)
        return DecoderContext(self.cfg.mla, self.attn_backend, moe, self.check)


def init_caches(cfg: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                paged: bool = False, page_size: int | None = None) -> tuple[MLACache, ...]:
    """One empty cache per layer for `batch` sequences of up to `capacity` rows (paged: pages of page_size,
    default the MLA config's)."""
    if paged:
        g = page_size or cfg.mla.page_size
        return tuple(init_paged_cache(batch, capacity, cfg.mla.cache_dim, dtype, device, page_size=g)
                     for _ in range(cfg.num_layers))
    return tuple(init_contiguous_cache(batch, capacity, cfg.mla.cache_dim, dtype, device)
                 for _ in range(cfg.num_layers))


def model_forward(params: ModelParams, tokens: torch.Tensor, positions: torch.Tensor,
                  caches: Sequence[MLACache], ctx: ModelContext, logits_at: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, tuple[MLACache, ...]]:
    """tokens [B, S] at positions [B, S] (-1: padding) -> (logits, the caches with the new rows).

    logits_at [B] int: the one row per sequence to score (e.g. its last valid token) -> logits [B, V];
    None -> every row, [B, S, V]. Logits are float32."""
    if not isinstance(ctx, ModelContext):
        raise TypeError(f"ctx must be a ModelContext, got {type(ctx).__name__}")
    cfg = ctx.cfg
    for name, t in (("tokens", tokens), ("positions", positions)) + ((("logits_at", logits_at),)
                                                                      if logits_at is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be [B, S] int32/int64, got {tuple(tokens.shape)} {tokens.dtype}")
    if positions.shape != tokens.shape:
        raise ValueError(f"positions must have tokens' shape {tuple(tokens.shape)}, got {tuple(positions.shape)}")
    if len(caches) != cfg.num_layers:
        raise ValueError(f"caches must hold one cache per layer ({cfg.num_layers}), got {len(caches)}")
    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params.layers holds {len(params.layers)} layers, the config {cfg.num_layers}")
    if ctx.check and tokens.numel() and bool(((tokens < 0) | (tokens >= cfg.vocab_size))[positions >= 0].any()):
        raise ValueError(f"tokens must be in [0, vocab_size={cfg.vocab_size}) at valid positions")
    if logits_at is not None:
        _check_logits_at(logits_at, positions, ctx.check)
    x = torch.nn.functional.embedding(tokens.clamp(0, cfg.vocab_size - 1), params.embed)
    plans = ctx.plans or (None,) * cfg.num_layers
    new_caches = []
    for i, (layer, cache) in enumerate(zip(params.layers, caches)):
        with scope(f"layer{i}"):
            x, cache = decoder_layer(layer, x, positions, cache, ctx.layer(i), plans[i])
        new_caches.append(cache)
    if logits_at is not None:
        x = x[torch.arange(x.shape[0], device=x.device), logits_at.long()]       # [B, H]
    h = rms_norm(x, params.norm, cfg.mla.rms_norm_eps)
    return (h @ params.lm_head.T).float(), tuple(new_caches)


def _check_logits_at(logits_at: torch.Tensor, positions: torch.Tensor, values: bool) -> None:
    """logits_at [B] int32/int64, each a valid (non-padding) row of its sequence: checked by shape and dtype, and with
    `values` (ctx.check: one host read) by value; ValueError naming logits_at otherwise."""
    B, S = positions.shape
    if tuple(logits_at.shape) != (B,) or logits_at.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"logits_at must be [B={B}] int32/int64 (one row per sequence), got "
                         f"{tuple(logits_at.shape)} {logits_at.dtype}")
    if values and B:
        at = logits_at.long().to(positions.device)
        ok = (at >= 0) & (at < S)
        if S == 0 or not bool((ok & (positions.gather(1, at.clamp(0, S - 1)[:, None])[:, 0] >= 0)).all()):
            raise ValueError(f"logits_at must pick a valid row of each sequence: in [0, S={S}) where positions >= 0, "
                             f"got {logits_at.tolist()}")
