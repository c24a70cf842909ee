"""Validation at the layer's boundary: every bad config, parameter or activation is refused by name.

Each case asserts the exception type and that the one-line message names the argument; the last
tests check that a correct layer still equals the float64 reference with all checks in place.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanomoe_fn import LocalComm, MoEConfig, Placement, init_moe_params, moe_layer, route, shard_moe_params
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.moe.param_checks import check_params
from nanomoe_fn.moe.params import LinearExperts, SharedMLP, SwiGLUExperts
from tests.helpers import assert_close_to_ref, reference_layer

BASE = dict(hidden=16, intermediate=8, num_experts=8, top_k=2)
CFG = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, score_func="sigmoid", n_group=2,
                topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True, n_shared_experts=1)


def _params(cfg: MoEConfig = CFG, dtype: torch.dtype = torch.float32):
    return init_moe_params(cfg, dtype, generator=torch.Generator().manual_seed(0))


def _x(cfg: MoEConfig = CFG, T: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(T, cfg.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)


# ---- configs: strict types, finite floats, positive sizes -------------------------------------------------

MOE_BAD = [
    (dict(hidden=True), TypeError, r"MoEConfig\.hidden must be an int, got bool"),
    (dict(num_experts=8.0), TypeError, r"MoEConfig\.num_experts must be an int"),
    (dict(top_k=0), ValueError, r"MoEConfig\.top_k must be a positive int"),
    (dict(intermediate=-4), ValueError, r"MoEConfig\.intermediate must be a positive int"),
    (dict(n_shared_experts=True), TypeError, r"MoEConfig\.n_shared_experts must be an int"),
    (dict(n_shared_experts=-1), ValueError, r"MoEConfig\.n_shared_experts must be an int >= 0"),
    (dict(routed_scaling_factor=float("inf")), ValueError, r"MoEConfig\.routed_scaling_factor must be finite"),
    (dict(routed_scaling_factor=float("nan")), ValueError, r"MoEConfig\.routed_scaling_factor must be finite"),
    (dict(routed_scaling_factor="2.5"), TypeError, r"MoEConfig\.routed_scaling_factor must be a float"),
    (dict(routed_scaling_factor=0.0), ValueError, r"MoEConfig\.routed_scaling_factor must be > 0"),
    (dict(norm_topk_prob=1), TypeError, r"MoEConfig\.norm_topk_prob must be a bool"),
    (dict(correction_bias="yes", score_func="sigmoid"), TypeError, r"MoEConfig\.correction_bias must be a bool"),
    (dict(score_func=None), TypeError, r"MoEConfig\.score_func must be a str"),
    (dict(activation="gelu"), ValueError, r"MoEConfig\.activation must be one of \('silu',\), got 'gelu'"),
    (dict(group_score="sum"), ValueError, r"MoEConfig\.group_score must be one of \('max', 'top2_sum'\)"),
]


def _ids(cases: list) -> list[str]:
    return [",".join(f"{k}={v!r}" for k, v in changes.items()) for changes, _, _ in cases]


@pytest.mark.parametrize("changes, exc, match", MOE_BAD, ids=_ids(MOE_BAD))
def test_moe_config_rejects(changes, exc, match):
    with pytest.raises(exc, match=match):
        MoEConfig(**{**BASE, **changes})


def test_config_numbers_are_stored_as_plain_python_values():
    import numpy as np
    cfg = MoEConfig(**{**BASE, "hidden": np.int64(16)}, routed_scaling_factor=2)
    assert type(cfg.hidden) is int and type(cfg.routed_scaling_factor) is float
    assert cfg == MoEConfig(**BASE, routed_scaling_factor=2.0) and hash(cfg) == hash(MoEConfig(**BASE,
                                                                                         routed_scaling_factor=2.0))


MLA_BAD = [
    (dict(num_heads=True), TypeError, r"MLAConfig\.num_heads must be an int, got bool"),
    (dict(original_max_position_embeddings=False), TypeError, r"MLAConfig\.original_max_position_embeddings"),
    (dict(hidden_size=64.0), TypeError, r"MLAConfig\.hidden_size must be an int"),
    (dict(kv_lora_rank=0), ValueError, r"MLAConfig\.kv_lora_rank must be a positive int"),
    (dict(page_size=-8), ValueError, r"MLAConfig\.page_size must be a positive int"),
    (dict(rope_theta=float("nan")), ValueError, r"MLAConfig\.rope_theta must be finite"),
    (dict(rope_theta=1.0), ValueError, r"MLAConfig\.rope_theta must be > 1"),
    (dict(rope_factor=float("inf")), ValueError, r"MLAConfig\.rope_factor must be finite"),
    (dict(rms_norm_eps=0.0), ValueError, r"MLAConfig\.rms_norm_eps must be > 0"),
    (dict(beta_fast=True), TypeError, r"MLAConfig\.beta_fast must be a float"),
    (dict(beta_slow=64.0), ValueError, r"MLAConfig\.beta_fast \(32.0\) must be >= beta_slow"),
    (dict(mscale=-1.0), ValueError, r"MLAConfig\.mscale must be >= 0"),
    (dict(mscale_all_dim="1"), TypeError, r"MLAConfig\.mscale_all_dim must be a float"),
    (dict(q_lora_rank=0), ValueError, r"MLAConfig\.q_lora_rank must be a positive int"),
    (dict(rope_type="dynamic"), ValueError, r"MLAConfig\.rope_type must be one of \('default', 'linear', 'yarn'\)"),
    (dict(rope_interleave=1), TypeError, r"MLAConfig\.rope_interleave must be a bool"),
    (dict(yarn_truncate=None), TypeError, r"MLAConfig\.yarn_truncate must be a bool"),
    (dict(attention_bias="no"), TypeError, r"MLAConfig\.attention_bias must be a bool"),
    (dict(latent_norm_eps=0.0), ValueError, r"MLAConfig\.latent_norm_eps must be > 0"),
    (dict(rope_attention_factor=0.0), ValueError, r"MLAConfig\.rope_attention_factor must be > 0"),
    (dict(rope_attention_factor=1.2, rope_type="linear"), ValueError,
     r"MLAConfig\.rope_attention_factor applies to rope_type 'yarn' only"),
]


@pytest.mark.parametrize("changes, exc, match", MLA_BAD, ids=_ids(MLA_BAD))
def test_mla_config_rejects(changes, exc, match):
    with pytest.raises(exc, match=match):
        MLAConfig.preset("tiny", **changes)


# ---- parameters vs their config (host-only checks) ---------------------------------------------------------

def _swap(p, **changes):
    """A copy of MoEParams p with gate/experts/shared sub-fields replaced: key 'experts.w2' etc."""
    parts = {"gate": p.gate, "experts": p.experts, "shared": p.shared}
    for key, value in changes.items():
        part, _, field = key.partition(".")
        parts[part] = replace(parts[part], **{field: value}) if field else value
    return replace(p, **parts)


P = _params()
E, H, I_ = CFG.num_experts, CFG.hidden, CFG.intermediate
BAD_PARAMS = {
    "linear experts for a swiglu config": (lambda: _swap(P, experts=LinearExperts(torch.zeros(E, H, H))), CFG,
                                           TypeError, r"params\.experts must be SwiGLUExperts or SwiGLUExpertsFP8 "
                                                      r"for cfg\.expert_type"),
    "swiglu experts for a linear config": (lambda: P, CFG.with_(expert_type="linear"), TypeError,
                                           r"params\.experts must be LinearExperts for cfg\.expert_type='linear', "
                                           r"got SwiGLUExperts"),
    "w13 of another intermediate": (lambda: _swap(P, **{"experts.w13": torch.zeros(E, 2 * I_ + 2, H)}), CFG,
                                    ValueError, r"params\.experts\.w13 must be \[experts=8, 2\*intermediate=32"),
    "w2 of another hidden": (lambda: _swap(P, **{"experts.w2": torch.zeros(E, H + 1, I_)}), CFG,
                             ValueError, r"params\.experts\.w2 must be \[experts=8, hidden=32, intermediate=16\]"),
    "linear w of another hidden": (lambda: _swap(_params(CFG.with_(expert_type="linear")),
                                                 **{"experts.w": torch.zeros(E, H, H // 2)}),
                                   CFG.with_(expert_type="linear"), ValueError,
                                   r"params\.experts\.w must be \[experts=8, hidden=32, hidden=32\]"),
    "fewer experts than the config": (lambda: _swap(P, experts=SwiGLUExperts(P.experts.w13[:4], P.experts.w2[:4])),
                                      CFG, ValueError, r"params\.experts must hold (cfg\.num_experts=|this rank's )8.*"
                                      r"got 4"),
    "shared expert missing": (lambda: _swap(P, shared=None), CFG, ValueError,
                              r"params\.shared must be a SharedMLP for cfg\.n_shared_experts=1, got NoneType"),
    "shared expert not in the config": (lambda: P, CFG.with_(n_shared_experts=0), ValueError,
                                        r"params\.shared must be None for cfg\.n_shared_experts=0"),
    "shared expert of another width": (lambda: P, CFG.with_(n_shared_experts=2), ValueError,
                                       r"params\.shared\.w13 must be \[2\*n_shared_experts\*intermediate=64"),
    "shared expert not a SharedMLP": (lambda: _swap(P, shared=SwiGLUExperts(P.shared.w13, P.shared.w2)), CFG,
                                      TypeError, r"params\.shared must be a SharedMLP"),
    "gate weight [H, E]": (lambda: _swap(P, **{"gate.weight": P.gate.weight.T.contiguous()}), CFG, ValueError,
                           r"params\.gate\.weight must be \[num_experts=8, hidden=32\]"),
    "gate bias missing": (lambda: _swap(P, **{"gate.bias": None}), CFG, ValueError,
                          r"params\.gate\.bias must be a \[8\] tensor for cfg\.correction_bias=True"),
    "gate bias not in the config": (lambda: P, CFG.with_(correction_bias=False), ValueError,
                                    r"params\.gate\.bias must be None for cfg\.correction_bias=False"),
    "gate bias of another length": (lambda: _swap(P, **{"gate.bias": torch.zeros(E + 1)}), CFG, ValueError,
                                    r"params\.gate\.bias must be \[num_experts=8\]"),
    "integer expert weights": (lambda: _swap(P, **{"experts.w13": P.experts.w13.long()}), CFG, TypeError,
                               r"params\.experts\.w13 must have a floating dtype .*got torch\.int64"),
    "bool gate weight": (lambda: _swap(P, **{"gate.weight": P.gate.weight > 0}), CFG, TypeError,
                         r"params\.gate\.weight must have a floating dtype .*got torch\.bool"),
    "w2 in another dtype than w13": (lambda: _swap(P, **{"experts.w2": P.experts.w2.half()}), CFG, TypeError,
                                     r"params\.experts\.w2 must have the experts' dtype torch\.float32"),
    "shared expert in another dtype": (lambda: _swap(P, shared=SharedMLP(P.shared.w13.double(), P.shared.w2.double())),
                                       CFG, TypeError, r"params\.shared\.w13 must have the experts' dtype"),
    "expert weight on another device": (lambda: _swap(P, **{"experts.w2": P.experts.w2.to("meta")}), CFG,
                                        ValueError, r"params\.experts\.w2 must be on cpu .*got meta"),
    "gate bias on another device": (lambda: _swap(P, **{"gate.bias": P.gate.bias.to("meta")}), CFG,
                                    ValueError, r"params\.gate\.bias must be on cpu"),
    "a weight that is not a tensor": (lambda: _swap(P, **{"experts.w13": P.experts.w13.numpy()}), CFG,
                                      TypeError, r"params\.experts\.w13 must be a torch\.Tensor, got ndarray"),
    "params not a MoEParams": (lambda: {"gate": P.gate}, CFG, TypeError, r"params must be a MoEParams, got dict"),
    "gate not a GateParams": (lambda: _swap(P, gate=P.gate.weight), CFG, TypeError, r"params\.gate must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_params_that_disagree_with_their_config(case):
    make, cfg, exc, match = BAD_PARAMS[case]
    params = make()
    with pytest.raises(exc, match=match):
        check_params(params, cfg)
    with pytest.raises(exc, match=match):  # the layer refuses them before computing anything
        moe_layer(params, _x(cfg), cfg)


BAD_X = {
    "x in another dtype than the experts": (lambda: _x(dtype=torch.bfloat16), TypeError,
                                            r"x must have the experts' dtype torch\.float32 .*got torch\.bfloat16"),
    "x on another device": (lambda: _x().to("meta"), ValueError, r"x must be on cpu .*got meta"),
    "x of another hidden size": (lambda: torch.randn(4, H + 1), ValueError, r"x must be \[T, hidden=32\]"),
    "x with 3 dims": (lambda: torch.randn(1, 4, H), ValueError, r"x must have 2 dims"),
    "x not a tensor": (lambda: [[0.0] * H], TypeError, r"x must be a torch\.Tensor, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_X))
def test_bad_x_is_refused_by_name(case):
    make, exc, match = BAD_X[case]
    with pytest.raises(exc, match=match):
        check_params(P, CFG, make())
    with pytest.raises(exc, match=match):
        moe_layer(P, make(), CFG)


def test_bad_cfg_and_unsharded_params_are_refused():
    with pytest.raises(TypeError, match=r"cfg must be a MoEConfig, got dict"):
        moe_layer(P, _x(), dict(BASE))
    with pytest.raises(TypeError, match=r"cfg must be a MoEConfig"):
        check_params(P, dict(BASE))
    # all 8 experts where a 2-rank placement gives this rank 4 slots
    with pytest.raises(ValueError, match=r"params\.experts must hold this rank's 4 slots .*shard_moe_params.*got 8"):
        check_params(P, CFG, num_experts=4)


# ---- non-finite activations: one reduction on the router logits, a device assert off the CPU ------------

def _huge_x() -> tuple[object, torch.Tensor]:
    # finite float32 activations whose router logits overflow: 1e38 * sum|w| (about 4.5) > float32 max
    params = _swap(P, **{"gate.weight": P.gate.weight.abs()})
    return params, torch.full((3, H), 1e38)


@pytest.mark.parametrize("case", ["inf", "-inf", "nan", "overflow"])
def test_non_finite_activations_are_an_error(case):
    params, x = (P, _x()) if case != "overflow" else _huge_x()
    if case != "overflow":
        x[2, 5] = float(case)
    assert torch.isfinite(x).all() == (case == "overflow")
    for call in (lambda: route(params.gate, x, CFG), lambda: moe_layer(params, x, CFG)):
        with pytest.raises(ValueError, match=r"router logits contain NaN/inf: x holds NaN/inf or values too large"):
            call()


def test_compiled_layer_rejects_inf_in_x_as_a_device_assert():
    torch._dynamo.reset()
    layer = torch.compile(moe_layer, fullgraph=True, backend="aot_eager")
    x = _x(T=12)
    comm, placement = LocalComm(), Placement.identity(E, 1)
    assert torch.isfinite(layer(P, x, CFG, comm, placement, "bmm", 24)).all()
    x[3, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"router logits contain NaN/inf: x holds"):
        layer(P, x, CFG, comm, placement, "bmm", 24)


# ---- a correct layer is untouched by the checks ----------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG, CFG.with_(expert_type="linear", n_shared_experts=0, correction_bias=False),
                                 MoEConfig(hidden=24, intermediate=8, num_experts=6, top_k=3, n_shared_experts=2)],
                         ids=["v3-like", "linear", "softmax-2-shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correct_layer_still_matches_reference(cfg, dtype):
    params = _params(cfg, dtype)
    x = _x(cfg, T=10, dtype=dtype)
    check_params(params, cfg, x)
    ref, _ = reference_layer(params, x, cfg)
    assert_close_to_ref(moe_layer(params, x, cfg), ref, dtype, f"checked layer {cfg.expert_type}")
    # this rank's shard of a 2-rank placement passes with the placement's slot count
    placement = Placement.identity(cfg.num_experts, 2)
    check_params(shard_moe_params(params, placement, 1), cfg, x, num_experts=placement.local_experts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mla_refuses_non_finite_x(bad):
    from nanomoe_fn import MLAConfig, init_contiguous_cache, init_mla_params, mla

    cfg = MLAConfig(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                    qk_rope_head_dim=8, v_head_dim=16)
    params = init_mla_params(cfg, torch.float32)
    x = torch.randn(2, 3, 64)
    positions = torch.arange(3).expand(2, 3)
    mla(params, x, positions, init_contiguous_cache(2, 8, cfg.cache_dim, torch.float32), cfg)  # finite: fine
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="x holds NaN/inf"):
        mla(params, x, positions, init_contiguous_cache(2, 8, cfg.cache_dim, torch.float32), cfg)
