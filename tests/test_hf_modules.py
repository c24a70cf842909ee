"""Our MLA and router against transformers' own DeepSeek-V3 / V2 modules, weights copied across.

Dimension legend: B sequences, S tokens, H hidden, N heads, Q q_lora_rank, C kv_lora_rank, Dr rope dims,
E experts, k experts per token, T tokens.

Each case builds a tiny transformers config, maps its to_dict() through config_from_hf (so the mapping is
under test too), builds transformers' attention / router with random weights (norms away from 1, biases
non-zero), and compares: our prefill path over all tokens, and our prefill-then-decode path, with
transformers' attention run prefill-then-decode over its own cache (float64, relative 1e-5: transformers
forms rope angles and norms in float32); routers: the same top-k sets and weights within 1e-6.
The float64 reference (nanomoe_reference) is checked on the same new features.
"""

from __future__ import annotations

import dataclasses

import nanomoe_reference as reference
import nanomoe_reference.mla as ref_mla
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf3

from nanomoe_fn.attention.cache import init_contiguous_cache
from nanomoe_fn.attention.mla import mla
from nanomoe_fn.attention.params import MLAParams
from nanomoe_fn.model.hf_config import config_from_hf
from nanomoe_fn.moe.params import GateParams
from nanomoe_fn.moe.route import route

F64 = torch.float64
DIMS = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=12, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            vocab_size=64, attn_implementation="eager")
# theta 100, original context 40, beta_fast 4: the yarn ramp runs inside the 4 pairs, its ends unrounded
YARN = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=40, beta_fast=4,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
ATTN_CASES = {
    "v3-yarn": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=YARN)),
    "v3-yarn-no-truncate": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=YARN | dict(truncate=False))),
    "v3-yarn-mscale-only": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=YARN | dict(
        mscale=0.707, mscale_all_dim=None))),
    "v3-yarn-attention-factor": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=YARN | dict(
        attention_factor=1.3, mscale_all_dim=0.8))),
    "v3-default-rope": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=dict(rope_type="default",
                                                                                    rope_theta=50.0))),
    "v3-linear-rope": (DeepseekV3Config, dict(q_lora_rank=24, rope_parameters=dict(
        rope_type="linear", rope_theta=100.0, factor=2.0, mscale_all_dim=0.5))),
    "v3-bias": (DeepseekV3Config, dict(q_lora_rank=24, attention_bias=True, rope_parameters=YARN)),
    "v3-rotate-half": (DeepseekV3Config, dict(q_lora_rank=24, rope_interleave=False, rope_parameters=YARN)),
    "v3-no-q-lora-bias": (DeepseekV3Config, dict(q_lora_rank=None, attention_bias=True, rope_interleave=False,
                                                 rope_parameters=YARN)),
    "v2-lite": (DeepseekV2Config, dict(q_lora_rank=None, num_experts_per_tok=2, rope_parameters=YARN | dict(
        mscale=0.707, mscale_all_dim=0.707))),
    "v2-q-lora-bias": (DeepseekV2Config, dict(q_lora_rank=24, attention_bias=True, num_experts_per_tok=2,
                                              rope_parameters=YARN)),
}


def hf_config(cls: type, extra: dict) -> DeepseekV3Config | DeepseekV2Config:
    rope = extra.get("rope_parameters", {})
    max_pos = int(rope.get("factor", 1) * rope.get("original_max_position_embeddings", 64))
    return cls(**DIMS, **extra, max_position_embeddings=max_pos)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2), biases N(0, 0.1^2): a dropped piece shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        t = torch.randn(p.shape, generator=g, dtype=F64)
        if "layernorm" in name:
            t = 1 + 0.2 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        elif t.dim() == 2:
            t = t * p.shape[1] ** -0.5
        p.copy_(t)


def mla_params(a: torch.nn.Module) -> MLAParams:
    """Our record viewing transformers' attention weights (the loader's naming)."""
    def w(m):
        return None if m is None else m.weight.detach()

    def b(m):
        return None if m is None or m.bias is None else m.bias.detach()

    return MLAParams(kv_a_proj=w(a.kv_a_proj_with_mqa), kv_a_norm=w(a.kv_a_layernorm), kv_b_proj=w(a.kv_b_proj),
                     o_proj=w(a.o_proj), q_a_proj=w(a.q_a_proj), q_a_norm=w(a.q_a_layernorm), q_b_proj=w(a.q_b_proj),
                     q_proj=w(a.q_proj), q_a_bias=b(a.q_a_proj), kv_a_bias=b(a.kv_a_proj_with_mqa), o_bias=b(a.o_proj))


def hf_incremental(hf_cfg, x: torch.Tensor, prefix: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """transformers' attention over x [B, S, H]: prefill `prefix` tokens into its cache, then one token a step."""
    mod = hf3 if isinstance(hf_cfg, DeepseekV3Config) else hf2
    cls = mod.DeepseekV3Attention if mod is hf3 else mod.DeepseekV2Attention
    rotary = (mod.DeepseekV3RotaryEmbedding if mod is hf3 else mod.DeepseekV2RotaryEmbedding)(hf_cfg)
    attn = cls(hf_cfg, layer_idx=0).to(F64)
    randomise(attn, 0)
    cache, outs, B, S = DynamicCache(), [], x.shape[0], x.shape[1]
    for lo, hi in [(0, prefix)] + [(s, s + 1) for s in range(prefix, S)]:
        pos = torch.arange(lo, hi)[None].expand(B, -1)
        mask = torch.full((hi - lo, hi), float("-inf"), dtype=F64).triu(lo + 1)[None, None]  # causal by position
        with torch.no_grad():
            o, _ = attn(x[:, lo:hi], position_embeddings=rotary(x, pos), attention_mask=mask, cache=cache)
        outs.append(o)
    return attn, torch.cat(outs, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_mla_matches_transformers_attention(case):
    cls, extra = ATTN_CASES[case]
    hf_cfg = hf_config(cls, extra)
    cfg = config_from_hf(hf_cfg.to_dict()).mla
    B, S, prefix = 2, 9, 4
    x = torch.randn(B, S, cfg.hidden_size, generator=torch.Generator().manual_seed(1), dtype=F64)
    attn, want = hf_incremental(hf_cfg, x, prefix)
    p = mla_params(attn)
    pos = torch.arange(S)[None].expand(B, -1).contiguous()
    out, _ = mla(p, x, pos, init_contiguous_cache(B, 16, cfg.cache_dim, F64), cfg, path="prefill")
    assert rel_err(out, want) < 1e-5, f"prefill vs transformers: {rel_err(out, want):.3g}"
    cache, steps = init_contiguous_cache(B, 16, cfg.cache_dim, F64), []
    o, cache = mla(p, x[:, :prefix], pos[:, :prefix], cache, cfg)
    steps.append(o)
    for s in range(prefix, S):
        o, cache = mla(p, x[:, s:s + 1], pos[:, s:s + 1], cache, cfg, path="decode")
        steps.append(o)
    out = torch.cat(steps, 1)
    assert rel_err(out, want) < 1e-5, f"prefill + decode vs transformers: {rel_err(out, want):.3g}"
    # the float64 oracle computes the same features independently
    ref_out, _ = ref_mla.mla(p, x, [S, S], cfg)
    assert rel_err(out, ref_out) < 1e-10
    assert rel_err(ref_out, want) < 1e-5


def test_config_features_change_the_output():
    """Each new feature matters for these weights (so the cases above could fail): flipping it moves the output."""
    hf_cfg = hf_config(DeepseekV3Config, dict(q_lora_rank=24, attention_bias=True, rope_parameters=YARN))
    cfg = config_from_hf(hf_cfg.to_dict()).mla
    x = torch.randn(1, 8, cfg.hidden_size, generator=torch.Generator().manual_seed(2), dtype=F64)
    attn, _ = hf_incremental(hf_cfg, x, 8)
    p, pos = mla_params(attn), torch.arange(8)[None]

    def run(c):
        return mla(p, x, pos, init_contiguous_cache(1, 8, c.cache_dim, F64), c)[0]

    base = run(cfg)
    for change in (dict(rope_interleave=False), dict(yarn_truncate=False), dict(rope_type="default"),
                   dict(rope_type="linear"), dict(mscale=0.5), dict(latent_norm_eps=1e-1)):
        assert rel_err(run(dataclasses.replace(cfg, **change)), base) > 1e-6, change


# ---- routers ------------------------------------------------------------------------------------------------

def by_expert(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) sorted by expert id, so unsorted top-k sets compare."""
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), w.double().gather(1, order)


def compare_router(hf_router: torch.nn.Module, moe_cfg, bias: torch.Tensor | None, T: int = 64, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, moe_cfg.hidden, generator=g)
    with torch.no_grad():
        _, hf_w, hf_ids = hf_router(x)
    r = route(GateParams(hf_router.weight.detach(), bias), x, moe_cfg)
    ours, theirs = by_expert(r.topk_ids, r.topk_weights), by_expert(hf_ids, hf_w)
    assert torch.equal(ours[0], theirs[0]), "different top-k sets"
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-6)
    return x, r


ROUTER = dict(DIMS, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


@pytest.mark.parametrize("bias_kind", ["random", "zeros"])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_transformers_v3_router(bias_kind, norm):
    hf_cfg = DeepseekV3Config(**ROUTER, norm_topk_prob=norm, routed_scaling_factor=2.5)
    moe_cfg = config_from_hf(hf_cfg.to_dict()).moe
    assert (moe_cfg.score_func, moe_cfg.correction_bias, moe_cfg.group_rule) == ("sigmoid", True, "top2_sum")
    router = hf3.DeepseekV3TopkRouter(hf_cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g))
        bias = 0.3 * torch.randn(16, generator=g) if bias_kind == "random" else torch.zeros(16)
        router.e_score_correction_bias.copy_(bias)
    x, r = compare_router(router, moe_cfg, bias)
    # the reference router agrees, given the same group rule
    ids, w, _ = reference.route(x, router.weight, 4, "sigmoid", bias, 4, 2, norm, 2.5, group_score="top2_sum")
    assert torch.equal(by_expert(r.topk_ids, r.topk_weights)[0], by_expert(ids, w)[0])


def test_v3_groups_by_top2_even_without_bias():
    """A V3 checkpoint with an all-zero bias must still group by top-2 sums: scoring groups by their best
    expert (the rule for a bias-free config without group_score) picks other experts for some tokens."""
    hf_cfg = DeepseekV3Config(**ROUTER)
    moe_cfg = config_from_hf(hf_cfg.to_dict()).moe
    router = hf3.DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)))
    x, r = compare_router(router, moe_cfg, torch.zeros(16), T=256)
    by_max = route(GateParams(router.weight.detach(), torch.zeros(16)), x, moe_cfg.with_(group_score="max"))
    assert not torch.equal(by_expert(by_max.topk_ids, by_max.topk_weights)[0],
                           by_expert(r.topk_ids, r.topk_weights)[0])


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_route_matches_transformers_v2_router(method):
    hf_cfg = DeepseekV2Config(**ROUTER, topk_method=method, routed_scaling_factor=16.0, norm_topk_prob=False)
    moe_cfg = config_from_hf(hf_cfg.to_dict()).moe
    assert (moe_cfg.score_func, moe_cfg.correction_bias) == ("softmax", False)
    assert moe_cfg.n_group == (1 if method == "greedy" else 4) and moe_cfg.group_rule == "max"
    router = hf2.DeepseekV2TopkRouter(hf_cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=torch.Generator().manual_seed(6)))
    x, r = compare_router(router, moe_cfg, None)
    ids, w, _ = reference.route(x, router.weight, 4, "softmax", None, moe_cfg.n_group, moe_cfg.topk_group,
                                False, 16.0, group_score="max")
    torch.testing.assert_close(by_expert(r.topk_ids, r.topk_weights)[1], by_expert(ids, w)[1], rtol=1e-5, atol=1e-6)


def test_v2_norm_topk_prob_follows_deepseek():
    """DeepSeek's own V2 gate normalises (top_k > 1) and then does not scale; transformers' V2 ignores the flag."""
    hf_cfg = DeepseekV2Config(**ROUTER, topk_method="greedy", routed_scaling_factor=16.0, norm_topk_prob=True)
    moe_cfg = config_from_hf(hf_cfg.to_dict()).moe
    assert moe_cfg.norm_topk_prob and moe_cfg.routed_scaling_factor == 1.0
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(8))
    r = route(GateParams(w, None), x, moe_cfg)
    top = (x @ w.T).softmax(-1).topk(4, dim=-1)
    torch.testing.assert_close(r.topk_weights, top.values / top.values.sum(-1, keepdim=True))
    single = config_from_hf(DeepseekV2Config(**ROUTER | dict(num_experts_per_tok=1), routed_scaling_factor=16.0,
                                             norm_topk_prob=True).to_dict()).moe
    assert not single.norm_topk_prob and single.routed_scaling_factor == 16.0   # top_k 1: scaled, not normalised
