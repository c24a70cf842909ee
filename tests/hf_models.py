"""Tiny transformers DeepSeek-V3 / V2 models for the model tests (float32, random weights of a useful scale).

transformers' own init draws N(0, 0.02) weights, which make every layer nearly the identity; the tests
redraw them larger so routing, attention and the norms all matter, and give the router a real correction
bias (or an all-zero one).
"""

from __future__ import annotations

from typing import Any

import torch

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def tiny_v3(bias: str = "random", seed: int = 0, **overrides: Any) -> Any:
    """A DeepseekV3ForCausalLM: 3 layers (1 dense), 8 experts top-2 in 2 groups, YaRN rope; bias 'random' or
    'zero' (the correction bias)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=16, v_head_dim=16, rope_parameters=dict(YARN), max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1)
    kw.update(overrides)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw)).eval()
    _redraw(model, seed, bias)
    return model


def tiny_v2_lite(seed: int = 0, **overrides: Any) -> Any:
    """A DeepseekV2ForCausalLM shaped like V2-Lite: no q low-rank path, softmax greedy routing, 2 shared
    experts, rope without interleave."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
              num_experts_per_tok=3, n_shared_experts=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=16, v_head_dim=16, topk_method="greedy", n_group=1, topk_group=1,
              norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=256, bos_token_id=0,
              eos_token_id=1)
    kw.update(overrides)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**kw)).eval()
    _redraw(model, seed, "none")
    return model


def _redraw(model: Any, seed: int, bias: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.1))
        for layer in model.model.layers:
            b = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if b is not None:
                b.copy_(0.1 * torch.randn(b.shape, generator=gen) if bias == "random" else torch.zeros_like(b))
