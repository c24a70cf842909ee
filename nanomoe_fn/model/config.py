"""A whole DeepSeek-architecture model's static config: the attention and MoE configs plus the model's own
fields, with named presets.

Dimension legend: V vocabulary, H hidden, Ld layers (the first `first_k_dense` dense, the rest MoE),
Id the dense layers' FFN intermediate size.

One ModelConfig covers DeepSeek-V3 (sigmoid routing with a correction bias, q low-rank path) and
DeepSeek-V2 / V2-Lite (softmax routing, greedy or group-limited top-k, V2-Lite without a q low-rank path).
hf_config.py maps a checkpoint's config.json onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.checks import check_bool_field, check_int_field
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.config import preset as moe_preset


@dataclass(frozen=True)
class ModelConfig:
    """The model: vocab_size V, num_layers Ld (the first first_k_dense of them dense SwiGLU FFNs of width
    dense_intermediate, the rest MoE layers of `moe`), attention `mla` (whose rms_norm_eps is also the
    decoder layers' and the final norm's epsilon), tie_word_embeddings (the LM head is the embedding),
    bos/eos token ids (eos: every id that ends a sequence), max_position_embeddings (the longest context)."""

    vocab_size: int
    num_layers: int
    first_k_dense: int
    dense_intermediate: int
    mla: MLAConfig
    moe: MoEConfig
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        own = "ModelConfig"
        for name in ("vocab_size", "num_layers", "dense_intermediate", "max_position_embeddings"):
            object.__setattr__(self, name, check_int_field(own, name, getattr(self, name)))
        object.__setattr__(self, "first_k_dense", check_int_field(own, "first_k_dense", self.first_k_dense, 0))
        check_bool_field(own, "tie_word_embeddings", self.tie_word_embeddings)
        if not isinstance(self.mla, MLAConfig):
            raise TypeError(f"ModelConfig.mla must be an MLAConfig, got {type(self.mla).__name__}")
        if not isinstance(self.moe, MoEConfig):
            raise TypeError(f"ModelConfig.moe must be a MoEConfig, got {type(self.moe).__name__}")
        if self.first_k_dense > self.num_layers:
            raise ValueError(f"ModelConfig.first_k_dense ({self.first_k_dense}) must be <= num_layers "
                             f"({self.num_layers})")
        if self.moe.hidden != self.mla.hidden_size:
            raise ValueError(f"ModelConfig: moe.hidden ({self.moe.hidden}) must equal mla.hidden_size "
                             f"({self.mla.hidden_size})")
        if self.moe.expert_type != "swiglu":
            raise ValueError(f"ModelConfig.moe.expert_type must be 'swiglu', got {self.moe.expert_type!r}")
        ids = tuple(self.eos_token_ids)
        for t in ids + (() if self.bos_token_id is None else (self.bos_token_id,)):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"ModelConfig token ids must be ints in [0, vocab_size={self.vocab_size}), got {t!r}")
        object.__setattr__(self, "eos_token_ids", ids)

    @property
    def hidden(self) -> int:
        """H."""
        return self.mla.hidden_size

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) is an MoE layer; the first first_k_dense are dense."""
        return i >= self.first_k_dense

    def with_(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


PRESETS = MappingProxyType({
    # a random tiny model for CPU runs and tests: 1 dense + 2 MoE layers, DeepSeek-V3 routing
    "tiny": ModelConfig(
        vocab_size=256, num_layers=3, first_k_dense=1, dense_intermediate=96,
        mla=MLAConfig.preset("tiny"),
        moe=MoEConfig(hidden=64, intermediate=32, num_experts=8, top_k=2, score_func="sigmoid", n_group=2,
                      topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True,
                      n_shared_experts=1, group_score="top2_sum"),
        max_position_embeddings=512, bos_token_id=0, eos_token_ids=(1,)),
    # the tiny model with hidden and expert dims of 128, the FP8 scale block: the FP8 expert backends run it
    "tiny-fp8": ModelConfig(
        vocab_size=256, num_layers=3, first_k_dense=1, dense_intermediate=96,
        mla=MLAConfig.preset("tiny", hidden_size=128),
        moe=MoEConfig(hidden=128, intermediate=128, num_experts=8, top_k=2, score_func="sigmoid", n_group=2,
                      topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True,
                      n_shared_experts=1, group_score="top2_sum"),
        max_position_embeddings=512, bos_token_id=0, eos_token_ids=(1,)),
    # DeepSeek-V3's dims at reduced depth (bench/bench_model.py): 1 dense + 3 MoE layers of 256 experts
    "deepseek-v3-4l": ModelConfig(
        vocab_size=129280, num_layers=4, first_k_dense=1, dense_intermediate=18432,
        mla=MLAConfig.preset("deepseek-v3"), moe=moe_preset("deepseek-v3").with_(group_score="top2_sum"),
        max_position_embeddings=163840, bos_token_id=0, eos_token_ids=(1,)),
})


def model_preset(name: str, **overrides: object) -> ModelConfig:
    """One of PRESETS by name ('tiny', 'tiny-fp8', 'deepseek-v3-4l'), with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **overrides)
