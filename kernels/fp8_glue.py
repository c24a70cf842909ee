"""Triton glue around DeepGEMM's FP8 grouped GEMMs (kernels/deepgemm_fp8.py): FP8 rows into the padded
layouts with their scales in the layout DeepGEMM reads, and SwiGLU's activation quantised between the GEMMs.

Dimension legend: H hidden (the columns moved), HG = ceil(H / 128) scale groups, I expert intermediate,
IG = ceil(I / 128), N align.num_rows (rows the alignment sorts), R aligned rows (align.sorted_ids.numel(),
a multiple of BM = align.block_m), E experts, cap rows per expert (masked layout), MP = rows rounded up to
a multiple of 4 (16 bytes of float32), BR/GPB the tiles (rows, 128-column groups per program).

Scales, one float32 per row and 128 columns, always in DeepGEMM's LHS layout for sm_90 ("MN-major,
TMA-aligned", what its get_mn_major_tma_aligned_tensor returns, so it takes them without a copy):
[M, G] with strides (1, MP) (storage [G, MP]), batched [B, M, G] with strides (G * MP, 1, MP); made by
`mn_major_scales` (padding entries unwritten). The quantisation is kernels/fp8_quant.py's scheme with its
`_round_e4m3`: scale = amax / 448 (`div_rn`; 1 for an all-zero group), q = e4m3(clamp(v / scale)), bit for
bit what quant_fp8_groups gives on the same float32 values.
- `permute_fp8_rows`: fp8 rows q [T, H] + scales [T, HG] (any strides: a comm's packed receive rows) ->
  a [R, H] fp8, a_scale [R, HG], m_indices [R] int32 for DeepGEMM's contiguous layout, as
  kernels/moe_permute.permute_rows: row r = q[sorted_ids[r] // a_div] (through a_index), padding rows
  below num_padded zeros with scale 1, rows past it unwritten with m_indices -1. Bytes are moved, never
  converted (fp8 goes through uint8 views).
- `silu_mul_quant`: h [R, 2I] (or [E, cap, 2I]) -> silu(gate) * up in float32, quantised: q [.., I] fp8 +
  scales [.., IG]; rows with m_indices < 0 (or j >= masked_m[e]) are neither read nor written.
- `pack_masked_fp8`: x [E, cap_x, H] (bf16/fp16/fp32: quantised here; or fp8 with x_scale: copied) ->
  q [E, cap, H] fp8 + scales [E, cap, HG] for DeepGEMM's masked layout, rows j < counts[e] only.
No host sync: static grids from shapes, counts read on the device (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.fp8_quant import _round_e4m3
from nanomoe_kernels.moe_permute import FLOAT_DTYPES, INT_DTYPES, _check_align, _check_rows

FP8 = torch.float8_e4m3fn
GROUP = 128
_G = tl.constexpr(GROUP)


@triton.jit
def _quant_tile(x, BR: tl.constexpr):
    """float32 [BR, 128] -> (q on the e4m3 grid, float32, scale [BR]); kernels/fp8_quant.py's arithmetic."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(amax, tl.full([BR], 448.0, tl.float32))
    scale = tl.where(scale > 0.0, scale, 1.0)
    v = tl.minimum(tl.maximum(tl.div_rn(x, scale[:, None]), -448.0), 448.0)
    return _round_e4m3(v), scale


@triton.jit(do_not_specialize=["R", "num_rows"])
def _permute_fp8_kernel(q_ptr, s_ptr, a_ptr, as_ptr, m_ptr, sorted_ids_ptr, expert_ids_ptr, used_ptr, a_index_ptr,
                        R, num_rows, H, G, stride_q, stride_sr, stride_sg, stride_a, stride_asr, stride_asg,
                        A_DIV: tl.constexpr, A_INDEX: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                        GPB: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    in_r = rows < R
    used = tl.load(used_ptr)
    in_used = in_r & (rows < used)
    ids = tl.load(sorted_ids_ptr + rows, mask=in_used, other=num_rows)
    live = in_used & (ids < num_rows)
    if pid_h == 0:
        experts = tl.load(expert_ids_ptr + rows // BM, mask=live, other=-1)
        tl.store(m_ptr + rows, tl.where(live, experts, -1), mask=in_r)
    if pid_r * BR >= used:  # past num_padded: DeepGEMM skips these blocks
        return
    src = ids // A_DIV
    if A_INDEX:
        src = tl.load(a_index_ptr + src, mask=live, other=0)
    src = src.to(tl.int64)
    r64 = rows.to(tl.int64)
    cols = pid_h * (GPB * _G) + tl.arange(0, GPB * _G)
    col_ok = cols < H
    vals = tl.load(q_ptr + src[:, None] * stride_q + cols[None, :], mask=live[:, None] & col_ok[None, :], other=0)
    tl.store(a_ptr + r64[:, None] * stride_a + cols[None, :], vals, mask=in_used[:, None] & col_ok[None, :])
    g = pid_h * GPB + tl.arange(0, GPB)
    g_ok = g < G
    sc = tl.load(s_ptr + src[:, None] * stride_sr + g[None, :] * stride_sg, mask=live[:, None] & g_ok[None, :],
                 other=1.0)
    tl.store(as_ptr + r64[:, None] * stride_asr + g[None, :] * stride_asg, sc, mask=in_used[:, None] & g_ok[None, :])


@triton.jit(do_not_specialize=["R", "seg"])
def _silu_mul_quant_kernel(h_ptr, q_ptr, s_ptr, sel_ptr, R, I, seg, stride_h, stride_q, stride_sb, stride_sr,
                           stride_sg, MODE: tl.constexpr, BR: tl.constexpr):
    # MODE 0: every row; 1: rows with sel[r] (m_indices) >= 0; 2: row r = (e, j), j = r % seg < sel[e] (masked_m)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1)
    ok = rows < R
    if MODE == 1:
        ok = ok & (tl.load(sel_ptr + rows, mask=ok, other=-1) >= 0)
    if MODE == 2:
        ok = ok & (rows % seg < tl.load(sel_ptr + rows // seg, mask=ok, other=0))
    cols = g * _G + tl.arange(0, _G)
    m = ok[:, None] & (cols < I)[None, :]
    r64 = rows.to(tl.int64)
    hp = h_ptr + r64[:, None] * stride_h + cols[None, :]
    gate = tl.load(hp, mask=m, other=0.0).to(tl.float32)
    up = tl.load(hp + I, mask=m, other=0.0).to(tl.float32)
    q, scale = _quant_tile(gate / (1.0 + tl.exp(-gate)) * up, BR)
    tl.store(q_ptr + r64[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + (r64 // seg) * stride_sb + (r64 % seg) * stride_sr + g * stride_sg, scale, mask=ok)


@triton.jit(do_not_specialize=["cap_x"])
def _pack_masked_kernel(x_ptr, xs_ptr, counts_ptr, q_ptr, s_ptr, cap_x, H, stride_xe, stride_xr, stride_xse,
                        stride_xsr, stride_xsg, stride_qe, stride_qr, stride_se, stride_sr, stride_sg,
                        QUANT: tl.constexpr, BR: tl.constexpr):
    e = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    g = tl.program_id(2)
    n = tl.minimum(tl.maximum(tl.load(counts_ptr + e).to(tl.int32), 0), cap_x)
    ok = rows < n
    cols = g * _G + tl.arange(0, _G)
    m = ok[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)
    src = x_ptr + e.to(tl.int64) * stride_xe + r64[:, None] * stride_xr + cols[None, :]
    dst = q_ptr + e.to(tl.int64) * stride_qe + r64[:, None] * stride_qr + cols[None, :]
    if QUANT:
        q, scale = _quant_tile(tl.load(src, mask=m, other=0.0).to(tl.float32), BR)
        tl.store(dst, q.to(q_ptr.dtype.element_ty), mask=m)
    else:  # fp8 bytes as uint8, and their scales
        tl.store(dst, tl.load(src, mask=m, other=0), mask=m)
        scale = tl.load(xs_ptr + e.to(tl.int64) * stride_xse + r64 * stride_xsr + g * stride_xsg, mask=ok, other=1.0)
    tl.store(s_ptr + e.to(tl.int64) * stride_se + r64 * stride_sr + g * stride_sg, scale, mask=ok)


def runs_interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    return type(_permute_fp8_kernel).__name__ == "InterpretedFunction"


def mn_major_scales(rows: int, groups: int, batch: int | None = None,
                    device: torch.device | str = "cuda") -> torch.Tensor:
    """Uninitialised float32 scales [rows, groups] (or [batch, rows, groups]) in DeepGEMM's MN-major
    TMA-aligned layout: strides (1, MP) (batched (groups * MP, 1, MP)), MP = rows rounded up to 4."""
    mp = -(-rows // 4) * 4
    if batch is None:
        return torch.empty(groups * mp, dtype=torch.float32, device=device).as_strided((rows, groups), (1, mp))
    return torch.empty(batch * groups * mp, dtype=torch.float32, device=device).as_strided(
        (batch, rows, groups), (groups * mp, 1, mp))


def _check_scale(name: str, s: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != shape or s.device != device:
        raise ValueError(f"{name} must be float32 {list(shape)} on {device} (one scale per row and {GROUP} "
                         f"columns), got {getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
    return s


def permute_fp8_rows(q: torch.Tensor, q_scale: torch.Tensor, align, a_div: int = 1,
                     a_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H] float8_e4m3fn + q_scale [T, HG] float32 (any strides; q's last one 1) -> (a [R, H] fp8,
    a_scale [R, HG] MN-major, m_indices [R] int32): DeepGEMM's contiguous layout (module docstring).
    a_index [>= ceil(N / a_div)] int32/int64 values in [0, T) are the caller's to check."""
    _check_rows("q", q, 2, (FP8,))
    _check_align(align, q.device)
    if not isinstance(a_div, int) or a_div < 1:
        raise ValueError(f"a_div must be an int >= 1, got {a_div!r}")
    T, H = q.shape
    G = -(-H // GROUP)
    _check_scale("q_scale", q_scale, (T, G), q.device)
    N, R = align.num_rows, align.sorted_ids.numel()
    need = -(-N // a_div)
    if a_index is None and need > T:
        raise ValueError(f"q must have at least ceil(num_rows / a_div) = {need} rows, got {T}")
    if a_index is not None:
        _check_rows("a_index", a_index, 1, INT_DTYPES)
        if a_index.numel() < need or not a_index.is_contiguous() or a_index.device != q.device:
            raise ValueError(f"a_index must be contiguous with at least {need} entries on {q.device}, got "
                             f"{tuple(a_index.shape)} on {a_index.device}")
    a = torch.empty((R, H), dtype=FP8, device=q.device)
    a_scale = mn_major_scales(R, G, device=q.device)
    m_indices = torch.empty(R, dtype=torch.int32, device=q.device)
    if R == 0:
        return a, a_scale, m_indices
    gpb = min(4, triton.next_power_of_2(max(G, 1)))  # 512 columns a program (moe_permute's H200 tile)
    br = 8 if gpb == 4 else 16  # a power of two <= 16 <= block_m: a tile never straddles num_padded
    _permute_fp8_kernel[(R // br, max(1, triton.cdiv(G, gpb)))](
        q.view(torch.uint8), q_scale, a.view(torch.uint8), a_scale, m_indices, align.sorted_ids, align.expert_ids,
        align.num_padded, a_index, R, N, H, G, q.stride(0), q_scale.stride(0), q_scale.stride(1), a.stride(0),
        a_scale.stride(0), a_scale.stride(1), A_DIV=a_div, A_INDEX=a_index is not None, BM=align.block_m, BR=br,
        GPB=gpb, num_warps=4)
    return a, a_scale, m_indices


def silu_mul_quant(h: torch.Tensor, m_indices: torch.Tensor | None = None,
                   masked_m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h [R, 2I] (gate columns, then up; bf16/fp16/fp32, rows contiguous) -> (q [R, I] fp8, scales [R, IG]
    MN-major); 3-dim h [E, cap, 2I] with masked_m [E] -> ([E, cap, I], [E, cap, IG] batched MN-major).
    silu(gate) * up in float32, quantised per row and 128 columns (module docstring). m_indices [R] int32:
    rows < 0 skipped; masked_m: rows j >= masked_m[e] skipped (neither read nor written)."""
    if masked_m is not None and m_indices is not None:
        raise ValueError("give m_indices (2-dim h) or masked_m (3-dim h), not both")
    _check_rows("h", h, 3 if masked_m is not None else 2, FLOAT_DTYPES)
    if h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dim (gate columns, then up columns), got {tuple(h.shape)}")
    I = h.shape[-1] // 2
    IG = -(-I // GROUP)
    sel, mode = None, 0
    if m_indices is not None:
        _check_rows("m_indices", m_indices, 1, (torch.int32,))
        if m_indices.shape[0] != h.shape[0] or not m_indices.is_contiguous():
            raise ValueError(f"m_indices must be contiguous int32 [{h.shape[0]}], got {tuple(m_indices.shape)}")
        sel, mode = m_indices, 1
    if masked_m is not None:
        _check_rows("masked_m", masked_m, 1, INT_DTYPES)
        if masked_m.shape[0] != h.shape[0] or not masked_m.is_contiguous():
            raise ValueError(f"masked_m must be contiguous [{h.shape[0]}] (one count per expert), got "
                             f"{tuple(masked_m.shape)}")
        sel, mode = masked_m, 2
    lead = tuple(h.shape[:-1])
    q = torch.empty((*lead, I), dtype=FP8, device=h.device)
    s = mn_major_scales(lead[-1], IG, lead[0] if h.dim() == 3 else None, h.device)
    if h.numel() == 0 or I == 0:
        return q, s
    try:
        hf = h.view(-1, 2 * I)  # 3-dim: one row per (expert, slot)
    except RuntimeError as err:
        raise ValueError(f"h must flatten to rows without a copy, got strides {h.stride()}") from err
    R, seg = hf.shape[0], lead[-1]
    sb, sr, sg = (s.stride(0), s.stride(1), s.stride(2)) if h.dim() == 3 else (0, s.stride(0), s.stride(1))
    br = 16
    _silu_mul_quant_kernel[(triton.cdiv(R, br), IG)](
        hf, q.view(-1, I), s, sel, R, I, seg, hf.stride(0), I, sb, sr, sg, MODE=mode, BR=br, num_warps=4)
    return q, s


def pack_masked_fp8(x: torch.Tensor, counts: torch.Tensor, capacity: int,
                    x_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [E, cap_x, H] -> (q [E, capacity, H] fp8 contiguous, scales [E, capacity, HG] batched MN-major) for
    DeepGEMM's masked layout; capacity >= cap_x (the padded capacity). bf16/fp16/fp32 x is quantised here;
    float8_e4m3fn x with x_scale [E, cap_x, HG] float32 is copied (any strides; x's last one 1). Only rows
    j < min(counts[e], cap_x) are read and written; the rest of q and the scales stay unwritten."""
    if isinstance(x, torch.Tensor) and x.dtype == FP8:
        _check_rows("x", x, 3, (FP8,))
        _check_scale("x_scale", x_scale, (*x.shape[:-1], -(-x.shape[-1] // GROUP)), x.device)
    else:
        if x_scale is not None:
            raise ValueError("x_scale is for float8_e4m3fn x only (pre-quantised rows)")
        _check_rows("x", x, 3, FLOAT_DTYPES)
    E, cap_x, H = x.shape
    _check_rows("counts", counts, 1, INT_DTYPES)
    if counts.shape[0] != E or counts.device != x.device:
        raise ValueError(f"counts must be [E={E}] on {x.device}, got {tuple(counts.shape)} on {counts.device}")
    if not isinstance(capacity, int) or capacity < cap_x:
        raise ValueError(f"capacity must be an int >= x.shape[1] = {cap_x}, got {capacity!r}")
    G = -(-H // GROUP)
    q = torch.empty((E, capacity, H), dtype=FP8, device=x.device)
    s = mn_major_scales(capacity, G, E, x.device)
    if E == 0 or cap_x == 0 or H == 0:
        return q, s
    quant = x_scale is None
    xs = x_scale if x_scale is not None else s
    br = 16
    _pack_masked_kernel[(E, triton.cdiv(cap_x, br), G)](
        x if quant else x.view(torch.uint8), xs, counts, q if quant else q.view(torch.uint8), s, cap_x, H,
        x.stride(0), x.stride(1), xs.stride(0), xs.stride(1), xs.stride(2), q.stride(0), q.stride(1),
        s.stride(0), s.stride(1), s.stride(2), QUANT=quant, BR=br, num_warps=4)
    return q, s
