"""Naive float64 DeepSeek-V3 multi-head latent attention (MLA): the oracle for nanomoe_fn.attention.mla.

Imports nothing from nanomoe_fn or kernels. Everything is upcast to float64 on the CPU. K and V are
materialised per head from the latent (no weight absorption); attention loops over tokens and heads.

Dimension legend: B sequences, S tokens per sequence (from position 0), H hidden, N heads,
Q q_lora_rank, C kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims, Dc = C + Dr, L keys, R query rows.

`params` is any object with attributes q_a_proj [Q, H], q_a_norm [Q], q_b_proj [N*(Dn+Dr), Q],
kv_a_proj [C+Dr, H], kv_a_norm [C], kv_b_proj [N*(Dn+Dv), C], o_proj [H, N*Dv] (Linear layout
[out, in]); `cfg` any object with MLAConfig's field names.
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
    """YaRN inverse frequencies of DeepSeek-V3, one per rotated pair, written out term by term."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_factor

    def turns_dim(turns: float) -> float:
        ctx = cfg.original_max_position_embeddings
        return dim * math.log(ctx / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(turns_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(turns_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        original = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)   # 0: keep original, 1: interpolate
        out.append(original / factor * ramp + original * (1 - ramp))
    return out


def rope(x: torch.Tensor, pos: int, cfg: Any) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., Dr] by pos * inv_freq, times the YaRN rope mscale."""
    x = _f64(x).clone()
    m = yarn_scale(cfg.rope_factor, cfg.mscale) / yarn_scale(cfg.rope_factor, cfg.mscale_all_dim)
    out = torch.empty_like(x)
    for i, f in enumerate(inv_freq(cfg)):
        c, s = math.cos(pos * f) * m, math.sin(pos * f) * m
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = a * s + b * c
    return out


def softmax_scale(cfg: Any) -> float:
    """Dqk**-0.5 * mscale(factor, mscale_all_dim)**2."""
    m = yarn_scale(cfg.rope_factor, cfg.mscale_all_dim)
    return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * m * m


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


def mla(params: Any, x: torch.Tensor, lengths: list[int], cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Full MLA over x [B, S, H] where sequence b holds lengths[b] tokens at positions 0.. (rest padding).

    Returns (out [B, S, H] with zero padding rows, cache rows [B, S, Dc]: normed latent ++ roped k_pe).
    """
    x = _f64(x)
    N, Dn, Dr, Dv, C = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    eps = cfg.rms_norm_eps
    wq_a, wq_b, wkv_a, wkv_b, wo = (_f64(params.q_a_proj), _f64(params.q_b_proj), _f64(params.kv_a_proj),
                                    _f64(params.kv_b_proj), _f64(params.o_proj))
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
            qt = (wq_b @ rms_norm(wq_a @ x[b, t], params.q_a_norm, eps)).reshape(N, Dn + Dr)
            kv_t = wkv_a @ x[b, t]
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
    return out, cache
