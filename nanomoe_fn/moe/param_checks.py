"""`check_params`: a MoE layer's parameter records (moe/params.py) against its MoEConfig, host-only.

Dimension legend: E experts (logical, or this rank's slots), H hidden, I expert intermediate, S shared
experts; FP8 experts: b0 x b1 the scale block, Ib = ceil(I / b0), Hb = ceil(H / b0).
"""

from __future__ import annotations

import torch

from nanomoe_fn.checks import FLOAT_DTYPES, check_tensor
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.params import (
    GateParams,
    LinearExperts,
    MoEParams,
    SharedMLP,
    SwiGLUExperts,
    SwiGLUExpertsFP8,
    expert_tensors,
)

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # rows FP8 experts take (they quantise them)


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

    kind = (SwiGLUExperts, SwiGLUExpertsFP8) if cfg.expert_type == "swiglu" else (LinearExperts,)
    if not isinstance(params.experts, kind):
        raise TypeError(f"params.experts must be {' or '.join(k.__name__ for k in kind)} for cfg.expert_type="
                        f"{cfg.expert_type!r}, got {type(params.experts).__name__}")
    n = E if num_experts is None else num_experts
    first = expert_tensors(params.experts)[0]
    if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] != n:
        where = (f"cfg.num_experts={E}" if num_experts is None
                 else f"this rank's {n} slots of the placement (use shard_moe_params)")
        raise ValueError(f"params.experts must hold {where}, got {first.shape[0]}")
    if isinstance(params.experts, SwiGLUExpertsFP8):
        _check_fp8(params.experts, n, H, I_, dev)
        dtype = None  # the layer's dtype is then the shared experts' and x's (bf16/fp16/fp32)
    elif isinstance(params.experts, SwiGLUExperts):
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
        dtype = _check_weight("params.shared.w13", params.shared.w13,
                              (("2*n_shared_experts*intermediate", 2 * S * I_), ("hidden", H)), dev, dtype).dtype
        _check_weight("params.shared.w2", params.shared.w2,
                      (("hidden", H), ("n_shared_experts*intermediate", S * I_)), dev, dtype)

    if x is not None:
        check_tensor("x", x, dim=2)
        if x.shape[1] != H:
            raise ValueError(f"x must be [T, hidden={H}], got shape {tuple(x.shape)}")
        if dtype is None and x.dtype not in ACT_DTYPES:
            raise TypeError(f"x must be one of {[str(d) for d in ACT_DTYPES]} for FP8 experts (they quantise it), "
                            f"got {x.dtype}")
        if dtype is not None and x.dtype != dtype:
            raise TypeError(f"x must have the experts' dtype {dtype} (cast x, or the weights with cast_params), "
                            f"got {x.dtype}")
        if x.device != dev:
            raise ValueError(f"x must be on {dev} (where the parameters are), got {x.device}")


def _check_fp8(experts: SwiGLUExpertsFP8, n: int, H: int, I_: int, dev: torch.device) -> None:
    """FP8 SwiGLU experts: float8_e4m3fn w13 [n, 2I, H] and w2 [n, H, I], float32 block scales (shapes from
    experts.block), all on dev."""
    b0, b1 = experts.block
    Ib, Hb = -(-I_ // b0), -(-H // b0)
    w13_shape, w2_shape = (n, 2 * I_, H), (n, H, I_)
    if experts.tiled:  # the block layout (moe/params.py): 128 x 128 blocks, H and I multiples of 128
        w13_shape, w2_shape = (n, 2 * Ib, Hb, b0, b1), (n, Hb, Ib, b0, b1)
    for name, t, dt, shape in (("w13", experts.w13, torch.float8_e4m3fn, w13_shape),
                               ("w2", experts.w2, torch.float8_e4m3fn, w2_shape),
                               ("w13_scale", experts.w13_scale, torch.float32, (n, 2 * Ib, -(-H // b1))),
                               ("w2_scale", experts.w2_scale, torch.float32, (n, Hb, -(-I_ // b1)))):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != shape:
            raise ValueError(f"params.experts.{name} must be {dt} {list(shape)} (FP8 experts, block {b0} x {b1}), "
                             f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != dev:
            raise ValueError(f"params.experts.{name} must be on {dev} (where params.gate.weight is), got {t.device}")


def check_dense(name: str, mlp: object, x: torch.Tensor) -> None:
    """A dense SwiGLU FFN (SharedMLP: w13 [2I, H], w2 [H, I]) that takes x [T, H]: the weights' shapes, and
    x's dtype and device against theirs; TypeError/ValueError naming `name`'s field or x. Host-only."""
    if not isinstance(mlp, SharedMLP):
        raise TypeError(f"{name} must be a SharedMLP, got {type(mlp).__name__}")
    check_tensor("x", x, dim=2)
    H, w13 = x.shape[1], mlp.w13
    rows = w13.shape[0] if isinstance(w13, torch.Tensor) and w13.dim() == 2 else 0
    if isinstance(w13, torch.Tensor) and (w13.dim() != 2 or rows % 2 or w13.shape[1] != H):
        raise ValueError(f"{name}.w13 must be [2*intermediate, hidden={H}] (gate rows, then up rows), got "
                         f"{tuple(w13.shape)}")
    w13 = _check_weight(f"{name}.w13", w13, (("2*intermediate", rows), ("hidden", H)), None)
    _check_weight(f"{name}.w2", mlp.w2, (("hidden", H), ("intermediate", rows // 2)), w13.device, w13.dtype)
    if x.dtype != w13.dtype:
        raise TypeError(f"x must have the dtype of {name}.w13 ({w13.dtype}; cast x or the weights), got {x.dtype}")
    if x.device != w13.device:
        raise ValueError(f"x must be on {w13.device} (where {name} is), got {x.device}")
