"""config.json <-> ModelConfig (nanomoe_fn/model/hf_config.py) against transformers' own config classes.

Dimension legend: H hidden, N heads, E routed experts, k experts per token.

DeepSeek's shipped config.json files (V3, V2-Lite) map onto our presets' values; transformers'
DeepseekV3Config / DeepseekV2Config to_dict() output maps too (several variants); config_to_hf's dict loads
in transformers and maps back to an equal ModelConfig (hypothesis draws the configs); every unknown field
and bad value is refused in one line that names it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV2Config, DeepseekV3Config

from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.model.hf_config import config_from_hf, config_to_hf
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.config import preset as moe_preset

YARN_V3 = dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
               original_max_position_embeddings=4096, type="yarn")
# DeepSeek-V3's config.json as published (fp8 checkpoint, transformers 4.33 era keys)
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
    auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, aux_loss_alpha=0.001, bos_token_id=0,
    eos_token_id=1, ep_size=1, first_k_dense_replace=3, hidden_act="silu", hidden_size=7168, initializer_range=0.02,
    intermediate_size=18432, kv_lora_rank=512, max_position_embeddings=163840, model_type="deepseek_v3",
    moe_intermediate_size=2048, moe_layer_freq=1, n_group=8, n_routed_experts=256, n_shared_experts=1,
    norm_topk_prob=True, num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61, num_key_value_heads=128,
    num_nextn_predict_layers=1, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8", weight_block_size=[128, 128]),
    rms_norm_eps=1e-06, rope_scaling=YARN_V3, rope_theta=10000, routed_scaling_factor=2.5, scoring_func="sigmoid",
    seq_aux=True, tie_word_embeddings=False, topk_group=4, topk_method="noaux_tc", torch_dtype="bfloat16",
    transformers_version="4.33.1", use_cache=True, v_head_dim=128, vocab_size=129280)
# DeepSeek-V2-Lite's config.json as published
DEEPSEEK_V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001,
    bos_token_id=100000, eos_token_id=100001, first_k_dense_replace=1, hidden_act="silu", hidden_size=2048,
    initializer_range=0.02, intermediate_size=10944, kv_lora_rank=512, max_position_embeddings=163840,
    model_type="deepseek_v2", moe_intermediate_size=1408, moe_layer_freq=1, n_group=1, n_routed_experts=64,
    n_shared_experts=2, norm_topk_prob=False, num_attention_heads=16, num_experts_per_tok=6, num_hidden_layers=27,
    num_key_value_heads=16, pretraining_tp=1, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    rms_norm_eps=1e-06, rope_scaling=YARN_V3 | dict(mscale=0.707, mscale_all_dim=0.707), rope_theta=10000,
    routed_scaling_factor=1.0, scoring_func="softmax", seq_aux=True, tie_word_embeddings=False, topk_group=1,
    topk_method="greedy", torch_dtype="bfloat16", transformers_version="4.33.1", use_cache=True, v_head_dim=128,
    vocab_size=102400)


def round_trip(cfg: ModelConfig) -> ModelConfig:
    """config_to_hf -> JSON -> transformers' config class -> to_dict -> config_from_hf."""
    d = json.loads(json.dumps(config_to_hf(cfg)))
    cls = DeepseekV3Config if d["model_type"] == "deepseek_v3" else DeepseekV2Config
    return config_from_hf(cls.from_dict(d).to_dict())


def test_deepseek_v3_config_json():
    cfg = config_from_hf(DEEPSEEK_V3)
    assert cfg.mla == MLAConfig.preset("deepseek-v3")
    assert cfg.moe == moe_preset("deepseek-v3").with_(group_score="top2_sum")
    assert (cfg.vocab_size, cfg.num_layers, cfg.first_k_dense, cfg.dense_intermediate) == (129280, 61, 3, 18432)
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (163840, 0, (1,))
    assert round_trip(cfg) == cfg
    # the same through transformers (rope_scaling becomes rope_parameters, generic keys appear)
    assert config_from_hf(DeepseekV3Config.from_dict(DEEPSEEK_V3).to_dict()) == cfg


def test_deepseek_v2_lite_config_json():
    cfg = config_from_hf(DEEPSEEK_V2_LITE)
    m, e = cfg.mla, cfg.moe
    assert m.q_lora_rank is None and m.rope_interleave and m.rope_type == "yarn" and m.mscale == 0.707
    assert m.rope_mscale == 1.0 and m.softmax_scale == pytest.approx(192 ** -0.5 * (0.0707 * 3.6888794541 + 1) ** 2)
    assert (e.score_func, e.correction_bias, e.n_group, e.topk_group, e.top_k) == ("softmax", False, 1, 1, 6)
    assert (e.num_experts, e.intermediate, e.n_shared_experts, e.norm_topk_prob) == (64, 1408, 2, False)
    assert (cfg.first_k_dense, cfg.dense_intermediate, cfg.eos_token_ids) == (1, 10944, (100001,))
    assert round_trip(cfg) == cfg
    assert config_from_hf(DeepseekV2Config.from_dict(DEEPSEEK_V2_LITE).to_dict()) == cfg


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2)
HF_VARIANTS = {
    "v3-defaults": (DeepseekV3Config, {}),
    "v3-tiny-yarn-bias": (DeepseekV3Config, TINY | dict(
        q_lora_rank=12, n_group=4, topk_group=2, attention_bias=True, rope_interleave=False, first_k_dense_replace=1,
        eos_token_id=[1, 5], tie_word_embeddings=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=500.0, factor=8.0, original_max_position_embeddings=64, truncate=False,
            mscale=0.8, attention_factor=1.1))),
    "v3-tiny-linear-no-q-lora": (DeepseekV3Config, TINY | dict(
        q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=False, rope_parameters=dict(
            rope_type="linear", rope_theta=1000.0, factor=2.0))),
    "v2-defaults": (DeepseekV2Config, dict(num_experts_per_tok=6)),
    "v2-tiny-grouped": (DeepseekV2Config, TINY | dict(
        q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
        first_k_dense_replace=5, n_shared_experts=0)),
}


@pytest.mark.parametrize("name", list(HF_VARIANTS))
def test_transformers_configs_map_and_round_trip(name):
    cls, kwargs = HF_VARIANTS[name]
    hf = cls(**kwargs)
    cfg = config_from_hf(hf.to_dict())
    assert cfg.num_layers == hf.num_hidden_layers and cfg.first_k_dense == min(hf.first_k_dense_replace,
                                                                                hf.num_hidden_layers)
    assert cfg.mla.q_lora_rank == hf.q_lora_rank and cfg.mla.attention_bias == hf.attention_bias
    assert cfg.mla.rope_type == hf.rope_parameters["rope_type"]
    assert cfg.mla.softmax_scale == pytest.approx(hf3_scaling(hf))
    assert cfg.moe.num_experts == hf.n_routed_experts and cfg.moe.top_k == hf.num_experts_per_tok
    assert cfg.moe.n_shared_experts == (hf.n_shared_experts or 0)
    assert round_trip(cfg) == cfg


def hf3_scaling(hf) -> float:
    """transformers' own attention scaling for this config."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    return yarn_apply_mscale(hf.rope_parameters, (hf.qk_nope_head_dim + hf.qk_rope_head_dim) ** -0.5)


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    """ModelConfigs that a transformers DeepSeek config can express (V3 or V2 routing)."""
    v3 = draw(st.booleans())
    heads = draw(st.sampled_from([1, 2, 4]))
    rope_type = draw(st.sampled_from(["default", "linear", "yarn"]))
    rope = dict(rope_type=rope_type, rope_theta=draw(st.sampled_from([100.0, 10000.0])))
    if rope_type != "default":
        rope |= dict(rope_factor=draw(st.sampled_from([2.0, 40.0])), mscale_all_dim=draw(st.sampled_from([0.0, 0.7])))
    if rope_type == "yarn":
        rope |= dict(original_max_position_embeddings=draw(st.sampled_from([64, 4096])),
                     mscale=draw(st.sampled_from([0.0, 1.0])), yarn_truncate=draw(st.booleans()),
                     rope_attention_factor=draw(st.sampled_from([None, 1.25])))
    mla = MLAConfig(hidden_size=8 * heads, num_heads=heads, q_lora_rank=draw(st.sampled_from([None, 12])),
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=draw(st.sampled_from([4, 8])), v_head_dim=8,
                    rope_interleave=draw(st.booleans()) if v3 else True, attention_bias=draw(st.booleans()),
                    rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])), **rope)
    E, n_group = 8, draw(st.sampled_from([1, 2, 4]))
    top_k, norm = draw(st.integers(1, 2)), draw(st.booleans())
    rsf = 2.5 if v3 or not norm else 1.0
    moe = MoEConfig(hidden=mla.hidden_size, intermediate=16, num_experts=E, top_k=top_k, n_group=n_group,
                    topk_group=draw(st.integers(1, n_group)), score_func="sigmoid" if v3 else "softmax",
                    correction_bias=v3, group_score="top2_sum" if v3 else draw(st.sampled_from([None, "max"])),
                    norm_topk_prob=norm and (v3 or top_k > 1), routed_scaling_factor=rsf,
                    n_shared_experts=draw(st.integers(0, 2)))
    layers = draw(st.integers(1, 4))
    return ModelConfig(vocab_size=64, num_layers=layers, first_k_dense=draw(st.integers(0, layers)),
                       dense_intermediate=24, mla=mla, moe=moe, tie_word_embeddings=draw(st.booleans()),
                       max_position_embeddings=256, bos_token_id=draw(st.sampled_from([None, 0])),
                       eos_token_ids=draw(st.sampled_from([(), (1,), (1, 2)])))


@settings(max_examples=40, deadline=None)
@given(cfg=model_configs())
def test_round_trip_through_transformers(cfg):
    back = round_trip(cfg)
    if cfg.moe.group_score is None:  # V2 routing: None means "max" without a bias, written back explicitly
        cfg = cfg.with_(moe=cfg.moe.with_(group_score="max"))
    assert back == cfg


BAD = [
    (dict(foo=3), r"^config\.json: unknown field 'foo'$"),
    (dict(model_type="llama"), r"^config\.json: model_type must be 'deepseek_v3' or 'deepseek_v2', got 'llama'$"),
    (dict(num_key_value_heads=8), r"^config\.json: num_key_value_heads must be num_attention_heads \(128\), got 8$"),
    (dict(moe_layer_freq=2), r"^config\.json: moe_layer_freq must be 1"),
    (dict(hidden_act="gelu"), r"^config\.json: hidden_act must be 'silu', got 'gelu'$"),
    (dict(head_dim=192), r"^config\.json: head_dim must be qk_rope_head_dim \(64\)"),
    (dict(qk_head_dim=128), r"^config\.json: qk_head_dim must be qk_nope_head_dim \+ qk_rope_head_dim \(192\)"),
    (dict(topk_method="greedy"), r"^config\.json: topk_method must be 'noaux_tc', got 'greedy'$"),
    (dict(scoring_func="softmax"), r"^config\.json: scoring_func must be 'sigmoid', got 'softmax'$"),
    (dict(quantization_config=dict(quant_method="awq")), r"^config\.json: quantization_config\.quant_method must be"),
    (dict(quantization_config=dict(quant_method="fp8", weight_block_size=[64, 64])),
     r"^config\.json: quantization_config\.weight_block_size must be \[128, 128\], got \[64, 64\]$"),
    (dict(quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128], bits=4)),
     r"^config\.json: unknown field 'quantization_config\.bits'$"),
    (dict(rope_scaling=YARN_V3 | dict(type="dynamic")),
     r"^config\.json: rope_scaling\.rope_type must be one of \('default', 'linear', 'yarn'\), got 'dynamic'$"),
    (dict(rope_scaling=YARN_V3 | dict(low_freq_factor=1.0)), r"^config\.json: unknown field 'rope_scaling\.low_freq"),
    (dict(rope_scaling=YARN_V3 | dict(mscale="big")), r"^config\.json: rope_scaling\.mscale must be a number"),
    (dict(rope_scaling=YARN_V3 | dict(partial_rotary_factor=0.5)), r"^config\.json: rope_scaling\.partial_rotary"),
    (dict(rope_parameters=dict(rope_type="default")), r"^config\.json: give rope_parameters or rope_scaling"),
    (dict(eos_token_id="</s>"), r"^config\.json: eos_token_id must be an int, a list of ints or null"),
    (dict(vocab_size=0), r"^config\.json: vocab_size must be an int >= 1, got 0$"),
    (dict(q_lora_rank=1.5), r"^config\.json: q_lora_rank must be an int >= 1 or null, got 1\.5$"),
    (dict(attention_bias="no"), r"^config\.json: attention_bias must be true or false, got 'no'$"),
    (dict(num_experts_per_tok=300), r"^config\.json maps to an invalid config: MoEConfig\.top_k \(300\)"),
    (dict(mlp_bias=True), r"^config\.json: mlp_bias must be false"),
    ({"hidden_size": None}, r"^config\.json: hidden_size must be an int >= 1, got None$"),
]


@pytest.mark.parametrize("changes, match", BAD, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD)])
def test_bad_fields_are_named(changes, match):
    with pytest.raises(ValueError, match=match) as err:
        config_from_hf(DEEPSEEK_V3 | changes)
    assert "\n" not in str(err.value)


def test_v2_specific_refusals():
    for changes, match in [(dict(topk_method="noaux_tc"), r"topk_method must be 'greedy' or 'group_limited_greedy'"),
                           (dict(rope_interleave=False), r"rope_interleave must be true for deepseek_v2"),
                           (dict(scoring_func="sigmoid"), r"scoring_func must be 'softmax', got 'sigmoid'"),
                           (dict(topk_method="group_limited_greedy", n_group=None), r"n_group must be an int")]:
        with pytest.raises(ValueError, match="^config\\.json: " + match):
            config_from_hf(DEEPSEEK_V2_LITE | changes)
    with pytest.raises(ValueError, match=r"^config\.json: missing field 'num_experts_per_tok'$"):
        config_from_hf({k: v for k, v in DEEPSEEK_V2_LITE.items() if k != "num_experts_per_tok"})
    assert config_from_hf(DEEPSEEK_V2_LITE | dict(n_shared_experts=None)).moe.n_shared_experts == 0
    with pytest.raises(TypeError, match="config.json must be an object"):
        config_from_hf([("model_type", "deepseek_v3")])


def test_config_to_hf_refuses_what_transformers_cannot_express():
    v3 = config_from_hf(DEEPSEEK_V3)
    v2 = config_from_hf(DEEPSEEK_V2_LITE)
    cases = [
        (v3.with_(mla=replace(v3.mla, latent_norm_eps=1e-5)), "latent_norm_eps"),
        (v3.with_(moe=v3.moe.with_(correction_bias=False)), "deepseek_v3 routing needs correction_bias"),
        (v3.with_(moe=v3.moe.with_(group_score="max")), "deepseek_v3 routing needs"),
        (v2.with_(moe=v2.moe.with_(norm_topk_prob=True, routed_scaling_factor=2.0)), "deepseek_v2 normalises"),
        (v2.with_(mla=replace(v2.mla, rope_interleave=False)), "rope_interleave=True"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match="^config_to_hf: .*" + match):
            config_to_hf(cfg)
