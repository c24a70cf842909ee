"""The one table between our parameter records and the tensor names of DeepSeek's safetensors checkpoints
(DeepSeek-V3 / V2 / V2-Lite, as DeepSeek publishes them and as transformers' save_pretrained writes them).

Dimension legend: V vocabulary, H hidden, Ld layers, Id dense FFN intermediate, E routed experts,
I expert intermediate, S shared experts, N heads, Q q_lora_rank, C kv_lora_rank, Dqk/Dr/Dv head dims.

Record field -> tensor name:
  ModelParams.embed [V, H]                  model.embed_tokens.weight
  ModelParams.norm [H]                      model.norm.weight
  ModelParams.lm_head [V, H]                lm_head.weight (absent when tied: the embedding)
  layers[i].attn_norm / ffn_norm [H]        model.layers.{i}.input_layernorm / post_attention_layernorm.weight
  layers[i].attn.<field>                    model.layers.{i}.self_attn.<MLA_NAMES[field]>
  layers[i].dense (SharedMLP)               model.layers.{i}.mlp.{gate,up,down}_proj.weight
  layers[i].moe.gate.weight [E, H] / bias   model.layers.{i}.mlp.gate.weight / e_score_correction_bias
  layers[i].moe.experts (w13, w2)[e]        model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
  layers[i].moe.shared (SharedMLP)          model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj.weight
A SwiGLU's w13 [2I, H] is gate_proj's rows then up_proj's rows; w2 [H, I] is down_proj.
"""

from __future__ import annotations

import dataclasses
import re

from nanomoe_fn.attention.params import MLAParams, mla_param_shapes
from nanomoe_fn.model.config import ModelConfig

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
ATTN_NORM, FFN_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
ROUTER_WEIGHT, ROUTER_BIAS = "mlp.gate.weight", "mlp.gate.e_score_correction_bias"
SWIGLU = ("gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale_inv"  # an FP8 weight's per-block scales: '<name>_scale_inv'

# MLAParams field -> name under model.layers.{i}.self_attn. (a field missing here fails at import, never silently)
MLA_NAMES = {
    "q_a_proj": "q_a_proj.weight", "q_a_norm": "q_a_layernorm.weight", "q_b_proj": "q_b_proj.weight",
    "q_proj": "q_proj.weight", "kv_a_proj": "kv_a_proj_with_mqa.weight", "kv_a_norm": "kv_a_layernorm.weight",
    "kv_b_proj": "kv_b_proj.weight", "o_proj": "o_proj.weight",
    "q_a_bias": "q_a_proj.bias", "kv_a_bias": "kv_a_proj_with_mqa.bias", "o_bias": "o_proj.bias",
}
_unnamed = [f.name for f in dataclasses.fields(MLAParams) if f.name not in MLA_NAMES]
if _unnamed:
    raise ImportError(f"names.py: MLAParams fields {_unnamed} have no checkpoint name in MLA_NAMES")

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer(i: int, suffix: str) -> str:
    """'model.layers.{i}.' + suffix."""
    return f"model.layers.{i}.{suffix}"


def attn_name(i: int, field: str) -> str:
    """Layer i's MLAParams `field` tensor name."""
    return layer(i, "self_attn." + MLA_NAMES[field])


def expert_name(i: int, e: int, proj: str) -> str:
    """Layer i's routed expert e, proj one of SWIGLU."""
    return layer(i, f"mlp.experts.{e}.{proj}.weight")


def mlp_name(i: int, proj: str, shared: bool) -> str:
    """Layer i's shared experts (shared=True) or dense FFN (False), proj one of SWIGLU."""
    return layer(i, f"mlp.{'shared_experts.' if shared else ''}{proj}.weight")


def mla_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    """MLAParams field -> its shape, or None when the config has no such tensor (q_proj with a q low-rank
    path, the q_a_* / q_b_proj without one, biases without attention_bias): attention/params.py decides."""
    return mla_param_shapes(cfg.mla)


def layer_shapes(cfg: ModelConfig, i: int, experts: range | list[int] | None = None,
                 mla: dict[str, tuple[int, ...] | None] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name of layer i -> its shape; routed experts limited to `experts` (default all);
    mla: mla_shapes(cfg) when the caller already has it."""
    H, m = cfg.hidden, cfg.moe
    out = {layer(i, ATTN_NORM): (H,), layer(i, FFN_NORM): (H,)}
    out.update({attn_name(i, f): s for f, s in (mla or mla_shapes(cfg)).items() if s is not None})
    if cfg.is_moe_layer(i):
        out[layer(i, ROUTER_WEIGHT)] = (m.num_experts, H)
        if m.correction_bias:
            out[layer(i, ROUTER_BIAS)] = (m.num_experts,)
        for e in range(m.num_experts) if experts is None else experts:
            out |= {expert_name(i, e, p): s for p, s in zip(SWIGLU, _swiglu(H, m.intermediate))}
    I_ = m.n_shared_experts * m.intermediate if cfg.is_moe_layer(i) else cfg.dense_intermediate
    if I_:  # the shared experts, or the dense FFN
        out |= {mlp_name(i, p, cfg.is_moe_layer(i)): s for p, s in zip(SWIGLU, _swiglu(H, I_))}
    return out


def _swiglu(H: int, I_: int) -> tuple[tuple[int, int], ...]:
    """gate_proj, up_proj [I, H]; down_proj [H, I]."""
    return (I_, H), (I_, H), (H, I_)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of `cfg` holds -> its shape (FP8 scales not included)."""
    V, H = cfg.vocab_size, cfg.hidden
    out = {EMBED: (V, H), NORM: (H,)}
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (V, H)
    mla = mla_shapes(cfg)  # the same for every layer: computed once
    for i in range(cfg.num_layers):
        out |= layer_shapes(cfg, i, mla=mla)
    return out


def is_ignored(name: str, cfg: ModelConfig) -> bool:
    """Tensors a loader skips: layers >= num_layers (DeepSeek-V3's multi-token-prediction layer 61, and its
    scales), rotary inv_freq buffers, and lm_head.weight of a tied checkpoint (the embedding is used)."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_layers:
        return True
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name.startswith(LM_HEAD))
