"""MLA hyper-parameters: a frozen, hashable config with named presets, and YaRN's magnitude correction.

Dimension legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, Dqk = Dn + Dr, Dc = C + Dr (one cache row).

The rotary tables built from these fields (YaRN frequencies, cos/sin, the rotation) are in rope.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

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
