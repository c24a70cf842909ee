"""A DeepSeek-V3 / V2 / V2-Lite checkpoint's config.json <-> our ModelConfig.

Dimension legend: V vocabulary, H hidden, N heads, E routed experts, k experts per token, G expert groups.

config_from_hf reads the dict as DeepSeek ships it (rope_scaling + rope_theta, topk_method, scoring_func, ...)
or as transformers 5.x writes it (rope_parameters, head_dim, qk_head_dim, the generic PreTrainedConfig keys).
Every field is honoured (mapped onto ModelConfig / MLAConfig / MoEConfig), accepted as not changing the
inference math (IGNORED, and the notes below), or refused; an unknown field raises ValueError naming it, a
bad value names the field and what was expected.

Routing, by model_type:
- deepseek_v3: sigmoid scores, correction_bias True (the checkpoint holds e_score_correction_bias; all zeros
  is fine), group_score "top2_sum" always (transformers' V3 groups and scores by top-2 sums even with a zero
  bias). topk_method must be "noaux_tc" and scoring_func "sigmoid" when given. norm_topk_prob honoured.
- deepseek_v2: softmax scores, no bias; topk_method "greedy" (no grouping: n_group = topk_group = 1) or
  "group_limited_greedy" (group_score "max"). norm_topk_prob follows DeepSeek's own V2 code: with
  norm_topk_prob and top_k > 1 the weights are normalised and routed_scaling_factor is NOT applied (else
  they are scaled). transformers' V2 ignores norm_topk_prob (it always scales); the two agree when it is
  False, as in every DeepSeek-V2 checkpoint.
Other notes: num_key_value_heads must equal num_attention_heads; moe_layer_freq must be 1; hidden_act
"silu"; head_dim (transformers: the rope head dim) and qk_head_dim are checked against the head dims;
first_k_dense_replace beyond num_hidden_layers means every layer is dense (as in transformers);
n_shared_experts None means 0; num_nextn_predict_layers (DeepSeek-V3's multi-token-prediction layer, not
used for generation; the loader skips its weights) is accepted; quantization_config must be fp8 with
weight_block_size [128, 128] (the loader dequantises). Rope: "default", "linear" or "yarn" (config.py);
yarn keys missing get transformers' defaults (factor = max_position_embeddings / original, beta 32 / 1,
mscale and mscale_all_dim 0 = not given, truncate True). The q_a / kv_a layernorms' epsilon is 1e-6
(transformers builds them so), rms_norm_eps is the decoder norms'.

config_to_hf writes the dict back (deepseek_v3 for sigmoid + bias + top2_sum routing, deepseek_v2 for
softmax + max); transformers' config classes load it and config_from_hf maps it to an equal ModelConfig.
Rope fields the rope type ignores are not written: they come back as MLAConfig's defaults; a MoEConfig
group_score None comes back explicit ("max" for V2, "top2_sum" for V3: the same routing).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from nanomoe_fn.attention.config import ROPE_TYPES, MLAConfig
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.moe.config import MoEConfig

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
HONOURED = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
    "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
    "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters", "rope_scaling",
    "rope_theta", "rope_interleave", "attention_bias", "mlp_bias", "topk_method", "scoring_func", "moe_layer_freq",
    "head_dim", "qk_head_dim", "quantization_config", "num_nextn_predict_layers",
})
# fields that do not change the inference math (training, serialisation, HF bookkeeping): accepted, ignored
IGNORED = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path", "initializer_range", "use_cache",
    "attention_dropout", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp", "dtype", "torch_dtype",
    "output_router_logits", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "num_labels",
})
ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings",
                       "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate",
                       "partial_rotary_factor"})
QUANT_KEYS = frozenset({"quant_method", "weight_block_size", "activation_scheme", "fmt", "modules_to_not_convert",
                        "dequantize"})
_MISSING = object()


def _bad(field: str, expected: str, v: object) -> ValueError:
    return ValueError(f"config.json: {field} must be {expected}, got {v!r}")


def _int(d: Mapping, key: str, default: Any = _MISSING, minimum: int = 1, none: bool = False,
         field: str | None = None) -> int | None:
    """d[key] as an int >= minimum (None allowed when `none`), or default when missing."""
    v = d.get(key, default)
    if v is _MISSING:
        raise ValueError(f"config.json: missing field {field or key!r}")
    if v is None and none:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise _bad(field or key, f"an int >= {minimum}" + (" or null" if none else ""), v)
    return int(v)


def _float(d: Mapping, key: str, default: Any = _MISSING, field: str | None = None) -> float:
    v = d.get(key, default)
    if v is _MISSING:
        raise ValueError(f"config.json: missing field {field or key!r}")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise _bad(field or key, "a number", v)
    return float(v)


def _bool(d: Mapping, key: str, default: bool, none_is: bool | None = None) -> bool:
    v = d.get(key, default)
    if v is None and none_is is not None:
        return none_is  # transformers tests these with `if`: null behaves as false
    if not isinstance(v, bool):
        raise _bad(key, "true or false", v)
    return v


def _choice(d: Mapping, key: str, choices: tuple, default: Any) -> Any:
    v = d.get(key, default)
    if v not in choices:
        raise _bad(key, " or ".join(repr(c) for c in choices), v)
    return v


def _rope(d: Mapping, max_pos: int) -> dict[str, Any]:
    """The MLAConfig rope fields from rope_parameters (transformers 5) or rope_scaling + rope_theta."""
    if d.get("rope_parameters") is not None and d.get("rope_scaling") is not None:
        raise ValueError("config.json: give rope_parameters or rope_scaling, not both")
    name = "rope_scaling" if d.get("rope_scaling") is not None else "rope_parameters"
    r = d.get(name) or {}
    if not isinstance(r, Mapping):
        raise _bad(name, "an object", r)
    for k in r:
        if k not in ROPE_KEYS:
            raise ValueError(f"config.json: unknown field '{name}.{k}'")
    # transformers: the dict's rope_theta first, then the top-level one, then 10000
    theta = _float(r, "rope_theta", field=f"{name}.rope_theta") if r.get("rope_theta") is not None else \
        _float(d, "rope_theta", 10000.0)
    kind = r.get("rope_type", r.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _bad(f"{name}.rope_type", f"one of {ROPE_TYPES}", kind)
    if r.get("partial_rotary_factor", 1.0) != 1.0:
        raise _bad(f"{name}.partial_rotary_factor", "1.0 (MLA ropes all qk_rope_head_dim dims)",
                   r["partial_rotary_factor"])
    out: dict[str, Any] = dict(rope_type=kind, rope_theta=theta)
    if kind == "default":  # transformers reads nothing else (no mscale either)
        return out

    def num(k: str, default: Any) -> Any:
        return default if r.get(k) is None else _float(r, k, field=f"{name}.{k}")

    if kind == "linear":   # factor, and mscale_all_dim for the softmax scale (yarn_apply_mscale)
        return out | dict(rope_factor=_float(r, "factor", field=f"{name}.factor"),
                          mscale_all_dim=num("mscale_all_dim", 0.0))
    orig = _int(r, "original_max_position_embeddings", field=f"{name}.original_max_position_embeddings") \
        if r.get("original_max_position_embeddings") is not None else max_pos
    truncate = r.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise _bad(f"{name}.truncate", "true or false", truncate)
    return out | dict(rope_factor=num("factor", max_pos / orig), original_max_position_embeddings=orig,
                      beta_fast=float(r.get("beta_fast") or 32), beta_slow=float(r.get("beta_slow") or 1),
                      mscale=num("mscale", 0.0), mscale_all_dim=num("mscale_all_dim", 0.0),
                      yarn_truncate=bool(truncate), rope_attention_factor=num("attention_factor", None))


def _check_quant(q: object) -> None:
    """quantization_config: null, or fp8 with 128 x 128 weight blocks and dynamic activation scales."""
    if q is None:
        return
    if not isinstance(q, Mapping):
        raise _bad("quantization_config", "an object", q)
    for k in q:
        if k not in QUANT_KEYS:
            raise ValueError(f"config.json: unknown field 'quantization_config.{k}'")
    if q.get("quant_method") != "fp8":
        raise _bad("quantization_config.quant_method", "'fp8' (the loader dequantises fp8 only)", q.get("quant_method"))
    block = q.get("weight_block_size")
    if not isinstance(block, (list, tuple)) or list(block) != [128, 128]:
        raise _bad("quantization_config.weight_block_size", "[128, 128]", block)
    for k, want in (("activation_scheme", "dynamic"), ("fmt", "e4m3")):
        if q.get(k, want) != want:
            raise _bad(f"quantization_config.{k}", repr(want), q[k])


def _moe(d: Mapping, v3: bool, hidden: int) -> MoEConfig:
    """The MoE layer's config: V3 sigmoid + bias + top2_sum groups, V2 softmax with greedy or max groups."""
    top_k = _int(d, "num_experts_per_tok")
    rsf = _float(d, "routed_scaling_factor", 2.5 if v3 else 1.0)
    norm = _bool(d, "norm_topk_prob", v3, none_is=False)
    common = dict(hidden=hidden, intermediate=_int(d, "moe_intermediate_size"), num_experts=_int(d, "n_routed_experts"),
                  top_k=top_k, n_shared_experts=_int(d, "n_shared_experts", 0, minimum=0, none=True) or 0)
    if v3:
        _choice(d, "scoring_func", ("sigmoid",), "sigmoid")
        _choice(d, "topk_method", ("noaux_tc",), "noaux_tc")
        return MoEConfig(**common, score_func="sigmoid", correction_bias=True, group_score="top2_sum",
                         n_group=_int(d, "n_group", 8), topk_group=_int(d, "topk_group", 4), norm_topk_prob=norm,
                         routed_scaling_factor=rsf)
    _choice(d, "scoring_func", ("softmax",), "softmax")
    method = _choice(d, "topk_method", ("greedy", "group_limited_greedy", None), "greedy") or "greedy"
    groups = (_int(d, "n_group", None, none=True), _int(d, "topk_group", None, none=True))  # checked either way
    if method == "greedy":
        groups = (1, 1)                 # transformers' greedy ignores n_group / topk_group
    elif None in groups:
        raise _bad("n_group" if groups[0] is None else "topk_group", "an int for group_limited_greedy", None)
    norm = norm and top_k > 1           # DeepSeek's V2: normalise (and then do not scale) only then
    return MoEConfig(**common, score_func="softmax", group_score="max", n_group=groups[0], topk_group=groups[1],
                     norm_topk_prob=norm, routed_scaling_factor=1.0 if norm else rsf)


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """A DeepSeek-V3 / V2 config.json dict -> ModelConfig; ValueError naming an unknown field or bad value."""
    if not isinstance(d, Mapping):
        raise TypeError(f"config.json must be an object (dict), got {type(d).__name__}")
    kind = _choice(d, "model_type", MODEL_TYPES, None)
    v3 = kind == "deepseek_v3"
    for k in d:
        if k not in HONOURED and k not in IGNORED:
            raise ValueError(f"config.json: unknown field {k!r}")
    heads, rope, nope = _int(d, "num_attention_heads"), _int(d, "qk_rope_head_dim"), _int(d, "qk_nope_head_dim")
    if d.get("num_key_value_heads") not in (None, heads):
        raise _bad("num_key_value_heads", f"num_attention_heads ({heads})", d["num_key_value_heads"])
    if d.get("head_dim") not in (None, rope):
        raise _bad("head_dim", f"qk_rope_head_dim ({rope}), as transformers sets it", d["head_dim"])
    if d.get("qk_head_dim") not in (None, nope + rope):
        raise _bad("qk_head_dim", f"qk_nope_head_dim + qk_rope_head_dim ({nope + rope})", d["qk_head_dim"])
    if d.get("moe_layer_freq", 1) != 1:
        raise _bad("moe_layer_freq", "1 (every layer after the dense ones is MoE)", d["moe_layer_freq"])
    _choice(d, "hidden_act", ("silu",), "silu")
    if d.get("mlp_bias", False) is not False:
        raise _bad("mlp_bias", "false (bias-free FFNs)", d["mlp_bias"])
    if not v3 and d.get("rope_interleave", True) is not True:
        raise _bad("rope_interleave", "true for deepseek_v2 (its rotation always pairs interleaved dims)",
                   d["rope_interleave"])
    _int(d, "num_nextn_predict_layers", 0, minimum=0, none=True)
    _check_quant(d.get("quantization_config"))
    max_pos = _int(d, "max_position_embeddings", 4096 if v3 else 2048)
    hidden, layers = _int(d, "hidden_size"), _int(d, "num_hidden_layers")
    eos = d.get("eos_token_id", 1 if v3 else 2)       # transformers' defaults when missing
    eos = () if eos is None else (eos,) if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(eos, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in eos):
        raise _bad("eos_token_id", "an int, a list of ints or null", d.get("eos_token_id"))
    try:
        mla = MLAConfig(hidden_size=hidden, num_heads=heads, q_lora_rank=_int(d, "q_lora_rank", none=True),
                        kv_lora_rank=_int(d, "kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                        v_head_dim=_int(d, "v_head_dim"), rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
                        rope_interleave=_bool(d, "rope_interleave", True, none_is=False) if v3 else True,
                        attention_bias=_bool(d, "attention_bias", False), **_rope(d, max_pos))
        return ModelConfig(
            vocab_size=_int(d, "vocab_size"), num_layers=layers, mla=mla, moe=_moe(d, v3, hidden),
            first_k_dense=min(_int(d, "first_k_dense_replace", 3 if v3 else 0, minimum=0), layers),
            dense_intermediate=_int(d, "intermediate_size"), max_position_embeddings=max_pos,
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            bos_token_id=_int(d, "bos_token_id", 0 if v3 else 1, minimum=0, none=True), eos_token_ids=tuple(eos))
    except (TypeError, ValueError) as err:
        if str(err).startswith("config.json"):
            raise
        raise ValueError(f"config.json maps to an invalid config: {err}") from err


def _rope_to_hf(m: MLAConfig) -> dict[str, Any]:
    r: dict[str, Any] = dict(rope_type=m.rope_type, rope_theta=m.rope_theta)
    if m.rope_type == "linear":
        r |= dict(factor=m.rope_factor) | (dict(mscale_all_dim=m.mscale_all_dim) if m.mscale_all_dim else {})
    elif m.rope_type == "yarn":
        r |= dict(factor=m.rope_factor, original_max_position_embeddings=m.original_max_position_embeddings,
                  beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim,
                  truncate=m.yarn_truncate)
        if m.rope_attention_factor is not None:
            r["attention_factor"] = m.rope_attention_factor
    return r


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a config.json dict (deepseek_v3 or deepseek_v2) that transformers loads and config_from_hf
    maps back to an equal ModelConfig; ValueError when neither model type expresses the config."""
    m, e = cfg.mla, cfg.moe
    if m.latent_norm_eps != 1e-6:
        raise ValueError(f"config_to_hf: mla.latent_norm_eps must be 1e-6 (transformers' fixed value), got "
                         f"{m.latent_norm_eps}")
    v3 = e.score_func == "sigmoid"
    if v3 and not (e.correction_bias and e.group_rule == "top2_sum"):
        raise ValueError("config_to_hf: deepseek_v3 routing needs correction_bias=True and group_score 'top2_sum'")
    if not v3 and (e.correction_bias or e.group_rule != "max" or not m.rope_interleave):
        raise ValueError("config_to_hf: deepseek_v2 (softmax routing) needs no correction bias, group_score 'max' "
                         "and rope_interleave=True")
    if not v3 and e.norm_topk_prob and (e.top_k == 1 or e.routed_scaling_factor != 1.0):
        raise ValueError("config_to_hf: deepseek_v2 normalises top-k weights only for top_k > 1 and then does not "
                         "scale them: norm_topk_prob needs top_k > 1 and routed_scaling_factor 1.0")
    eos = cfg.eos_token_ids
    out: dict[str, Any] = dict(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        vocab_size=cfg.vocab_size, hidden_size=m.hidden_size, intermediate_size=cfg.dense_intermediate,
        moe_intermediate_size=e.intermediate, num_hidden_layers=cfg.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads, n_shared_experts=e.n_shared_experts, n_routed_experts=e.num_experts,
        routed_scaling_factor=e.routed_scaling_factor, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
        n_group=e.n_group, topk_group=e.topk_group, num_experts_per_tok=e.top_k,
        first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=e.norm_topk_prob, hidden_act=e.activation,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=m.rms_norm_eps,
        bos_token_id=cfg.bos_token_id, eos_token_id=(None if not eos else eos[0] if len(eos) == 1 else list(eos)),
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=_rope_to_hf(m), attention_bias=m.attention_bias,
        scoring_func=e.score_func, moe_layer_freq=1,
    )
    if v3:
        out |= dict(rope_interleave=m.rope_interleave, topk_method="noaux_tc")
    else:
        grouped = e.n_group > 1
        out |= dict(topk_method="group_limited_greedy" if grouped else "greedy",
                    n_group=e.n_group if grouped else 1, topk_group=e.topk_group if grouped else 1)
    return out
