"""Naive float64 DeepSeek-V3 / V2 multi-head latent attention (MLA): the oracle for nanomoe_fn.attention.mla.

Imports nothing from nanomoe_fn or kernels. Everything is upcast to float64 on the CPU. K and V are
materialised per head from the latent (no weight absorption); attention loops over tokens and heads.

Dimension legend: B sequences, S tokens per sequence (from position 0), H hidden, N heads,
Q q_lora_rank, C kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims, Dc = C + Dr, L keys, R query rows.

`params` is any object with attributes kv_a_proj [C+Dr, H], kv_a_norm [C], kv_b_proj [N*(Dn+Dv), C],
o_proj [H, N*Dv] (Linear layout [out, in]) and either q_a_proj [Q, H], q_a_norm [Q], q_b_proj
[N*(Dn+Dr), Q] or (cfg.q_lora_rank None) q_proj [N*(Dn+Dr), H]; with cfg.attention_bias also q_a_bias [Q]
(low-rank path only), kv_a_bias [C+Dr], o_bias [H]. `cfg` any object with MLAConfig's field names.

Rope, written from transformers' modeling_rope_utils / DeepSeek attention: rope_type 'default' (theta),
'linear' (theta, frequencies / factor) or 'yarn' (DeepSeek's blend, ramp ends floored/ceiled when
yarn_truncate); cos/sin times the yarn attention factor; pairs (2i, 2i+1) when rope_interleave, else
(i, i + Dr/2); softmax scale Dqk**-0.5 times yarn_scale(factor, mscale_all_dim)**2 unless 'default' or 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w over the last dim."""
    x = _f64(x)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * _f64(w)


def yarn_scale(factor: float, mscale: float) -> float:
    """0.1 * mscale * ln(factor) + 1, or 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(cfg: Any) -> list[float]:
    """Inverse frequencies, one per rotated pair, written out term by term for cfg.rope_type."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor
    original = [base ** (-2 * i / dim) for i in range(dim // 2)]
    if cfg.rope_type == "default":
        return original
    if cfg.rope_type == "linear":
        return [f / factor for f in original]
    assert cfg.rope_type == "yarn", cfg.rope_type

    def turns_dim(turns: float) -> float:
        ctx = cfg.original_max_position_embeddings
        return dim * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = turns_dim(cfg.beta_fast), turns_dim(cfg.beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)   # 0: keep original, 1: interpolate
        out.append(original[i] / factor * ramp + original[i] * (1 - ramp))
    return out


def rope_magnitude(cfg: Any) -> float:
    """The cos/sin scale: 1 unless yarn; yarn: the explicit attention factor, else the mscale ratio when
    mscale and mscale_all_dim are both non-zero, else yarn_scale(factor, 1)."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    if cfg.mscale != 0 and cfg.mscale_all_dim != 0:
        return yarn_scale(cfg.rope_factor, cfg.mscale) / yarn_scale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_scale(cfg.rope_factor, 1.0)


def rope(x: torch.Tensor, pos: int, cfg: Any) -> torch.Tensor:
    """Rotate the pairs of x [..., Dr] by pos * inv_freq, times rope_magnitude(cfg)."""
    x = _f64(x).clone()
    m = rope_magnitude(cfg)
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for i, f in enumerate(inv_freq(cfg)):
        c, s = math.cos(pos * f) * m, math.sin(pos * f) * m
        ia, ib = (2 * i, 2 * i + 1) if cfg.rope_interleave else (i, i + half)
        a, b = x[..., ia], x[..., ib]
        out[..., ia] = a * c - b * s
        out[..., ib] = a * s + b * c
    return out


def softmax_scale(cfg: Any) -> float:
    """Dqk**-0.5, times yarn_scale(factor, mscale_all_dim)**2 for non-default rope with mscale_all_dim != 0."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_type != "default" and cfg.mscale_all_dim != 0:
        m = yarn_scale(cfg.rope_factor, cfg.mscale_all_dim)
        scale = scale * m * m
    return scale


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int],
              scale: float) -> torch.Tensor:
    """q [Sq, N, D], k [L, N, D], v [L, N, Dv]: query i sees keys [0, q_pos[i]]; -1 gives zeros."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for i, p in enumerate(q_pos):
        if p < 0:
            continue
        for n in range(q.shape[1]):
            s = [float(q[i, n] @ k[j, n]) * scale for j in range(p + 1)]
            mx = max(s)
            e = [math.exp(t - mx) for t in s]
            tot = sum(e)
            for j in range(p + 1):
                out[i, n] += e[j] / tot * v[j, n]
    return out


def latent_decode(q: torch.Tensor, kv: torch.Tensor, ctx: list[int], kv_lora_rank: int,
                  scale: float) -> torch.Tensor:
    """q [R, N, Dc], kv [R, L, Dc] (row r's own context): one shared head, values = kv[..., :C]."""
    q, kv = _f64(q), _f64(kv)
    out = torch.zeros(q.shape[0], q.shape[1], kv_lora_rank, dtype=torch.float64)
    for r, n_ctx in enumerate(ctx):
        if n_ctx <= 0:
            continue
        keys = kv[r, :n_ctx][:, None, :].expand(n_ctx, q.shape[1], kv.shape[-1])
        vals = keys[..., :kv_lora_rank]
        out[r] = attention(q[r:r + 1], keys, vals, [n_ctx - 1], scale)[0]
    return out


def _q_heads(params: Any, xt: torch.Tensor, cfg: Any) -> torch.Tensor:
    """One token's query [N * (Dn + Dr)] through q_proj, or q_a_proj (+ bias), its norm and q_b_proj."""
    if cfg.q_lora_rank is None:
        return _f64(params.q_proj) @ xt
    qa = _f64(params.q_a_proj) @ xt
    if cfg.attention_bias:
        qa = qa + _f64(params.q_a_bias)
    return _f64(params.q_b_proj) @ rms_norm(qa, params.q_a_norm, cfg.latent_norm_eps)


def mla(params: Any, x: torch.Tensor, lengths: list[int], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Full MLA over x [B, S, H] where sequence b holds lengths[b] tokens at positions 0.. (rest padding).

    Returns (out [B, S, H] with zero padding rows, cache rows [B, S, Dc]: normed latent ++ roped k_pe).
    """
    x = _f64(x)
    N, Dn, Dr, Dv, C = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    eps = cfg.latent_norm_eps
    wkv_a, wkv_b, wo = _f64(params.kv_a_proj), _f64(params.kv_b_proj), _f64(params.o_proj)
    B, S, H = x.shape
    out = torch.zeros(B, S, H, dtype=torch.float64)
    cache = torch.zeros(B, S, C + Dr, dtype=torch.float64)
    scale = softmax_scale(cfg)
    for b in range(B):
        n = lengths[b]
        if n == 0:
            continue
        q = torch.zeros(n, N, Dn + Dr, dtype=torch.float64)
        k = torch.zeros(n, N, Dn + Dr, dtype=torch.float64)
        v = torch.zeros(n, N, Dv, dtype=torch.float64)
        for t in range(n):
            qt = _q_heads(params, x[b, t], cfg).reshape(N, Dn + Dr)
            kv_t = wkv_a @ x[b, t]
            if cfg.attention_bias:
                kv_t = kv_t + _f64(params.kv_a_bias)
            latent = rms_norm(kv_t[:C], params.kv_a_norm, eps)
            k_pe = rope(kv_t[C:], t, cfg)
            cache[b, t] = torch.cat([latent, k_pe])
            up = (wkv_b @ latent).reshape(N, Dn + Dv)
            for h in range(N):
                q[t, h] = torch.cat([qt[h, :Dn], rope(qt[h, Dn:], t, cfg)])
                k[t, h] = torch.cat([up[h, :Dn], k_pe])
                v[t, h] = up[h, Dn:]
        o = attention(q, k, v, list(range(n)), scale)           # [n, N, Dv]
        for t in range(n):
            out[b, t] = wo @ o[t].reshape(N * Dv)
            if cfg.attention_bias:
                out[b, t] += _f64(params.o_bias)
    return out, cache
