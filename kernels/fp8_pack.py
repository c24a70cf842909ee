"""Packed FP8 rows: one token's float8_e4m3fn values and their float32 scales in one row of bytes, so a comm
moves (and copies) a single row per token, about half a bf16 row.

Dimension legend: M rows, H hidden (a multiple of 128), G = H / 128 scale groups, RB packed row bytes,
BLOCK channels one program quantises (a multiple of 128).

Row layout, RB = H + 4G rounded up to a multiple of ROW_ALIGN (32) bytes (DeepSeek-V3: 7168 + 224 = 7392,
no padding):
    bytes [0, H)        q, float8_e4m3fn (channel c at byte c)
    bytes [H, H + 4G)   scales, float32 (group g at byte H + 4g; H % 128 == 0 keeps them 4-byte aligned)
    bytes [H + 4G, RB)  padding, never written
`unpack_fp8_rows` gives the two zero-copy views: q [.., H] fp8 (row stride RB bytes) and scales [.., G]
float32 (row stride RB / 4), the pair an FP8 ExpertBatch carries (x, x_scale). ROW_ALIGN = 32 makes RB / 2
a multiple of 16, so Triton row copies over an int16 view (ep_nvlink.expand_tokens) see 16-byte aligned
rows and vectorise.

The quantisation is kernels/fp8_quant.py's scheme bit for bit (same float32 operations in the same order:
amax, scale = amax / 448 by div_rn, 1 for an all-zero group, div_rn, clamp, `_round_e4m3`), so a packed row
unpacks to exactly quant_fp8_groups' (q, scale). `quant_pack_chunk` is the jit helper that quantises BLOCK
channels of one row straight into a packed row (any destination: ep_nvlink's put kernel writes peers'
receive rows with it); `pack_fp8_rows` runs it over a whole [M, H] tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.fp8_quant import FP8_DTYPE, GROUP, IN_DTYPES, _round_e4m3, quant_fp8_groups_torch
from nanomoe_kernels.launch import Launcher

ROW_ALIGN = 32  # bytes: RB / 2 int16 elements is a multiple of 16
MAX_BLOCK = 1024


def packed_row_bytes(hidden: int) -> int:
    """RB: bytes of one packed row of `hidden` channels (hidden must be a multiple of 128)."""
    if not isinstance(hidden, int) or hidden < GROUP or hidden % GROUP:
        raise ValueError(f"packed FP8 rows need hidden to be a positive multiple of {GROUP}, got {hidden!r}")
    return -(-(hidden + 4 * (hidden // GROUP)) // ROW_ALIGN) * ROW_ALIGN


@triton.jit
def quant_pack_chunk(src_row, dst_row, c, H, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """Channels [c * BLOCK, (c + 1) * BLOCK) of the row at src_row (any float type, contiguous) quantised
    per GROUP channels into the packed row whose first byte dst_row points at (a uint8 pointer)."""
    NG: tl.constexpr = BLOCK // GROUP
    g = tl.arange(0, NG)
    cols = c * BLOCK + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [NG, GROUP]
    m = cols < H
    x = tl.load(src_row + cols, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(amax, tl.full([NG], 448.0, tl.float32))
    scale = tl.where(scale > 0.0, scale, 1.0)
    v = tl.div_rn(x, scale[:, None])
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    q = _round_e4m3(v)
    tl.store(dst_row.to(tl.pointer_type(tl.float8e4nv)) + cols, q.to(tl.float8e4nv), mask=m)
    gi = c * NG + g
    tl.store((dst_row + H).to(tl.pointer_type(tl.float32)) + gi, scale, mask=gi * GROUP < H)


@triton.jit
def _pack_kernel(x_ptr, out_ptr, H, stride_x, RB, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    # one program per (row, chunk of BLOCK channels)
    r = tl.program_id(0).to(tl.int64)
    quant_pack_chunk(x_ptr + r * stride_x, out_ptr + r * RB, tl.program_id(1), H, BLOCK=BLOCK, GROUP=GROUP)


_PACK = Launcher(_pack_kernel)


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [M, H] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in IN_DTYPES:
        raise TypeError(f"x must have dtype in {[str(d) for d in IN_DTYPES]}, got {x.dtype}")
    packed_row_bytes(int(x.shape[1]))


def pack_fp8_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, H] (float32/float16/bfloat16, rows contiguous) -> packed rows uint8 [M, RB] (module docstring),
    written into `out` when given (uint8 [M, RB], contiguous). One Triton kernel, no host sync."""
    _check_x(x)
    M, H = x.shape
    RB = packed_row_bytes(H)
    if H > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (stride(1) == 1), got strides {tuple(x.stride())}")
    if out is None:
        out = torch.empty((M, RB), dtype=torch.uint8, device=x.device)
    elif tuple(out.shape) != (M, RB) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous uint8 {(M, RB)}, got {out.dtype} {tuple(out.shape)}")
    if M:
        block = min(MAX_BLOCK, triton.next_power_of_2(H))
        _PACK((M, triton.cdiv(H, block)), x, out, H, x.stride(0), RB, BLOCK=block, GROUP=GROUP, num_warps=4)
    return out


def pack_fp8_rows_torch(x: torch.Tensor) -> torch.Tensor:
    """The same packed rows as pack_fp8_rows, bit for bit, from fp8_quant's torch twin (CPU; an oracle)."""
    _check_x(x)
    M, H = x.shape
    q, s = quant_fp8_groups_torch(x)
    out = torch.zeros((M, packed_row_bytes(H)), dtype=torch.uint8, device=x.device)
    out[:, :H] = q.view(torch.uint8)
    out[:, H:H + 4 * s.shape[1]] = s.contiguous().view(torch.uint8)
    return out


def unpack_fp8_rows(packed: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows uint8 [.., RB] -> (q [.., H] float8_e4m3fn, scales [.., H / 128] float32): zero-copy strided
    views of the same memory (row strides RB bytes and RB / 4 floats). Any leading dims; the last must be
    contiguous, as must the rows be 4-byte aligned (every buffer torch allocates is)."""
    RB = packed_row_bytes(hidden)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() < 1 or \
            packed.shape[-1] != RB or (packed.numel() and packed.stride(-1) != 1):
        raise ValueError(f"packed must be uint8 [.., {RB}] with a contiguous last dim (hidden {hidden}), got "
                         f"{getattr(packed, 'dtype', None)} {tuple(getattr(packed, 'shape', ()))}")
    G = hidden // GROUP
    q = packed[..., :hidden].view(FP8_DTYPE)
    scales = packed[..., hidden:hidden + 4 * G].view(torch.float32)
    return q, scales
