"""FP8 expert records (moe/params.py: SwiGLUExpertsFP8, LinearExpertsFP8) from and back to the bf16 ones,
and their host-only check. The scheme is nanomoe_kernels.fp8_quant's (DeepSeek-V3: one float32 scale per
128 x 128 block, real weight = fp8 * scale, partial last blocks).

Dimension legend: E experts, H hidden, I expert intermediate, b0 x b1 the scale block, Ib = ceil(I / b0),
Hb = ceil(H / b0) row blocks, ceil(K / b1) column blocks of a weight with K columns.

SwiGLU's w13 [E, 2I, H] is quantised as its two halves (gate rows [0, I), up rows [I, 2I)), each with its own
row blocks, so no scale block mixes gate and up rows whatever I is; w13_scale stacks the gate half's Ib
row blocks over the up half's. With I % b0 == 0 that is the same as quantising w13 whole.
"""

from __future__ import annotations

import torch
from nanomoe_kernels.fp8_quant import DEFAULT_BLOCK, FP8_DTYPE, block_scale_shape, dequant_fp8_blocks, quant_fp8_blocks

from nanomoe_fn.moe.params import Experts, FP8Experts, LinearExperts, LinearExpertsFP8, SwiGLUExperts, SwiGLUExpertsFP8


def _block(block: object) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block must be two positive ints (b0, b1), got {block!r}")
    return int(block[0]), int(block[1])


def _cat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[E, r1, ..] and [E, r2, ..] fp8 -> [E, r1 + r2, ..] (through uint8: cat everywhere)."""
    return torch.cat((a.view(torch.uint8), b.view(torch.uint8)), dim=1).view(a.dtype)


def quantize_experts(experts: Experts, block: tuple[int, int] = DEFAULT_BLOCK) -> FP8Experts:
    """SwiGLUExperts / LinearExperts (any float dtype) -> SwiGLUExpertsFP8 / LinearExpertsFP8 on the same
    device, one float32 scale per b0 x b1 block (gate and up halves blocked apart: module docstring).
    Offline: it holds a float32 copy of the weights."""
    block = _block(block)
    if isinstance(experts, SwiGLUExperts):
        I_ = experts.w2.shape[-1]
        if experts.w13.dim() != 3 or experts.w13.shape[1] != 2 * I_:
            raise ValueError(f"experts.w13 must be [E, 2I={2 * I_}, H] (I from w2 [E, H, I]), got "
                             f"{tuple(experts.w13.shape)}")
        qg, sg = quant_fp8_blocks(experts.w13[:, :I_], block)
        qu, su = quant_fp8_blocks(experts.w13[:, I_:], block)
        q2, s2 = quant_fp8_blocks(experts.w2, block)
        return SwiGLUExpertsFP8(_cat_rows(qg, qu), torch.cat((sg, su), dim=1), q2, s2, block)
    if isinstance(experts, LinearExperts):
        return LinearExpertsFP8(*quant_fp8_blocks(experts.w, block), block)
    raise TypeError(f"experts must be SwiGLUExperts or LinearExperts, got {type(experts).__name__}")


def dequantize_experts(experts: FP8Experts, dtype: torch.dtype = torch.bfloat16,
                       out: Experts | None = None) -> Experts:
    """SwiGLUExpertsFP8 / LinearExpertsFP8 -> SwiGLUExperts / LinearExperts in `dtype` (fp8 * scale computed in
    float32, then rounded once), for the backends that run bf16/fp16/fp32 weights. Experts go through in
    chunks (dequant_fp8_blocks). out: a record of that kind and the same shapes to write into (its dtype
    wins), for example another implementation's weights to round to the FP8 values."""
    check_fp8_experts(experts)
    b = experts.block
    swiglu = isinstance(experts, SwiGLUExpertsFP8)
    kind = SwiGLUExperts if swiglu else LinearExperts
    if out is None:
        out = kind(*(torch.empty(w.shape, dtype=dtype, device=w.device)
                     for w in ((experts.w13, experts.w2) if swiglu else (experts.w,))))
    elif type(out) is not kind:
        raise TypeError(f"out must be a {kind.__name__} (the record {type(experts).__name__} dequantises to), "
                        f"got {type(out).__name__}")
    if swiglu:  # gate and up halves are blocked apart (module docstring)
        I_ = experts.w2.shape[-1]
        Ib = -(-I_ // b[0])
        dequant_fp8_blocks(experts.w13[:, :I_], experts.w13_scale[:, :Ib], b, out=out.w13[:, :I_])
        dequant_fp8_blocks(experts.w13[:, I_:], experts.w13_scale[:, Ib:], b, out=out.w13[:, I_:])
        dequant_fp8_blocks(experts.w2, experts.w2_scale, b, out=out.w2)
    else:
        dequant_fp8_blocks(experts.w, experts.w_scale, b, out=out.w)
    return out


def _check(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (where the weights are), got {t.device}")


def check_fp8_experts(experts: object, name: str = "experts") -> None:
    """Host-only check of an FP8 record (types, dtypes, shapes, devices; never values): TypeError/ValueError
    naming the field. Scale shapes follow the weights' and `block` (moe/params.py)."""
    if not isinstance(experts, (SwiGLUExpertsFP8, LinearExpertsFP8)):
        raise TypeError(f"{name} must be SwiGLUExpertsFP8 or LinearExpertsFP8, got {type(experts).__name__}")
    b = _block(experts.block)
    if isinstance(experts, SwiGLUExpertsFP8):
        w2 = experts.w2
        if not isinstance(w2, torch.Tensor) or w2.dim() != 3:
            raise ValueError(f"{name}.w2 must be a tensor [E, H, I], got "
                             f"{tuple(w2.shape) if isinstance(w2, torch.Tensor) else type(w2).__name__}")
        E, H, I_ = w2.shape
        _check(f"{name}.w2", w2, FP8_DTYPE, (E, H, I_), None)
        _check(f"{name}.w13", experts.w13, FP8_DTYPE, (E, 2 * I_, H), w2.device)
        Ib, Hb = block_scale_shape((I_, H), b)
        _check(f"{name}.w13_scale", experts.w13_scale, torch.float32, (E, 2 * Ib, Hb), w2.device)
        _check(f"{name}.w2_scale", experts.w2_scale, torch.float32, (E, *block_scale_shape((H, I_), b)), w2.device)
    else:
        w = experts.w
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name}.w must be a tensor [E, H, H], got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        E, H = w.shape[:2]
        _check(f"{name}.w", w, FP8_DTYPE, (E, H, H), None)
        _check(f"{name}.w_scale", experts.w_scale, torch.float32, (E, *block_scale_shape((H, H), b)), w.device)
