"""Parameter pytrees for one MoE layer: the records, and the one place that creates, shards and casts
them (moe/param_checks.py checks them against a config).

Dimension legend: E experts (logical, or local physical slots after sharding), H hidden,
I expert intermediate, S shared experts, W ranks; FP8 records: b0 x b1 the scale block (128 x 128),
Ib = ceil(I / b0), Hb = ceil(H / b0) row blocks.

Each parameter record is a frozen dataclass of tensors registered as a pytree with
nanomoe_fn.tree.register_dataclass (the one mechanism for every record), so `tree_map` casts, moves
and compares whole layers: `tree_map(lambda t: t.to(dev), params)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.tree import register_dataclass


@dataclass(frozen=True, eq=False)
class GateParams:
    """Router: weight [E, H]; bias [E] is DeepSeek-V3's e_score_correction_bias (choice only) or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class SwiGLUExperts:
    """E SwiGLU experts: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]."""

    w13: torch.Tensor
    w2: torch.Tensor

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.w13.shape[0])


@dataclass(frozen=True, eq=False)
class LinearExperts:
    """E linear experts (the seed benchmark's workload): w [E, H, H], y = x @ w[e].T."""

    w: torch.Tensor

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.w.shape[0])


@dataclass(frozen=True, eq=False)
class SwiGLUExpertsFP8:
    """E SwiGLU experts in DeepSeek-V3's block-scaled FP8 (real weight = fp8 * its block's scale; made by
    nanomoe_fn.moe.fp8_params.quantize_experts): w13 [E, 2I, H] float8_e4m3fn (gate rows, then up rows),
    w13_scale [E, 2 * Ib, Hb] float32 (the gate half's Ib row blocks, then the up half's: no block mixes
    gate and up rows, as in a checkpoint's separate gate_proj/up_proj), w2 [E, H, I] fp8,
    w2_scale [E, Hb, ceil(I / b1)] float32. With I % b0 == 0 (`halves_aligned`; DeepSeek-V3: I = 2048)
    w13_scale is exactly the blocks of w13 as one [2I, H] weight, ceil(2I / b0) rows: what a kernel tiling
    2I in b0-row blocks reads. block = (b0, b1) is static (pytree context: tree_map sees the tensors only).
    Block layout (moe/fp8_params.tile_experts; 128 x 128 blocks, H and I multiples of 128): w13
    [E, 2I/128, H/128, 128, 128] and w2 [E, H/128, I/128, 128, 128], each block's 16 KB contiguous, the
    scales unchanged; faster weight streaming at decode, run by the triton_fp8 backends only."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    block: tuple[int, int] = (128, 128)

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.w13.shape[0])

    @property
    def tiled(self) -> bool:
        """The weights are in the block layout (class docstring)."""
        return self.w2.dim() == 5

    @property
    def hidden(self) -> int:
        """H (in either layout)."""
        return int(self.w2.shape[1]) * int(self.w2.shape[3]) if self.tiled else int(self.w2.shape[1])

    @property
    def intermediate(self) -> int:
        """I (in either layout)."""
        return int(self.w2.shape[2]) * int(self.w2.shape[4]) if self.tiled else int(self.w2.shape[-1])

    @property
    def halves_aligned(self) -> bool:
        """I % b0 == 0: the gate/up boundary falls on a scale block boundary."""
        return self.intermediate % self.block[0] == 0


@dataclass(frozen=True, eq=False)
class LinearExpertsFP8:
    """E linear experts in block-scaled FP8: w [E, H, H] float8_e4m3fn, w_scale [E, Hb, ceil(H / b1)] float32."""

    w: torch.Tensor
    w_scale: torch.Tensor
    block: tuple[int, int] = (128, 128)

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.w.shape[0])


@dataclass(frozen=True, eq=False)
class SharedMLP:
    """The shared experts fused into one dense SwiGLU: w13 [2*S*I, H], w2 [H, S*I]."""

    w13: torch.Tensor
    w2: torch.Tensor


@dataclass(frozen=True, eq=False)
class MoEParams:
    """One MoE layer: router, routed experts, optional shared experts."""

    gate: GateParams
    experts: SwiGLUExperts | LinearExperts
    shared: SharedMLP | None = None


Experts = SwiGLUExperts | LinearExperts
FP8Experts = SwiGLUExpertsFP8 | LinearExpertsFP8

register_dataclass(GateParams, optional=("bias",))
register_dataclass(SwiGLUExperts)
register_dataclass(LinearExperts)
register_dataclass(SwiGLUExpertsFP8, static=("block",))
register_dataclass(LinearExpertsFP8, static=("block",))
register_dataclass(SharedMLP)
register_dataclass(MoEParams, optional=("shared",))


def expert_tensors(experts: Experts | FP8Experts) -> tuple[torch.Tensor, ...]:
    """The experts' weight tensors in reference/ order: (w13, w2) for SwiGLU, (w,) for linear (the float8
    weights of an FP8 record; their scales: expert_scales)."""
    return (experts.w13, experts.w2) if isinstance(experts, (SwiGLUExperts, SwiGLUExpertsFP8)) else (experts.w,)


def expert_scales(experts: Experts | FP8Experts) -> tuple[torch.Tensor, ...]:
    """An FP8 record's block scales in expert_tensors order ((w13_scale, w2_scale) or (w_scale,)); () otherwise."""
    if isinstance(experts, SwiGLUExpertsFP8):
        return experts.w13_scale, experts.w2_scale
    return (experts.w_scale,) if isinstance(experts, LinearExpertsFP8) else ()


def refuse_fp8(experts: object, who: str) -> None:
    """TypeError naming the record when `experts` is FP8: for code that runs bf16/fp16/fp32 weights only."""
    if isinstance(experts, (SwiGLUExpertsFP8, LinearExpertsFP8)):
        raise TypeError(f"{who} runs bf16/fp16/fp32 experts, got {type(experts).__name__} (block-scaled FP8 "
                        f"weights): use an FP8 expert backend, or dequantize first with "
                        f"nanomoe_fn.moe.fp8_params.dequantize_experts(experts, dtype)")


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what the expert backends run


def check_weight_dtype(who: str, dtype: object) -> None:
    """TypeError naming `who` unless dtype is one of WEIGHT_DTYPES (FP8 records come from quantize_experts)."""
    if dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{who} must be one of {[str(d) for d in WEIGHT_DTYPES]}, got {dtype!r}")


def _normal(shape: tuple[int, ...], std: float, dtype: torch.dtype, device: torch.device | str,
            gen: torch.Generator | None) -> torch.Tensor:
    # draw in float32 where the generator lives: a CPU generator gives every dtype/device the same numbers for
    # one seed; a device generator draws in place (DeepSeek-V3 sizes in milliseconds, not minutes)
    src = gen.device if gen is not None else torch.device("cpu")
    return torch.randn(shape, generator=gen, device=src).mul_(std).to(device=device, dtype=dtype)


def init_moe_params(
    cfg: MoEConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    gate_std: float | None = None,
) -> MoEParams:
    """Random parameters with unit-scale activations: N(0, 1/fan_in) weights.

    The router weight is kept in float32 (logits are computed in float32 for every dtype).
    gate_std overrides the router's scale (larger = sharper, better separated routing).
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    check_weight_dtype("init_moe_params dtype", dtype)
    H, I_, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    g = _normal((E, H), gate_std if gate_std is not None else H ** -0.5, torch.float32, device, generator)
    bias = _normal((E,), 0.1, torch.float32, device, generator) if cfg.correction_bias else None
    if cfg.expert_type == "swiglu":
        experts: Experts = SwiGLUExperts(
            w13=_normal((E, 2 * I_, H), H ** -0.5, dtype, device, generator),
            w2=_normal((E, H, I_), I_ ** -0.5, dtype, device, generator),
        )
    else:
        experts = LinearExperts(w=_normal((E, H, H), H ** -0.5, dtype, device, generator))
    shared = None
    if cfg.n_shared_experts:
        S = cfg.n_shared_experts * I_
        shared = SharedMLP(w13=_normal((2 * S, H), H ** -0.5, dtype, device, generator),
                           w2=_normal((H, S), S ** -0.5, dtype, device, generator))
    return MoEParams(gate=GateParams(g, bias), experts=experts, shared=shared)


def select_experts(experts: Experts, slots: torch.Tensor) -> Experts:
    """The experts at logical ids `slots` [E_sel], in that order (copies; replicas are exact copies)."""
    slots = slots.to(expert_tensors(experts)[0].device)
    return pytree.tree_map(lambda t: t.index_select(0, slots).contiguous(), experts)


def shard_moe_params(params: MoEParams, placement: Placement, rank: int) -> MoEParams:
    """This rank's view: its physical slots' experts (copied from the logical ones); router and
    shared experts replicated."""
    n_logical = params.experts.num_experts
    if placement.num_logical != n_logical:
        raise ValueError(f"placement has {placement.num_logical} logical experts, params have {n_logical}")
    local = select_experts(params.experts, placement.local_slots(rank))
    return MoEParams(gate=params.gate, experts=local, shared=params.shared)


def cast_params(params: MoEParams, dtype: torch.dtype) -> MoEParams:
    """Cast expert and shared weights to `dtype`; the router stays float32. FP8 experts are refused (a cast
    would drop their scales: dequantize_experts)."""
    refuse_fp8(params.experts, "cast_params")
    check_weight_dtype("cast_params dtype", dtype)
    return MoEParams(
        gate=params.gate,
        experts=pytree.tree_map(lambda t: t.to(dtype), params.experts),
        shared=None if params.shared is None else pytree.tree_map(lambda t: t.to(dtype), params.shared),
    )
