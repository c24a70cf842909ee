"""Naive float64 oracle of DeepSeek-V3's block-scaled FP8 (e4m3fn): weights per b0 x b1 block, activations
per row per g columns. Imports nothing from nanomoe_fn or kernels; loops over blocks, each line checkable
by eye. Outputs are float64 CPU tensors: q as values on the e4m3 grid, scales as float32 values.

Dimension legend: N, K a weight's rows and columns ([.., N, K], leading dims such as experts), b0 x b1 the
block, Nb = ceil(N / b0), Kb = ceil(K / b1); M, K an activation's rows and columns, g the group width,
G = ceil(K / g).

The scheme (the kernels compute it in float32; two float32 roundings here make it the same function):
    scale = float32(amax / 448), or 1 when that is 0 (an all-zero block)   [real value = q * scale]
    q     = round_e4m3(float32(x / scale))
A partial last block (a dim not a multiple of the block) gets the scale of the elements it has.
"""

from __future__ import annotations

import math

import torch

E4M3_MAX = 448.0


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float8 e4m3fn value, ties to even, saturating at +-448 (what torch's cast to
    float8_e4m3fn does for finite inputs); the sign of zero is kept. float64 in, float64 out."""
    x = x.to(torch.float64)
    a = x.abs().clamp(max=E4M3_MAX)
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    exp = (e - 1).clamp(min=-6)  # below 2^-6 the grid is e4m3's subnormals: spacing 2^-9
    step = torch.ldexp(torch.ones_like(a), exp - 3)  # 3 mantissa bits: 8 steps per power of two
    return torch.copysign(torch.round(a / step) * step, x)  # torch.round: half to even


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round float64 to the nearest float32 value (kept as float64)."""
    return x.to(torch.float32).to(torch.float64)


def _quant_one(blk: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One block (float64) -> (q on the grid, its scale)."""
    scale = float(_f32(blk.abs().max() / E4M3_MAX)) if blk.numel() else 0.0
    if scale == 0.0:
        scale = 1.0
    return round_e4m3(_f32(blk / scale)), scale


def quant_blocks_ref(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., N, K] -> (q [.., N, K] float64 on the e4m3 grid, scales [.., Nb, Kb] float64), block by block."""
    w = w.detach().to("cpu", torch.float64)
    *lead, N, K = w.shape
    b0, b1 = block
    Nb, Kb = -(-N // b0), -(-K // b1)
    q = torch.zeros_like(w)
    scales = torch.zeros(*lead, Nb, Kb, dtype=torch.float64)
    L = math.prod(lead)
    flat_w, flat_q, flat_s = w.reshape(L, N, K), q.view(L, N, K), scales.view(L, Nb, Kb)
    for i in range(flat_w.shape[0]):
        for a in range(Nb):
            for b in range(Kb):
                rows, cols = slice(a * b0, (a + 1) * b0), slice(b * b1, (b + 1) * b1)
                flat_q[i, rows, cols], flat_s[i, a, b] = _quant_one(flat_w[i, rows, cols])
    return q, scales


def dequant_blocks_ref(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """q [.., N, K] times its block's scale (scales [.., Nb, Kb]) -> float64 [.., N, K] (exact products)."""
    out = q.detach().to("cpu", torch.float64).clone()
    s = scales.detach().to("cpu", torch.float64)
    b0, b1 = block
    for a in range(s.shape[-2]):
        for b in range(s.shape[-1]):
            out[..., a * b0:(a + 1) * b0, b * b1:(b + 1) * b1] *= s[..., a, b, None, None]
    return out


def quant_groups_ref(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float64 on the e4m3 grid, scales [M, G] float64): one scale per row per group."""
    return quant_blocks_ref(x, (1, group))


def dequant_groups_ref(q: torch.Tensor, scales: torch.Tensor, group: int = 128) -> torch.Tensor:
    """q [M, K] times its group's scale (scales [M, G]) -> float64 [M, K]."""
    return dequant_blocks_ref(q, scales, (1, group))


def swiglu_fp8_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, group: int = 128) -> torch.Tensor:
    """One FP8 SwiGLU expert as the FP8 kernels compute it, on rows x [N, H] and weights already dequantised
    (w13 [2I, H] gate then up, w2 [H, I]): x quantised per row and `group` columns, gate/up and SwiGLU in
    float64, the SwiGLU output [N, I] quantised the same way, then the down GEMM -> float64 [N, H]."""
    xd = dequant_groups_ref(*quant_groups_ref(x.to(torch.float64), group), group)
    w13, w2 = w13.to(torch.float64), w2.to(torch.float64)
    inter = w13.shape[0] // 2
    gate, up = xd @ w13[:inter].T, xd @ w13[inter:].T
    act = gate * torch.sigmoid(gate) * up
    return dequant_groups_ref(*quant_groups_ref(act, group), group) @ w2.T
