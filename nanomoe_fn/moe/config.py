"""Static MoE hyper-parameters: a frozen, hashable config with named presets.

Dimension legend: H hidden, I expert intermediate, E routed experts, k experts per token (top-k),
G expert groups (n_group), S shared experts.

The config is static (hashable, usable as a torch.compile / lru_cache key); tensors live in the
parameter pytrees of nanomoe_fn/moe/params.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nanomoe_fn.checks import check_bool_field, check_choice_field, check_float_field, check_int_field

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_TYPES = ("swiglu", "linear")
GROUP_SCORES = ("max", "top2_sum")
ACTIVATIONS = ("silu",)


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer's shape and routing rule.

    expert_type "swiglu" is DeepSeek-V3's expert (gate/up [2I, H], down [H, I]); "linear" is the seed
    benchmark's expert, one bias-free Linear(H, H).
    score_func "softmax" (Mixtral/DeepSeek-V2 style) or "sigmoid" (DeepSeek-V3, with a correction
    bias that only affects which experts are chosen, never their weights).
    Grouped top-k: experts split into n_group groups, the best topk_group groups are kept per token,
    top_k experts are chosen among them (nothing to do when n_group == 1 or topk_group == n_group).
    group_score says how a group is scored from its experts' choice scores (score + bias when there is
    a bias): "max" (its best expert: DeepSeek-V2's group_limited_greedy) or "top2_sum" (the sum of its
    two best: DeepSeek-V3's noaux_tc, which transformers' V3 applies always, with or without a bias);
    None picks "top2_sum" when correction_bias else "max" (the rule `group_rule` returns).
    activation: the SwiGLU experts' gate activation (transformers' hidden_act); only "silu".
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    score_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    n_shared_experts: int = 0
    expert_type: str = "swiglu"
    group_score: str | None = None
    activation: str = "silu"

    def __post_init__(self) -> None:
        # types first (bool is not an int, floats must be finite); values are stored as plain int/float
        fields = {name: check_int_field("MoEConfig", name, getattr(self, name))
                  for name in ("hidden", "intermediate", "num_experts", "top_k", "n_group", "topk_group")}
        fields["n_shared_experts"] = check_int_field("MoEConfig", "n_shared_experts", self.n_shared_experts, 0)
        fields["routed_scaling_factor"] = check_float_field("MoEConfig", "routed_scaling_factor",
                                                            self.routed_scaling_factor, gt=0.0)
        for name in ("norm_topk_prob", "correction_bias"):
            check_bool_field("MoEConfig", name, getattr(self, name))
        check_choice_field("MoEConfig", "score_func", self.score_func, SCORE_FUNCS)
        check_choice_field("MoEConfig", "expert_type", self.expert_type, EXPERT_TYPES)
        check_choice_field("MoEConfig", "activation", self.activation, ACTIVATIONS)
        if self.group_score is not None:
            check_choice_field("MoEConfig", "group_score", self.group_score, GROUP_SCORES)
        for name, v in fields.items():
            object.__setattr__(self, name, v)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.num_experts % self.n_group != 0:
            raise ValueError(f"MoEConfig.n_group ({self.n_group}) must divide num_experts ({self.num_experts})")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) exceeds the experts in the kept groups "
                f"({self.topk_group} groups x {self.num_experts // self.n_group} experts)"
            )
        if self.correction_bias and self.score_func != "sigmoid":
            raise ValueError("MoEConfig.correction_bias needs score_func='sigmoid' (DeepSeek-V3 routing)")

    @property
    def group_rule(self) -> str:
        """How a group is scored: group_score, or (None) "top2_sum" with a correction bias, else "max"."""
        if self.group_score is not None:
            return self.group_score
        return "top2_sum" if self.correction_bias else "max"

    def with_(self, **changes: object) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


PRESETS: dict[str, MoEConfig] = {
    # small enough for float64 reference loops in tests
    "tiny": MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, score_func="sigmoid",
                      n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                      correction_bias=True, n_shared_experts=1),
    # the seed benchmark: 256 linear experts of Linear(2048, 2048), top-8, softmax routing
    "seed": MoEConfig(hidden=2048, intermediate=2048, num_experts=256, top_k=8, expert_type="linear"),
    # DeepSeek-V3's MoE layer (its config.json: 256 routed experts, top-8 in 8 groups of which 4)
    "deepseek-v3": MoEConfig(hidden=7168, intermediate=2048, num_experts=256, top_k=8, score_func="sigmoid",
                             n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
                             correction_bias=True, n_shared_experts=1),
}


def preset(name: str) -> MoEConfig:
    """The named preset config: 'tiny', 'seed' or 'deepseek-v3'."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
