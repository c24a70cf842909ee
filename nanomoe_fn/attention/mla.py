"""DeepSeek-V3 / V2 multi-head latent attention (MLA) as pure functions over explicit parameters.

Dimension legend: B sequences, S new tokens per sequence (right-padded with position -1), H hidden,
N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn/Dr/Dv nope/rope/value head dims,
Dqk = Dn + Dr, Dc = C + Dr (cache row), L keys (context) per sequence.

The projections follow the config (config.py): q through the low-rank path (q_a_proj, norm, q_b_proj) or
one q_proj (V2-Lite); optional biases on q_a_proj, kv_a_proj and o_proj; rope on either pair layout.
Everything config-specific happens before the attention cores, which only see q and the cache.

Two paths share the projections and the compressed cache (normed latent ++ roped shared key):
- prefill: expand the context's latent through kv_b_proj into per-head K [L, N, Dqk] and V
  [L, N, Dv]; causal attention by position.
- decode (weight absorption): fold kv_b_proj's key half into the query (q_lat = q_nope . W_uk) and
  its value half into the output (o = o_lat . W_uv^T), attending over the cache as one shared KV head
  of width Dc; the cache is read once per step and never expanded.
Backends by name in MLA_BACKENDS (backends.py): "torch" (plain matmuls, the readable baseline) and
"triton" (kernels/mla_*.py); `mla(..., backend=name)` goes through get_mla_backend, whose error names
the backend and why it cannot run. The parameter record MLAParams is in params.py, the cache in cache.py.
"""

from __future__ import annotations

import torch
from einops import rearrange

from nanomoe_fn.attention.backends import MLABackend, get_mla_backend
from nanomoe_fn.attention.cache import MLACache, check_cache, check_positions, gather_rows, write_rows
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.params import MLAParams, check_mla_params
from nanomoe_fn.attention.rope import apply_rope, rope_cos_sin
from nanomoe_fn.checks import check_values


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32 (float64 for float64 x), returned in x's dtype.

    On CUDA with a weight of x's (16- or 32-bit) dtype: torch's fused kernel (one launch instead of eight;
    it accumulates in float32 too)."""
    if x.is_cuda and weight.dtype == x.dtype and x.dtype != torch.float64:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)).to(x.dtype)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T (+ b): a Linear in [out, in] layout with an optional bias."""
    y = x @ w.T
    return y if b is None else y + b


def project_q(params: MLAParams, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, H] -> (q_nope [B, S, N, Dn], q_pe [B, S, N, Dr] roped), through the q low-rank path
    (q_a_proj (+ q_a_bias), q_a_norm, q_b_proj) or q_proj when cfg.q_lora_rank is None."""
    if cfg.q_lora_rank is None:
        q = x @ params.q_proj.T
    else:
        q_lat = rms_norm(_linear(x, params.q_a_proj, params.q_a_bias), params.q_a_norm, cfg.latent_norm_eps)
        q = q_lat @ params.q_b_proj.T
    q = rearrange(q, "b s (n d) -> b s n d", n=cfg.num_heads)
    q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
    return q_nope, apply_rope(q_pe, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)


def project_kv(params: MLAParams, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cfg: MLAConfig) -> torch.Tensor:
    """x [B, S, H] -> cache rows [B, S, Dc] = normed latent ++ roped shared key (in cfg's pair layout)."""
    kv = _linear(x, params.kv_a_proj, params.kv_a_bias)
    latent, k_pe = kv.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, params.kv_a_norm, cfg.latent_norm_eps)
    return torch.cat([latent, apply_rope(k_pe, cos, sin, cfg.rope_interleave)], dim=-1)


def _kv_b(params: MLAParams, cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_uk [N, Dn, C], W_uv [N, Dv, C]) views of kv_b_proj."""
    w = rearrange(params.kv_b_proj, "(n d) c -> n d c", n=cfg.num_heads)
    return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


def out_proj(params: MLAParams, o: torch.Tensor) -> torch.Tensor:
    """o [B, S, N, Dv] -> [B, S, H] (+ o_bias)."""
    return _linear(rearrange(o, "b s n d -> b s (n d)"), params.o_proj, params.o_bias)


def _check_inputs(params: MLAParams, x: torch.Tensor, positions: torch.Tensor, cache: MLACache, cfg: MLAConfig,
                  backend: str, path: str) -> MLABackend:
    """Host-only checks of mla's arguments (no sync); returns the backend (get_mla_backend's errors)."""
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"cfg must be an MLAConfig, got {type(cfg).__name__}")
    check_mla_params(params, cfg)
    for name, t in (("x", x), ("positions", positions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    impl = get_mla_backend(backend, cfg, x.device)
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
    check_cache(cache, x.shape[0], cfg.cache_dim, x.device)
    # the Triton kernels: prefill on the weights' dtype (K/V are expanded in it), decode on the cache's
    kernel_dtype = (("cache.kv", cache.kv.dtype) if path == "decode" else ("attn_params", params.kv_b_proj.dtype))
    if impl.name == "triton" and kernel_dtype[1] not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"MLA backend 'triton' runs float16/bfloat16/float32 on the {path} path, got "
                        f"{kernel_dtype[0]} {kernel_dtype[1]}: use backend='torch' (or cast)")
    return impl


def mla(attn_params: MLAParams, x: torch.Tensor, positions: torch.Tensor, cache: MLACache, cfg: MLAConfig,
        backend: str = "torch", *, path: str | None = None,
        check: bool = True) -> tuple[torch.Tensor, MLACache]:
    """One MLA block: x [B, S, H] at positions [B, S] -> (out [B, S, H], cache with the new rows).

    x is cast to the weights' dtype, and out comes in that dtype (moe_layer, by contrast, refuses x of another
    dtype than its experts').

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
    impl = _check_inputs(attn_params, x, positions, cache, cfg, backend, path)
    if x.shape[0] == 0 or x.shape[1] == 0:  # no tokens: nothing to attend, nothing to write
        return x.new_zeros(x.shape, dtype=attn_params.kv_a_proj.dtype), cache
    if check:
        check_positions(cache, positions, allow_padding=x.shape[1] > 1)
        check_values(torch.isfinite(x).all(), "x holds NaN/inf (mla's input activations)")
    one = x.shape[1] == 1  # S == 1: every position is valid (no padding), so no clamp and no output mask
    cos, sin = rope_cos_sin(positions if one else positions.clamp_min(0), cfg)   # [B, S, Dr/2] float64
    x = x.to(attn_params.kv_a_proj.dtype)
    ct = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(ct), sin.to(ct)                             # once for both q and k
    q_nope, q_pe = project_q(attn_params, x, cos, sin, cfg)
    cache = write_rows(cache, project_kv(attn_params, x, cos, sin, cfg), positions)
    w_uk, w_uv = _kv_b(attn_params, cfg)
    if path == "decode":
        q = torch.cat([torch.einsum("bsnd,ndc->bsnc", q_nope, w_uk), q_pe], dim=-1)
        o_lat = impl.decode(q.to(cache.kv.dtype), cache, positions, cfg)
        o = torch.einsum("bsnc,nvc->bsnv", o_lat.to(w_uv.dtype), w_uv)
    else:
        length = int(positions.max()) + 1                         # the documented prefill sync
        rows = gather_rows(cache, max(length, 1), positions.amax(1) + 1).to(w_uk.dtype)   # [B, L, Dc]; unseen: 0
        latent, k_pe = rows.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        k_nope = torch.einsum("blc,ndc->blnd", latent, w_uk)
        v = torch.einsum("blc,nvc->blnv", latent, w_uv)
        o = impl.prefill(q_nope, q_pe, k_nope, k_pe, v, positions, cfg)
    out = out_proj(attn_params, o)
    return (out if one else out * (positions >= 0)[:, :, None]), cache
