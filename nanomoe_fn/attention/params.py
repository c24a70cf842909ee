"""The MLA parameter record (one attention block's weights) and the one place that creates it.

Dimension legend: H hidden, N heads, Q q_lora_rank, C kv_lora_rank (latent), Dn/Dr/Dv nope/rope/value
head dims, Dqk = Dn + Dr.

MLAParams is a frozen dataclass of tensors registered as a pytree with nanomoe_fn.tree.register_dataclass
(as every record), so `tree_map` casts and moves a whole block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.tree import register_dataclass


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
