"""MLA hyper-parameters: a frozen, hashable config with named presets, and YaRN's magnitude correction.

Dimension legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, Dqk = Dn + Dr, Dc = C + Dr (one cache row).

The rotary tables built from these fields (frequencies, cos/sin, the rotation) are in rope.py. The
rope fields follow transformers' rope_parameters (modeling_rope_utils.py) and its DeepSeek attention:
- rope_type "default": plain RoPE, inv_freq = theta ** (-2i / Dr); no magnitude correction at all.
- "linear": the same frequencies divided by rope_factor; cos/sin unscaled.
- "yarn": DeepSeek's YaRN blend of theta and theta / rope_factor over the ramp found from
  beta_fast/beta_slow and original_max_position_embeddings (yarn_truncate: floor/ceil the ramp's ends,
  transformers' `truncate`); cos/sin scaled by `rope_mscale` (transformers' attention_factor).
softmax_scale is Dqk**-0.5, times yarn_mscale(rope_factor, mscale_all_dim)**2 when rope_type is not
"default" and mscale_all_dim is non-zero (transformers' yarn_apply_mscale, and DeepSeek's own code).
mscale / mscale_all_dim 0 mean "not given", as a missing key in transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

from nanomoe_fn.checks import check_bool_field, check_choice_field, check_float_field, check_int_field

ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class MLAConfig:
    """Frozen, hashable hyper-parameters of one DeepSeek-V3 / V2 attention block.

    q_lora_rank None: no q low-rank path (DeepSeek-V2-Lite), q = x @ q_proj.T.
    rope_interleave True rotates interleaved pairs (x[2i], x[2i+1]) (DeepSeek's weights, transformers V3's
    default and V2's complex rotation); False rotates (x[i], x[i + Dr/2]) (transformers' rotate_half on raw
    weights, V3 with rope_interleave=False).
    attention_bias: biases on q_a_proj (only with a q low-rank path: q_proj never has one), kv_a_proj and
    o_proj, where transformers and DeepSeek put them.
    rope_attention_factor: the yarn cos/sin magnitude given explicitly (transformers' attention_factor); None
    derives it (see rope_mscale).
    rms_norm_eps is the epsilon of the decoder layers' norms (and the final norm); latent_norm_eps that of
    q_a_layernorm and kv_a_layernorm (transformers and DeepSeek always build those with 1e-6).
    """

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
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
    rope_type: str = "yarn"
    rope_interleave: bool = True
    yarn_truncate: bool = True
    rope_attention_factor: float | None = None
    attention_bias: bool = False
    latent_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # the same standard as MoEConfig: bool is not an int, floats finite, sizes positive, field named
        own = "MLAConfig"
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "original_max_position_embeddings", "page_size"):
            object.__setattr__(self, name, check_int_field(own, name, getattr(self, name)))
        if self.q_lora_rank is not None:
            object.__setattr__(self, "q_lora_rank", check_int_field(own, "q_lora_rank", self.q_lora_rank))
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        floats = dict(rope_theta=dict(gt=1.0), rope_factor=dict(gt=0.0), beta_fast=dict(gt=0.0),
                      beta_slow=dict(gt=0.0), mscale=dict(ge=0.0), mscale_all_dim=dict(ge=0.0),
                      rms_norm_eps=dict(gt=0.0), latent_norm_eps=dict(gt=0.0))
        for name, bounds in floats.items():
            object.__setattr__(self, name, check_float_field(own, name, getattr(self, name), **bounds))
        if self.rope_attention_factor is not None:
            object.__setattr__(self, "rope_attention_factor",
                               check_float_field(own, "rope_attention_factor", self.rope_attention_factor, gt=0.0))
        for name in ("rope_interleave", "yarn_truncate", "attention_bias"):
            check_bool_field(own, name, getattr(self, name))
        check_choice_field(own, "rope_type", self.rope_type, ROPE_TYPES)
        if self.rope_attention_factor is not None and self.rope_type != "yarn":
            raise ValueError(f"MLAConfig.rope_attention_factor applies to rope_type 'yarn' only, got rope_type "
                             f"{self.rope_type!r}")
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
        """Dqk**-0.5, times mscale(rope_factor, mscale_all_dim)**2 unless rope_type is 'default' or
        mscale_all_dim is 0 (transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_mscale(self) -> float:
        """The magnitude of the cos/sin tables: 1 for 'default' and 'linear'; for 'yarn'
        rope_attention_factor when given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
        both are non-zero, else mscale(factor, 1) (transformers' _compute_yarn_parameters)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor, 1.0)

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
