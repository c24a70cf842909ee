"""DeepSeek-V3 multi-head latent attention (MLA) as pure functions over explicit parameters.

Dimension legend: B sequences, S new tokens per sequence (right-padded with position -1), H hidden,
N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn/Dr/Dv nope/rope/value head dims,
Dqk = Dn + Dr, Dc = C + Dr (cache row), L keys (context) per sequence.

Two paths share the projections and the compressed cache (normed latent ++ roped shared key):
- prefill: expand the context's latent through kv_b_proj into per-head K [L, N, Dqk] and V
  [L, N, Dv]; causal attention by position.
- decode (weight absorption): fold kv_b_proj's key half into the query (q_lat = q_nope . W_uk) and
  its value half into the output (o = o_lat . W_uv^T), attending over the cache as one shared KV head
  of width Dc; the cache is read once per step and never expanded.
Backends: "torch" (plain matmuls, the readable baseline) and "triton" (kernels/mla_*.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch.utils._pytree import register_dataclass

from nanomoe_fn.attention.cache import MLACache, check_cache, check_positions, gather_rows, write_rows
from nanomoe_fn.attention.config import MLAConfig, apply_rope, rope_cos_sin
from nanomoe_fn.checks import check_values

BACKENDS = ("torch", "triton")


@dataclass(frozen=True, eq=False)
class MLAParams:
    """One attention block's weights in Linear layout [out, in], named as in DeepSeek-V3's safetensors."""

    q_a_proj: torch.Tensor    # [Q, H]
    q_a_norm: torch.Tensor    # [Q]            (q_a_layernorm)
    q_b_proj: torch.Tensor    # [N * Dqk, Q]   per head: nope then rope
    kv_a_proj: torch.Tensor   # [C + Dr, H]    (kv_a_proj_with_mqa): latent then rope key
    kv_a_norm: torch.Tensor   # [C]            (kv_a_layernorm)
    kv_b_proj: torch.Tensor   # [N * (Dn + Dv), C]  per head: key (W_uk) then value (W_uv)
    o_proj: torch.Tensor      # [H, N * Dv]


register_dataclass(MLAParams)


def init_mla_params(cfg: MLAConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> MLAParams:
    """Random weights N(0, 1/fan_in), drawn on the CPU so a seed gives the same weights anywhere; norms 1."""
    N, H, Q, C = cfg.num_heads, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank

    def w(out_f: int, in_f: int) -> torch.Tensor:
        t = torch.randn(out_f, in_f, generator=generator) * in_f ** -0.5
        return t.to(device=device, dtype=dtype)

    return MLAParams(
        q_a_proj=w(Q, H), q_a_norm=torch.ones(Q, dtype=dtype, device=device),
        q_b_proj=w(N * cfg.qk_head_dim, Q),
        kv_a_proj=w(C + cfg.qk_rope_head_dim, H), kv_a_norm=torch.ones(C, dtype=dtype, device=device),
        kv_b_proj=w(N * (cfg.qk_nope_head_dim + cfg.v_head_dim), C), o_proj=w(H, N * cfg.v_head_dim),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 for float64 x), returned in x's dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)).to(x.dtype)


def project_q(params: MLAParams, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H] -> (q_nope [B, S, N, Dn], q_pe [B, S, N, Dr] roped) through the q low-rank path."""
    q = rms_norm(x @ params.q_a_proj.T, params.q_a_norm, cfg.rms_norm_eps) @ params.q_b_proj.T
    q = rearrange(q, "b s (n d) -> b s n d", n=cfg.num_heads)
    q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    return q_nope, apply_rope(q_pe, cos[:, :, None], sin[:, :, None])


def project_kv(params: MLAParams, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cfg: MLAConfig) -> torch.Tensor:
    """x [B, S, H] -> cache rows [B, S, Dc] = normed latent ++ roped shared key."""
    kv = x @ params.kv_a_proj.T
    latent, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, params.kv_a_norm, cfg.rms_norm_eps)
    return torch.cat([latent, apply_rope(k_pe, cos, sin)], dim=-1)


def _kv_b(params: MLAParams, cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_uk [N, Dn, C], W_uv [N, Dv, C]) views of kv_b_proj."""
    w = rearrange(params.kv_b_proj, "(n d) c -> n d c", n=cfg.num_heads)
    return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


def out_proj(params: MLAParams, o: torch.Tensor) -> torch.Tensor:
    """o [B, S, N, Dv] -> [B, S, H]."""
    return rearrange(o, "b s n d -> b s (n d)") @ params.o_proj.T


def decode_attention(q: torch.Tensor, cache: MLACache, positions: torch.Tensor, cfg: MLAConfig,
                     backend: str) -> torch.Tensor:
    """Absorbed queries q [B, S, N, Dc] over the cache; query (b, s) sees rows [0, positions[b, s]].

    Returns the latent output o_lat [B, S, N, C]; padded queries (position -1) give 0. No host sync.
    """
    B, S, N, _ = q.shape
    ctx = (positions + 1).to(torch.int32)                       # [B, S]; 0 for padding
    if backend == "triton":
        from kernels.mla_decode import mla_decode
        bt = getattr(cache, "block_table", None)
        rows = rearrange(q, "b s n d -> (b s) n d").contiguous()
        o = mla_decode(rows, cache.kv, ctx.reshape(-1).contiguous(), cfg.kv_lora_rank, cfg.softmax_scale,
                       block_table=bt)
        return rearrange(o, "(b s) n c -> b s n c", b=B)
    kv = gather_rows(cache, cache.capacity)                      # [B, L, Dc]
    scores = torch.einsum("bsnd,bld->bsnl", q * cfg.softmax_scale, kv)      # [B, S, N, L], q's dtype
    seen = torch.arange(kv.shape[1], device=q.device) < ctx[:, :, None, None]
    p = torch.softmax(scores.masked_fill_(~seen, float("-inf")), dim=-1,
                      dtype=torch.promote_types(q.dtype, torch.float32))  # float32 (float64 stays)
    o = torch.einsum("bsnl,blc->bsnc", p.to(kv.dtype), kv[..., : cfg.kv_lora_rank])
    return torch.where(ctx[:, :, None, None] > 0, o, 0.0)       # padding rows: softmax of nothing


def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                      v: torch.Tensor, positions: torch.Tensor, cfg: MLAConfig, backend: str) -> torch.Tensor:
    """Causal attention of the expanded path; q_* [B, S, N, *], k_nope/v [B, L, N, *], k_pe [B, L, Dr].

    Query (b, s) sees keys [0, positions[b, s]]. Returns [B, S, N, Dv]; padding rows are 0.
    """
    if backend == "triton":
        from kernels.mla_prefill import mla_prefill
        pos = positions.to(torch.int32).contiguous()
        return mla_prefill(q_nope, q_pe, k_nope, k_pe, v, pos, cfg.softmax_scale)
    L = k_nope.shape[1]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)                                  # [B, N, S, Dqk]
    k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, cfg.num_heads, -1)], dim=-1).transpose(1, 2)
    seen = torch.arange(L, device=q.device) <= positions[:, None, :, None].clamp_min(0)    # [B, 1, S, L]
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=seen,
                                                         scale=cfg.softmax_scale)
    return o.transpose(1, 2) * (positions >= 0)[:, :, None, None]


def _check_inputs(x: torch.Tensor, positions: torch.Tensor, cache: MLACache, cfg: MLAConfig, backend: str,
                  path: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be 'decode', 'prefill' or None, got {path!r}")
    if x.dim() != 3 or x.shape[-1] != cfg.hidden_size:
        raise ValueError(f"x must be [B, S, H={cfg.hidden_size}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if positions.shape != x.shape[:2] or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [B, S]={tuple(x.shape[:2])} int32/int64, got "
                         f"{tuple(positions.shape)} {positions.dtype}")
    if positions.device != x.device:
        raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
    if backend == "triton" and x.device.type != "cuda":
        from kernels.mla_decode import runs_interpreted
        if not runs_interpreted():
            raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before kernels/ "
                             "is imported, for CPU tensors)")
    check_cache(cache, x.shape[0], cfg.cache_dim, x.device)


def mla(attn_params: MLAParams, x: torch.Tensor, positions: torch.Tensor, cache: MLACache, cfg: MLAConfig,
        backend: str = "torch", *, path: str | None = None,
        check: bool = True) -> tuple[torch.Tensor, MLACache]:
    """One MLA block: x [B, S, H] at positions [B, S] -> (out [B, S, H], cache with the new rows).

    Sequence b's new tokens sit at consecutive positions starting at or before cache.lens[b]; shorter
    sequences are right-padded with position -1 (their output rows are 0, nothing is written).
    path: "decode" (weight-absorbed, over the compressed cache) or "prefill" (expanded K/V); default
    decode when S == 1. Both give the same result. The cache's kv buffer is updated in place.
    check=True validates position values against the cache with one host sync, and that x is finite (a
    device assert on GPUs); a decode loop that
    already guarantees them (or CUDA-graph capture) passes check=False and has no host sync.
    The prefill path always syncs: to size the expanded K/V by the longest context, and (S > 1)
    for the boolean index of its padded cache writes.
    """
    path = path or ("decode" if x.shape[1] == 1 else "prefill")
    _check_inputs(x, positions, cache, cfg, backend, path)
    if check:
        check_positions(cache, positions, allow_padding=x.shape[1] > 1)
        check_values(torch.isfinite(x).all(), "x holds NaN/inf (mla's input activations)")
    cos, sin = rope_cos_sin(positions.clamp_min(0), cfg)          # [B, S, Dr/2]
    x = x.to(attn_params.q_a_proj.dtype)
    q_nope, q_pe = project_q(attn_params, x, cos, sin, cfg)
    cache = write_rows(cache, project_kv(attn_params, x, cos, sin, cfg), positions)
    w_uk, w_uv = _kv_b(attn_params, cfg)
    if path == "decode":
        q = torch.cat([torch.einsum("bsnd,ndc->bsnc", q_nope, w_uk), q_pe], dim=-1)
        o_lat = decode_attention(q.to(cache.kv.dtype), cache, positions, cfg, backend)
        o = torch.einsum("bsnc,nvc->bsnv", o_lat.to(w_uv.dtype), w_uv)
    else:
        length = int(positions.max()) + 1                         # the documented prefill sync
        rows = gather_rows(cache, max(length, 1)).to(w_uk.dtype)   # [B, L, Dc]
        latent, k_pe = rows.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        k_nope = torch.einsum("blc,ndc->blnd", latent, w_uk)
        v = torch.einsum("blc,nvc->blnv", latent, w_uv)
        o = prefill_attention(q_nope, q_pe, k_nope, k_pe, v, positions, cfg, backend)
    out = out_proj(attn_params, o) * (positions >= 0)[:, :, None]
    return out, cache
