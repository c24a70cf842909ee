"""DeepSeek-V3's YaRN rotary embedding: frequencies, cos/sin tables and the rotation.

Dimension legend: Dr qk_rope_head_dim, F = Dr // 2 rotary frequencies, B batch, S new tokens per sequence.

RoPE rotates interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i], the convention of
DeepSeek's own inference code and of its safetensors (HF's modeling file permutes to half-split
first, which gives the same scores). YaRN follows DeepSeek-V3's config: frequencies blend between
the interpolated (theta / factor) and the original ones over the ramp found from beta_fast/slow.
"""

from __future__ import annotations

import math

import torch

from nanomoe_fn.attention.config import MLAConfig, yarn_mscale


def yarn_inv_freq(cfg: MLAConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[F] float64: DeepSeek-V3's YaRN-blended inverse frequencies of the rope dims.

    Built on `device` directly (no host-to-device copy, so the decode path stays sync-free)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    extra = 1.0 / base ** exps                       # original frequencies (high ones kept)
    inter = 1.0 / (cfg.rope_factor * base ** exps)   # interpolated frequencies (low ones)

    def corr_dim(rotations: float) -> float:
        # rope dim index whose wavelength completes `rotations` turns over the original context
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp, as DeepSeek does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp                                # 1 keeps the original frequency
    return inter * (1 - keep) + extra * keep


def rope_cos_sin(positions: torch.Tensor, cfg: MLAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, F] float64 on positions' device, scaled by the YaRN rope mscale.

    Angles are formed in float64 so large positions (V3 reaches 163840) keep their precision; the
    tables are small ([B, S, F]) and apply_rope casts them to its compute dtype.
    """
    inv = yarn_inv_freq(cfg, positions.device)
    ang = positions.to(torch.float64)[..., None] * inv
    m = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return ang.cos() * m, ang.sin() * m


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., Dr] by (cos, sin) [..., F] (broadcast); x's dtype out.

    Computes in float32 (float64 for float64 x)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct).unflatten(-1, (-1, 2))             # [..., F, 2]
    cos, sin = cos.to(ct), sin.to(ct)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
