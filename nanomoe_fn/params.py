"""Parameter pytrees for one MoE layer and the one place that creates them from a config.

Dimension legend: E experts (logical, or local physical slots after sharding), H hidden,
I expert intermediate, S shared experts.

Each parameter record is a frozen dataclass of tensors registered with torch.utils._pytree, so
`tree_map` casts, moves and compares whole layers: `tree_map(lambda t: t.to(dev), params)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from nanomoe_fn.config import MoEConfig


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

for _cls in (GateParams, SwiGLUExperts, LinearExperts, SharedMLP, MoEParams):
    pytree.register_dataclass(_cls)


def expert_tensors(experts: Experts) -> tuple[torch.Tensor, ...]:
    """The experts' weight tensors in reference/ order: (w13, w2) for SwiGLU, (w,) for linear."""
    return (experts.w13, experts.w2) if isinstance(experts, SwiGLUExperts) else (experts.w,)


def _normal(shape: tuple[int, ...], std: float, dtype: torch.dtype, device: torch.device | str,
            gen: torch.Generator | None) -> torch.Tensor:
    # draw in float32 on the CPU so every dtype/device sees the same numbers for one seed
    return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)


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
