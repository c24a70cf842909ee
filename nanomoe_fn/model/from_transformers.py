"""Our parameter records as views of an in-memory transformers DeepSeek-V3/V2 model's tensors (no second copy
of the weights: 74 GB at V3 dims on one GPU). The model is only read through its attributes; this module
does not import transformers. Checkpoints on disk load through checkpoint.py instead.

Dimension legend: E experts, H hidden, I expert intermediate, Id dense intermediate.

transformers 5.x keeps a layer's experts fused in memory (gate_up_proj [E, 2I, H], gate rows then up
rows; down_proj [E, H, I]), which is exactly SwiGLUExperts' layout, so those are shared as they are; the
dense FFN and shared experts (separate gate/up Linears) are concatenated into our fused SharedMLP (a copy).
"""

from __future__ import annotations

from typing import Any

import torch

from nanomoe_fn.attention.params import MLAParams
from nanomoe_fn.decoder import DecoderParams
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.model.names import MLA_NAMES
from nanomoe_fn.model.params import ModelParams
from nanomoe_fn.moe.params import GateParams, MoEParams, SharedMLP, SwiGLUExperts


def _mlp(m: Any) -> SharedMLP:
    return SharedMLP(w13=torch.cat([m.gate_proj.weight.detach(), m.up_proj.weight.detach()]),
                     w2=m.down_proj.weight.detach())


def _attn(a: Any) -> MLAParams:
    """The attention module's tensors by names.MLA_NAMES (the checkpoint's names are its attribute paths)."""
    fields = {}
    for field, name in MLA_NAMES.items():
        sub, attr = name.rsplit(".", 1)
        t = getattr(getattr(a, sub, None), attr, None)  # None where this config has no such tensor
        fields[field] = None if t is None else t.detach()
    return MLAParams(**fields)


def params_from_hf(model: Any, cfg: ModelConfig) -> ModelParams:
    """A transformers DeepseekV3ForCausalLM / DeepseekV2ForCausalLM -> ModelParams sharing its tensors."""
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn = _attn(layer.self_attn)
        norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        if cfg.is_moe_layer(i):
            mlp = layer.mlp
            bias = getattr(mlp.gate, "e_score_correction_bias", None)
            shared = _mlp(mlp.shared_experts) if getattr(mlp, "shared_experts", None) is not None else None
            moe = MoEParams(gate=GateParams(mlp.gate.weight.detach().float(),
                                            None if bias is None or not cfg.moe.correction_bias else bias.float()),
                            experts=SwiGLUExperts(mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()),
                            shared=shared)
            layers.append(DecoderParams(norms[0], attn, norms[1], moe=moe))
        else:
            layers.append(DecoderParams(norms[0], attn, norms[1], dense=_mlp(layer.mlp)))
    return ModelParams(embed=model.model.embed_tokens.weight.detach(), layers=tuple(layers),
                       norm=model.model.norm.weight.detach(), lm_head=model.lm_head.weight.detach())
