"""MLA hyper-parameters and DeepSeek-V3's YaRN rotary embedding.

Dimension legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, Dqk = Dn + Dr, Dc = C + Dr (one cache row), F = Dr // 2 rotary
frequencies, B batch, S new tokens per sequence.

RoPE rotates interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i], the convention of
DeepSeek's own inference code and of its safetensors (HF's modeling file permutes to half-split
first, which gives the same scores). YaRN follows DeepSeek-V3's config: frequencies blend between
the interpolated (theta / factor) and the original ones over the ramp found from beta_fast/slow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from nanomoe_fn.checks import check_float_field, check_int_field


@dataclass(frozen=True)
class MLAConfig:
    """Frozen, hashable hyper-parameters of one DeepSeek-V3 attention block."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    rms_norm_eps: float = 1e-6
    page_size: int = 64

    def __post_init__(self) -> None:
        # the same standard as MoEConfig: bool is not an int, floats finite, sizes positive, field named
        own = "MLAConfig"
        for name in ("hidden_size", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "original_max_position_embeddings", "page_size"):
            object.__setattr__(self, name, check_int_field(own, name, getattr(self, name)))
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        floats = dict(rope_theta=dict(gt=1.0), rope_factor=dict(gt=0.0), beta_fast=dict(gt=0.0),
                      beta_slow=dict(gt=0.0), mscale=dict(ge=0.0), mscale_all_dim=dict(ge=0.0),
                      rms_norm_eps=dict(gt=0.0))
        for name, bounds in floats.items():
            object.__setattr__(self, name, check_float_field(own, name, getattr(self, name), **bounds))
        if self.beta_fast < self.beta_slow:
            raise ValueError(f"MLAConfig.beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow})")

    @property
    def qk_head_dim(self) -> int:
        """Dqk = Dn + Dr, the per-head query/key width of the expanded (prefill) path."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Dc = C + Dr, one compressed cache row (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """Dqk**-0.5 times the YaRN attention correction mscale(factor, mscale_all_dim)**2."""
        m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return self.qk_head_dim ** -0.5 * m * m

    @staticmethod
    def preset(name: str, **overrides: object) -> MLAConfig:
        """One of PRESETS by name ('tiny', 'deepseek-v3'), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"MLAConfig preset must be one of {sorted(PRESETS)}, got {name!r}")
        return replace(PRESETS[name], **overrides)


PRESETS = MappingProxyType({
    "tiny": MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=16, v_head_dim=16, page_size=8),
    "deepseek-v3": MLAConfig(hidden_size=7168, num_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
})


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


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
