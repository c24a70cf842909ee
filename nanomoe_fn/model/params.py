"""The whole model's parameter record and the one place that creates it at random.

Dimension legend: V vocabulary, H hidden, Ld layers, Id dense FFN intermediate, W ranks.

ModelParams is a frozen dataclass registered as a pytree (nanomoe_fn.tree.register_dataclass): embed,
the decoder layers (nanomoe_fn.decoder.DecoderParams, MoE layers holding only this rank's experts under
expert parallelism), the final norm and the LM head. With tied embeddings lm_head is the embed tensor.
checkpoint.py fills the same record from safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nanomoe_fn.attention.params import init_mla_params
from nanomoe_fn.decoder import DecoderParams
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.moe.params import SharedMLP, init_moe_params, shard_moe_params
from nanomoe_fn.tree import register_dataclass


@dataclass(frozen=True, eq=False)
class ModelParams:
    """embed [V, H], layers (one DecoderParams per layer), norm [H], lm_head [V, H]."""

    embed: torch.Tensor
    layers: tuple[DecoderParams, ...]
    norm: torch.Tensor
    lm_head: torch.Tensor


register_dataclass(ModelParams)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device)  # where the generator lives (float32)


def _dense(H: int, I_: int, dtype: torch.dtype, device: torch.device | str, gen: torch.Generator) -> SharedMLP:
    w13 = _randn(gen, 2 * I_, H) * H ** -0.5
    w2 = _randn(gen, H, I_) * I_ ** -0.5
    return SharedMLP(w13=w13.to(device=device, dtype=dtype), w2=w2.to(device=device, dtype=dtype))


def _norm(n: int, dtype: torch.dtype, device: torch.device | str, gen: torch.Generator) -> torch.Tensor:
    # near 1, not exactly 1, so a test notices a norm weight that is dropped or misplaced
    return (1.0 + 0.1 * _randn(gen, n)).to(device=device, dtype=dtype)


def init_model_params(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      seed: int = 0, placement: Placement | None = None, rank: int = 0,
                      generator_device: torch.device | str | None = None) -> ModelParams:
    """Random weights N(0, 1/fan_in) drawn from `seed` on the CPU (the same model on every rank and device),
    or on generator_device (e.g. the GPU: DeepSeek-V3 sizes in seconds; the same model on every rank of
    that device type); MoE layers keep the experts of `rank` under `placement` (default: all, one rank).

    Routers stay float32. Embedding rows are N(0, 1)."""
    gen = torch.Generator(device=generator_device or "cpu").manual_seed(seed)
    H = cfg.hidden
    embed = _randn(gen, cfg.vocab_size, H).to(device=device, dtype=dtype)
    layers = []
    for i in range(cfg.num_layers):
        attn = init_mla_params(cfg.mla, dtype=dtype, device=device, generator=gen)
        attn_norm, ffn_norm = _norm(H, dtype, device, gen), _norm(H, dtype, device, gen)
        if cfg.is_moe_layer(i):
            # full layer drawn, then this rank's experts kept: every rank draws the same numbers
            moe = init_moe_params(cfg.moe, dtype, gen.device, gen)
            moe = moe if placement is None else shard_moe_params(moe, placement, rank)
            moe = torch.utils._pytree.tree_map(lambda t: t.to(device), moe)
            layers.append(DecoderParams(attn_norm, attn, ffn_norm, moe=moe))
        else:
            layers.append(DecoderParams(attn_norm, attn, ffn_norm,
                                        dense=_dense(H, cfg.dense_intermediate, dtype, device, gen)))
    norm = _norm(H, dtype, device, gen)
    lm_head = embed if cfg.tie_word_embeddings else (_randn(gen, cfg.vocab_size, H) * H ** -0.5).to(
        device=device, dtype=dtype)
    return ModelParams(embed=embed, layers=tuple(layers), norm=norm, lm_head=lm_head)


def with_fp8_experts(params: ModelParams, write_back: bool = False) -> ModelParams:
    """The same model with every MoE layer's routed experts block-quantised to FP8 (SwiGLUExpertsFP8, for
    the FP8 expert backends); layers whose experts are FP8 already are kept. write_back: also overwrite
    `params`' own bf16 experts in place with the FP8 values dequantised, so that they, and any model sharing
    their tensors (transformers' modules behind params_from_hf), run the very weights the FP8 record holds."""
    from nanomoe_fn.moe.fp8_params import dequantize_experts, quantize_experts
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    def one(lay: DecoderParams) -> DecoderParams:
        if lay.moe is None or isinstance(lay.moe.experts, SwiGLUExpertsFP8):
            return lay
        fp8 = quantize_experts(lay.moe.experts)
        if write_back:
            with torch.no_grad():
                dequantize_experts(fp8, out=lay.moe.experts)
        return replace(lay, moe=replace(lay.moe, experts=fp8))

    return replace(params, layers=tuple(one(lay) for lay in params.layers))
