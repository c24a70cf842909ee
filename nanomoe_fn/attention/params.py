"""The MLA parameter record (one attention block's weights), the one place that creates it, and its check
against the config.

Dimension legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn/Dr/Dv nope/rope/value
head dims, Dqk = Dn + Dr.

MLAParams is a frozen dataclass of tensors registered as a pytree with nanomoe_fn.tree.register_dataclass
(as every record), so `tree_map` casts and moves a whole block; fields a config does not have are None
and are left out of the tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.tree import register_dataclass


@dataclass(frozen=True, eq=False)
class MLAParams:
    """One attention block's weights in Linear layout [out, in], named after DeepSeek's safetensors.

    With a q low-rank path (cfg.q_lora_rank set) q_a_proj, q_a_norm, q_b_proj are set and q_proj is None;
    without one (DeepSeek-V2-Lite) only q_proj. The biases exist only with cfg.attention_bias, each named
    after its projection (transformers and DeepSeek put none on q_proj, q_b_proj or kv_b_proj).
    """

    kv_a_proj: torch.Tensor   # [C + Dr, H]    (kv_a_proj_with_mqa): latent then rope key
    kv_a_norm: torch.Tensor   # [C]            (kv_a_layernorm)
    kv_b_proj: torch.Tensor   # [N * (Dn + Dv), C]  per head: key (W_uk) then value (W_uv)
    o_proj: torch.Tensor      # [H, N * Dv]
    q_a_proj: torch.Tensor | None = None    # [Q, H]
    q_a_norm: torch.Tensor | None = None    # [Q]            (q_a_layernorm)
    q_b_proj: torch.Tensor | None = None    # [N * Dqk, Q]   per head: nope then rope
    q_proj: torch.Tensor | None = None      # [N * Dqk, H]   (no q low-rank path)
    q_a_bias: torch.Tensor | None = None    # [Q]            (q_a_proj.bias)
    kv_a_bias: torch.Tensor | None = None   # [C + Dr]       (kv_a_proj_with_mqa.bias)
    o_bias: torch.Tensor | None = None      # [H]            (o_proj.bias)


OPTIONAL = ("q_a_proj", "q_a_norm", "q_b_proj", "q_proj", "q_a_bias", "kv_a_bias", "o_bias")
register_dataclass(MLAParams, optional=OPTIONAL)


def mla_param_shapes(cfg: MLAConfig) -> dict[str, tuple[int, ...] | None]:
    """Every MLAParams field -> its shape under `cfg`, or None when the config has no such tensor."""
    N, H, Q, C, Dr = cfg.num_heads, cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    low_rank, bias = Q is not None, cfg.attention_bias
    return dict(
        kv_a_proj=(C + Dr, H), kv_a_norm=(C,), kv_b_proj=(N * (cfg.qk_nope_head_dim + cfg.v_head_dim), C),
        o_proj=(H, N * cfg.v_head_dim),
        q_a_proj=(Q, H) if low_rank else None, q_a_norm=(Q,) if low_rank else None,
        q_b_proj=(N * cfg.qk_head_dim, Q) if low_rank else None, q_proj=None if low_rank else (N * cfg.qk_head_dim, H),
        q_a_bias=(Q,) if low_rank and bias else None, kv_a_bias=(C + Dr,) if bias else None,
        o_bias=(H,) if bias else None,
    )


def check_mla_params(params: MLAParams, cfg: MLAConfig) -> None:
    """Host-only: every field the config needs is a tensor of its shape, every other field is None."""
    if not isinstance(params, MLAParams):
        raise TypeError(f"attn_params must be MLAParams, got {type(params).__name__}")
    for name, shape in mla_param_shapes(cfg).items():
        t = getattr(params, name)
        if shape is None:
            if t is not None:
                raise ValueError(f"attn_params.{name} must be None for this config (q_lora_rank={cfg.q_lora_rank}, "
                                 f"attention_bias={cfg.attention_bias}), got a tensor")
        elif not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = "None" if t is None else f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}"
            raise ValueError(f"attn_params.{name} must be a {list(shape)} tensor for this config, got {got}")


def init_mla_params(cfg: MLAConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> MLAParams:
    """Random weights N(0, 1/fan_in), drawn where the generator lives (the CPU by default, so a seed gives the
    same weights anywhere); norms 1; biases N(0, 0.1^2). Fields the config does not have stay None."""
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"cfg must be an MLAConfig, got {type(cfg).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise TypeError(f"init_mla_params dtype must be a 16-, 32- or 64-bit float dtype, got {dtype!r}")
    src = generator.device if generator is not None else torch.device("cpu")

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("_norm"):
            t = torch.ones(shape)
        elif name.endswith("_bias"):
            t = torch.randn(shape, generator=generator, device=src) * 0.1
        else:
            t = torch.randn(shape, generator=generator, device=src) * shape[1] ** -0.5
        return t.to(device=device, dtype=dtype)

    # draw in the historic order (q path, kv path, o) so a seed keeps giving the same low-rank weights
    order = ("q_a_proj", "q_a_norm", "q_b_proj", "q_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj", "o_proj",
             "q_a_bias", "kv_a_bias", "o_bias")
    shapes = mla_param_shapes(cfg)
    return MLAParams(**{n: make(n, shapes[n]) for n in order if shapes[n] is not None})
