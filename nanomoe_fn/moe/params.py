"""Parameter pytrees for one MoE layer: the records, and the one place that creates, checks, shards
and casts them.

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

from nanomoe_fn.checks import FLOAT_DTYPES, check_tensor
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
    2I in b0-row blocks reads. block = (b0, b1) is static (pytree context: tree_map sees the tensors only)."""

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
    def halves_aligned(self) -> bool:
        """I % b0 == 0: the gate/up boundary falls on a scale block boundary."""
        return int(self.w2.shape[-1]) % self.block[0] == 0


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
    return MoEParams(
        gate=params.gate,
        experts=pytree.tree_map(lambda t: t.to(dtype), params.experts),
        shared=None if params.shared is None else pytree.tree_map(lambda t: t.to(dtype), params.shared),
    )


def _check_weight(name: str, t: object, dims: tuple[tuple[str, int], ...], device: torch.device | None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """One weight: a float tensor of shape dims ((label, size) per dim) on `device`, of `dtype` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype that can hold weights (one of "
                        f"{[str(d) for d in FLOAT_DTYPES]}), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the experts' dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(size for _, size in dims):
        want = ", ".join(f"{label}={size}" for label, size in dims)
        raise ValueError(f"{name} must be [{want}], got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (where params.gate.weight is), got {t.device}")
    return t


def check_params(params: MoEParams, cfg: MoEConfig, x: torch.Tensor | None = None,
                 num_experts: int | None = None) -> None:
    """Cross-check a layer's parameters (and optionally its input x [T, H]) against their config.

    Host-only: reads types, shapes, dtypes and devices, never tensor values (no device sync). Raises
    TypeError/ValueError naming the field: expert type vs cfg.expert_type, every weight's shape vs
    hidden/intermediate/num_experts, a shared expert vs cfg.n_shared_experts, the gate bias vs
    cfg.correction_bias, non-float weights, weights on different devices, x's dtype/device vs the experts'.
    num_experts: how many experts params.experts holds (this rank's slots when sharded);
    cfg.num_experts by default (whole, unsharded parameters: a model or a checkpoint loader).
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    if not isinstance(params, MoEParams):
        raise TypeError(f"params must be a MoEParams, got {type(params).__name__}")
    H, I_, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    if not isinstance(params.gate, GateParams):
        raise TypeError(f"params.gate must be a GateParams, got {type(params.gate).__name__}")
    dev = _check_weight("params.gate.weight", params.gate.weight, (("num_experts", E), ("hidden", H)), None).device
    bias = params.gate.bias
    if cfg.correction_bias != (bias is not None):
        raise ValueError(f"params.gate.bias must be {f'a [{E}] tensor' if cfg.correction_bias else 'None'} for "
                         f"cfg.correction_bias={cfg.correction_bias}, got {'None' if bias is None else 'a tensor'}")
    if bias is not None:
        _check_weight("params.gate.bias", bias, (("num_experts", E),), dev)

    kind = SwiGLUExperts if cfg.expert_type == "swiglu" else LinearExperts
    if not isinstance(params.experts, kind):
        raise TypeError(f"params.experts must be {kind.__name__} for cfg.expert_type={cfg.expert_type!r}, "
                        f"got {type(params.experts).__name__}")
    n = E if num_experts is None else num_experts
    first = expert_tensors(params.experts)[0]
    if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] != n:
        where = (f"cfg.num_experts={E}" if num_experts is None
                 else f"this rank's {n} slots of the placement (use shard_moe_params)")
        raise ValueError(f"params.experts must hold {where}, got {first.shape[0]}")
    if isinstance(params.experts, SwiGLUExperts):
        dtype = _check_weight("params.experts.w13", params.experts.w13,
                              (("experts", n), ("2*intermediate", 2 * I_), ("hidden", H)), dev).dtype
        _check_weight("params.experts.w2", params.experts.w2, (("experts", n), ("hidden", H), ("intermediate", I_)),
                      dev, dtype)
    else:
        dtype = _check_weight("params.experts.w", params.experts.w, (("experts", n), ("hidden", H), ("hidden", H)),
                              dev).dtype

    S = cfg.n_shared_experts
    if (params.shared is None) != (S == 0):
        raise ValueError(f"params.shared must be {'None' if S == 0 else 'a SharedMLP'} for "
                         f"cfg.n_shared_experts={S}, got {type(params.shared).__name__}")
    if params.shared is not None:
        if not isinstance(params.shared, SharedMLP):
            raise TypeError(f"params.shared must be a SharedMLP, got {type(params.shared).__name__}")
        _check_weight("params.shared.w13", params.shared.w13,
                      (("2*n_shared_experts*intermediate", 2 * S * I_), ("hidden", H)), dev, dtype)
        _check_weight("params.shared.w2", params.shared.w2,
                      (("hidden", H), ("n_shared_experts*intermediate", S * I_)), dev, dtype)

    if x is not None:
        check_tensor("x", x, dim=2)
        if x.shape[1] != H:
            raise ValueError(f"x must be [T, hidden={H}], got shape {tuple(x.shape)}")
        if x.dtype != dtype:
            raise TypeError(f"x must have the experts' dtype {dtype} (cast x, or the weights with cast_params), "
                            f"got {x.dtype}")
        if x.device != dev:
            raise ValueError(f"x must be on {dev} (where the parameters are), got {x.device}")
