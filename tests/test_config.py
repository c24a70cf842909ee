"""Config validation and parameter pytrees."""

import pytest
import torch
from torch.utils import _pytree as pytree

from nanomoe_fn import MoEConfig, init_moe_params, preset


@pytest.mark.parametrize("changes, match", [
    (dict(top_k=9, num_experts=8), "top_k"),
    (dict(hidden=0), "hidden"),
    (dict(score_func="relu"), "score_func"),
    (dict(expert_type="mlp"), "expert_type"),
    (dict(num_experts=6, n_group=4), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(correction_bias=True, score_func="softmax"), "correction_bias"),
    (dict(num_experts=8, n_group=4, topk_group=1, top_k=3), "kept groups"),
])
def test_bad_config_is_named(changes, match):
    base = dict(hidden=16, intermediate=8, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**base, **changes})


def test_presets_are_hashable_and_real():
    assert preset("deepseek-v3").hidden == 7168 and preset("deepseek-v3").num_experts == 256
    assert preset("seed").expert_type == "linear" and preset("seed").hidden == 2048
    assert len({preset("tiny"), preset("seed"), preset("deepseek-v3")}) == 3
    with pytest.raises(ValueError, match="preset"):
        preset("nope")


def test_params_are_pytrees():
    cfg = preset("tiny")
    p = init_moe_params(cfg, torch.float32, generator=torch.Generator().manual_seed(0))
    leaves = pytree.tree_leaves(p)
    assert len(leaves) == 6  # gate weight + bias, w13, w2, shared w13, w2
    half = pytree.tree_map(lambda t: t.half(), p)
    assert half.experts.w13.dtype == torch.float16 and half.gate.weight.dtype == torch.float16
    assert torch.equal(half.experts.w2.float(), p.experts.w2.half().float())
