"""MLA attention backends by name in a registry, as the expert backends (moe/experts.py) and the comms.

Dimension legend: B sequences, S new tokens per sequence, N heads, C kv_lora_rank (latent), Dn/Dr/Dv
nope/rope/value head dims, Dc = C + Dr (cache row), L keys (context) per sequence.

A backend computes mla's two attention cores: `decode(q, cache, positions, cfg)` (absorbed queries over
the compressed cache) and `prefill(q_nope, q_pe, k_nope, k_pe, v, positions, cfg)` (the expanded path);
`supports(cfg, device) -> (ok, reason)` says why it cannot run here. "torch": plain matmuls, the
readable baseline; "triton": kernels/mla_decode.py and kernels/mla_prefill.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from nanomoe_fn.attention import triton_ops
from nanomoe_fn.attention.cache import MLACache, gather_rows
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.checks import pick_backend


def torch_decode(q: torch.Tensor, cache: MLACache, positions: torch.Tensor, cfg: MLAConfig) -> torch.Tensor:
    """Absorbed queries q [B, S, N, Dc] over the cache; query (b, s) sees rows [0, positions[b, s]].

    Returns the latent output o_lat [B, S, N, C]; padded queries (position -1) give 0. No host sync.
    Every row of the cache is read (weight 0 past a query's position): rows no query sees must hold finite
    values, as the init_* caches' zeros do (0 * NaN is NaN). Zeroing them here would cost a pass over the cache
    per step (62 -> 94 us at 128 heads, one 16k row on an H200: bench/results/mla_notes.md); the Triton kernels
    never read past a sequence's length.
    """
    ctx = (positions + 1).to(torch.int32)                       # [B, S]; 0 for padding
    kv = gather_rows(cache, cache.capacity)                      # [B, L, Dc]
    scores = torch.einsum("bsnd,bld->bsnl", q * cfg.softmax_scale, kv)      # [B, S, N, L], q's dtype
    seen = torch.arange(kv.shape[1], device=q.device) < ctx[:, :, None, None]
    p = torch.softmax(scores.masked_fill_(~seen, float("-inf")), dim=-1,
                      dtype=torch.promote_types(q.dtype, torch.float32))  # float32 (float64 stays)
    o = torch.einsum("bsnl,blc->bsnc", p.to(kv.dtype), kv[..., : cfg.kv_lora_rank])
    return torch.where(ctx[:, :, None, None] > 0, o, 0.0)       # padding rows: softmax of nothing


def torch_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                  v: torch.Tensor, positions: torch.Tensor, cfg: MLAConfig) -> torch.Tensor:
    """Causal attention of the expanded path; q_* [B, S, N, *], k_nope/v [B, L, N, *], k_pe [B, L, Dr].

    Query (b, s) sees keys [0, positions[b, s]]. Returns [B, S, N, Dv]; padding rows are 0.
    """
    L = k_nope.shape[1]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)                                  # [B, N, S, Dqk]
    k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_heads, -1)], dim=-1).transpose(1, 2)
    seen = torch.arange(L, device=q.device) <= positions[:, None, :, None].clamp_min(0)    # [B, 1, S, L]
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=seen,
                                                         scale=cfg.softmax_scale)
    return o.transpose(1, 2) * (positions >= 0)[:, :, None, None]


def triton_supports(cfg: MLAConfig, device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA tensors, or on CPU tensors through its interpreter (TRITON_INTERPRET=1 set
    before kernels/ is imported)."""
    try:
        from nanomoe_kernels.mla_decode import runs_interpreted
    except ImportError as err:
        return False, f"triton is not importable ({err}); pip install triton"
    if device.type == "cuda" or runs_interpreted():
        return True, ""
    return False, (f"it needs CUDA tensors (or TRITON_INTERPRET=1 set before kernels/ is imported, for CPU "
                   f"tensors), got tensors on {device}")


def triton_decode(q: torch.Tensor, cache: MLACache, positions: torch.Tensor, cfg: MLAConfig) -> torch.Tensor:
    """torch_decode through the split-KV Triton kernel (contiguous or paged cache); no host sync. Under
    torch.compile the kernel is the custom op nanomoe::mla_decode (attention/triton_ops.py), so it traces."""
    B = q.shape[0]
    ctx = (positions + 1).to(torch.int32).reshape(-1).contiguous()    # [B * S]; 0 for padding
    bt = getattr(cache, "block_table", None)
    rows = rearrange(q, "b s n d -> (b s) n d").contiguous()
    run = torch.ops.nanomoe.mla_decode if torch.compiler.is_compiling() else triton_ops.decode_eager
    o = run(rows, cache.kv, ctx, bt, cfg.kv_lora_rank, cfg.softmax_scale)
    return rearrange(o, "(b s) n c -> b s n c", b=B)


def triton_prefill(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                   v: torch.Tensor, positions: torch.Tensor, cfg: MLAConfig) -> torch.Tensor:
    """torch_prefill through the Triton flash-attention kernel (nanomoe::mla_prefill under torch.compile)."""
    run = torch.ops.nanomoe.mla_prefill if torch.compiler.is_compiling() else triton_ops.prefill_eager
    return run(q_nope, q_pe, k_nope, k_pe, v, positions.to(torch.int32).contiguous(), cfg.softmax_scale)


@dataclass(frozen=True)
class MLABackend:
    """A named attention backend: `supports(cfg, device) -> (ok, reason)`, `decode(...)`, `prefill(...)`."""

    name: str
    supports: Callable[[MLAConfig, torch.device], tuple[bool, str]]
    decode: Callable[[torch.Tensor, MLACache, torch.Tensor, MLAConfig], torch.Tensor]
    prefill: Callable[..., torch.Tensor]


def _always(cfg: MLAConfig, device: torch.device) -> tuple[bool, str]:
    return True, ""


MLA_BACKENDS: dict[str, MLABackend] = {
    "torch": MLABackend("torch", _always, torch_decode, torch_prefill),
    "triton": MLABackend("triton", triton_supports, triton_decode, triton_prefill),
}


def get_mla_backend(name: str, cfg: MLAConfig, device: torch.device | str) -> MLABackend:
    """The backend called `name`, or ValueError naming it and saying why it cannot run `cfg` on `device`."""
    return pick_backend("MLA", MLA_BACKENDS, name, cfg, device)
