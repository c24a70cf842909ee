"""FP8 expert records (moe/params.py: SwiGLUExpertsFP8, LinearExpertsFP8) from and back to the bf16 ones,
and their host-only check. The scheme is nanomoe_kernels.fp8_quant's (DeepSeek-V3: one float32 scale per
128 x 128 block, real weight = fp8 * scale, partial last blocks).

Dimension legend: E experts, H hidden, I expert intermediate, b0 x b1 the scale block, Ib = ceil(I / b0),
Hb = ceil(H / b0) row blocks, ceil(K / b1) column blocks of a weight with K columns.

SwiGLU's w13 [E, 2I, H] is quantised as its two halves (gate rows [0, I), up rows [I, 2I)), each with its own
row blocks, so no scale block mixes gate and up rows whatever I is; w13_scale stacks the gate half's Ib
row blocks over the up half's. With I % b0 == 0 that is the same as quantising w13 whole.
`tile_experts` / `untile_experts` move a SwiGLU record's weights to and from the block layout (moe/params.py;
kernels/fused_moe_fp8_kernel.py's tile_weights), where each 128 x 128 block's 16 KB is contiguous.
"""

from __future__ import annotations

import torch
from nanomoe_kernels.fp8_quant import DEFAULT_BLOCK, FP8_DTYPE, block_scale_shape, dequant_fp8_blocks, quant_fp8_blocks
from nanomoe_kernels.fused_moe_fp8_kernel import tile_weights, untile_weights

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


def tile_experts(experts: SwiGLUExpertsFP8) -> SwiGLUExpertsFP8:
    """A SwiGLU FP8 record (128 x 128 blocks, H and I multiples of 128) with its weights in the block layout
    (a copy; the scales are shared). A record already in it is returned as is."""
    check_fp8_experts(experts)
    if not isinstance(experts, SwiGLUExpertsFP8) or tuple(experts.block) != DEFAULT_BLOCK:
        raise ValueError(f"tile_experts needs SwiGLUExpertsFP8 with {DEFAULT_BLOCK} blocks, got "
                         f"{type(experts).__name__} block={getattr(experts, 'block', None)}")
    if experts.tiled:
        return experts
    H, I_ = experts.w2.shape[1:]
    if H % DEFAULT_BLOCK[0] or I_ % DEFAULT_BLOCK[0]:
        raise ValueError(f"the block layout needs H ({H}) and I ({I_}) to be multiples of {DEFAULT_BLOCK[0]}")
    return SwiGLUExpertsFP8(tile_weights(experts.w13), experts.w13_scale, tile_weights(experts.w2),
                            experts.w2_scale, experts.block)


def untile_experts(experts: FP8Experts) -> FP8Experts:
    """tile_experts' inverse: the weights back to rows [E, 2I, H] and [E, H, I] (a copy, or the record itself
    when it is not tiled)."""
    if not isinstance(experts, SwiGLUExpertsFP8) or not experts.tiled:
        return experts
    return SwiGLUExpertsFP8(untile_weights(experts.w13), experts.w13_scale, untile_weights(experts.w2),
                            experts.w2_scale, experts.block)


def dequantize_experts(experts: FP8Experts, dtype: torch.dtype = torch.bfloat16,
                       out: Experts | None = None) -> Experts:
    """SwiGLUExpertsFP8 / LinearExpertsFP8 -> SwiGLUExperts / LinearExperts in `dtype` (fp8 * scale computed in
    float32, then rounded once), for the backends that run bf16/fp16/fp32 weights. Experts go through in
    chunks (dequant_fp8_blocks). out: a record of that kind and the same shapes to write into (its dtype
    wins), for example another implementation's weights to round to the FP8 values."""
    check_fp8_experts(experts)
    experts = untile_experts(experts)
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
        if not isinstance(w2, torch.Tensor) or w2.dim() not in (3, 5):
            raise ValueError(f"{name}.w2 must be a tensor [E, H, I] (or its block layout), got "
                             f"{tuple(w2.shape) if isinstance(w2, torch.Tensor) else type(w2).__name__}")
        if w2.dim() == 5:  # the block layout: the same checks on its shapes
            _check_tiled(name, experts, b)
            return
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


def _check_tiled(name: str, experts: SwiGLUExpertsFP8, b: tuple[int, int]) -> None:
    """check_fp8_experts for the block layout: 128 x 128 blocks, w2 [E, H/128, I/128, 128, 128], w13
    [E, 2I/128, H/128, 128, 128], the scales as for the rows."""
    g = DEFAULT_BLOCK[0]
    w2 = experts.w2
    if b != DEFAULT_BLOCK or tuple(w2.shape[3:]) != (g, g):
        raise ValueError(f"{name}: the block layout needs {DEFAULT_BLOCK} blocks and w2 [E, H/{g}, I/{g}, {g}, {g}], "
                         f"got block={b} w2 {tuple(w2.shape)}")
    E, Hb, Ib = w2.shape[:3]
    _check(f"{name}.w2", w2, FP8_DTYPE, (E, Hb, Ib, g, g), None)
    _check(f"{name}.w13", experts.w13, FP8_DTYPE, (E, 2 * Ib, Hb, g, g), w2.device)
    _check(f"{name}.w13_scale", experts.w13_scale, torch.float32, (E, 2 * Ib, Hb), w2.device)
    _check(f"{name}.w2_scale", experts.w2_scale, torch.float32, (E, Hb, Ib), w2.device)
