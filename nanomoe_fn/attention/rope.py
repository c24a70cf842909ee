"""DeepSeek's rotary embedding: frequencies (default, linear, YaRN), cos/sin tables and the rotation.

Dimension legend: Dr qk_rope_head_dim, F = Dr // 2 rotary frequencies, B batch, S new tokens per sequence.

Frequency i rotates one pair of the Dr rope dims by angle pos * inv_freq[i]: the interleaved pair
(x[2i], x[2i+1]) when cfg.rope_interleave (DeepSeek's own inference code and safetensors; transformers'
V3 rotates the same pairs and writes them out half-split, which gives the same scores; its V2 rotates
them as complex numbers), else the pair (x[i], x[i + F]) (transformers' rotate_half on raw weights).
The rope types (default, linear, yarn) and the cos/sin magnitude are described in config.py.
"""

from __future__ import annotations

import functools
import math

import torch

from nanomoe_fn.attention.config import MLAConfig


def yarn_inv_freq(cfg: MLAConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[F] float64: the YaRN-blended inverse frequencies of the rope dims (whatever cfg.rope_type).

    Built on `device` directly (no host-to-device copy, so the decode path stays sync-free)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    extra = 1.0 / base ** exps                       # original frequencies (high ones kept)
    inter = 1.0 / (cfg.rope_factor * base ** exps)   # interpolated frequencies (low ones)

    def corr_dim(rotations: float) -> float:
        # rope dim index whose wavelength completes `rotations` turns over the original context
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low, high = corr_dim(cfg.beta_fast), corr_dim(cfg.beta_slow)
    if cfg.yarn_truncate:                            # transformers' `truncate` (default True, DeepSeek's rule)
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as DeepSeek does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp                                # 1 keeps the original frequency
    return inter * (1 - keep) + extra * keep


@functools.lru_cache(maxsize=64)
def rope_inv_freq(cfg: MLAConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[F] float64 inverse frequencies for cfg.rope_type: theta ** (-2i / Dr) ('default'), the same divided by
    rope_factor ('linear'), or yarn_inv_freq ('yarn').

    A constant of (cfg, device), so it is built once per device (cached; callers never write to it): a decode
    step then spends no kernels on it."""
    if cfg.rope_type == "yarn":
        return yarn_inv_freq(cfg, device)
    exps = torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float64, device=device) / cfg.qk_rope_head_dim
    inv = 1.0 / cfg.rope_theta ** exps
    return inv / cfg.rope_factor if cfg.rope_type == "linear" else inv


def rope_cos_sin(positions: torch.Tensor, cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, F] float64 on positions' device, scaled by cfg.rope_mscale.

    Angles are formed in float64 so large positions (V3 reaches 163840) keep their precision; the
    tables are small ([B, S, F]) and apply_rope casts them to its compute dtype.
    """
    ang = positions.to(torch.float64)[..., None] * rope_inv_freq(cfg, positions.device)
    m = cfg.rope_mscale
    return ang.cos() * m, ang.sin() * m


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate the pairs of x [..., Dr] by (cos, sin) [..., F] (broadcast); x's dtype and layout out.

    interleave: pairs (x[2i], x[2i+1]); else (x[i], x[i + F]). Computes in float32 (float64 for float64 x)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    cos, sin = cos.to(ct), sin.to(ct)
    if interleave:
        xf = x.to(ct).unflatten(-1, (-1, 2))         # [..., F, 2]
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = x.to(ct).chunk(2, dim=-1)           # [..., F] each: first half, second half
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.to(x.dtype)
