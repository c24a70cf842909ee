"""Block-scaled FP8 weights as DeepSeek-V3 ships them: a float8_e4m3fn weight [O, In] with one float32 scale
per b0 x b1 block ('<name>_scale_inv' [ceil(O/b0), ceil(In/b1)]); the real weight is fp8 * its block's scale.

Dimension legend: O output rows, In input columns, b0 x b1 the block (DeepSeek-V3: 128 x 128),
Ob = ceil(O / b0), Ib = ceil(In / b1) blocks per dim.

The loader dequantises at load time (checkpoint.py); quantize_blocks is the inverse, for tests and tools.
Both are the 2-D case of nanomoe_kernels.fp8_quant (the one implementation of the scheme: scale = amax / 448,
1 for an all-zero block; partial last blocks scaled over the elements they have).
"""

from __future__ import annotations

import torch
from nanomoe_kernels.fp8_quant import DEFAULT_BLOCK, FP8_DTYPE, FP8_MAX, dequant_fp8_blocks, quant_fp8_blocks

__all__ = ["DEFAULT_BLOCK", "FP8_DTYPE", "FP8_MAX", "dequantize_blocks", "quantize_blocks", "scale_shape"]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """[Ob, Ib] = [ceil(O / b0), ceil(In / b1)] for a weight of shape [O, In]."""
    O, In = shape
    return -(-O // block[0]), -(-In // block[1])


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """fp8 w [O, In] times its block scales scale_inv [Ob, Ib] -> float32 [O, In] (on w's device)."""
    if w.dim() != 2 or tuple(scale_inv.shape) != scale_shape(tuple(w.shape), block):
        raise ValueError(f"FP8 weight {tuple(w.shape)} needs scales of shape {scale_shape(tuple(w.shape), block)} "
                         f"for blocks {tuple(block)}, got {tuple(scale_inv.shape)}")
    return dequant_fp8_blocks(w, scale_inv, tuple(block))


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, In] -> (fp8 [O, In], scale_inv [Ob, Ib] float32), each block scaled so its largest magnitude
    maps to FP8_MAX (an all-zero block gets scale 1)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_blocks takes a 2-D weight [O, In], got shape {tuple(w.shape)}")
    return quant_fp8_blocks(w, tuple(block))
