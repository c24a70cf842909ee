"""Block-scaled FP8 weights as DeepSeek-V3 ships them: a float8_e4m3fn weight [O, In] with one float32 scale
per b0 x b1 block ('<name>_scale_inv' [ceil(O/b0), ceil(In/b1)]); the real weight is fp8 * its block's scale.

Dimension legend: O output rows, In input columns, b0 x b1 the block (DeepSeek-V3: 128 x 128),
Ob = ceil(O / b0), Ib = ceil(In / b1) blocks per dim.

The loader dequantises at load time (checkpoint.py); quantize_blocks is the inverse, for tests and tools.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """[Ob, Ib] = [ceil(O / b0), ceil(In / b1)] for a weight of shape [O, In]."""
    O, In = shape
    return -(-O // block[0]), -(-In // block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """[Ob, Ib] -> [O, In]: every element gets its block's scale (the last blocks may be partial)."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """fp8 w [O, In] times its block scales scale_inv [Ob, Ib] -> float32 [O, In] (on w's device)."""
    if w.dim() != 2 or tuple(scale_inv.shape) != scale_shape(tuple(w.shape), block):
        raise ValueError(f"FP8 weight {tuple(w.shape)} needs scales of shape {scale_shape(tuple(w.shape), block)} "
                         f"for blocks {tuple(block)}, got {tuple(scale_inv.shape)}")
    scale = scale_inv.to(device=w.device, dtype=torch.float32)
    return w.to(torch.float32) * _expand(scale, tuple(w.shape), block)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, In] -> (fp8 [O, In], scale_inv [Ob, Ib] float32), each block scaled so its largest magnitude
    maps to FP8_MAX (an all-zero block gets scale 1)."""
    O, In = w.shape
    Ob, Ib = scale_shape((O, In), block)
    # pad to whole blocks with zeros (they never raise a block's max), then amax per block
    pad = torch.zeros(Ob * block[0], Ib * block[1], dtype=torch.float32, device=w.device)
    pad[:O, :In] = w.float()
    amax = pad.abs().view(Ob, block[0], Ib, block[1]).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w.float() / _expand(scale, (O, In), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
