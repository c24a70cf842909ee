"""SwiGLU's activation between DeepGEMM's grouped GEMMs (and the `bmm` backend's batched ones), as one Triton pass.

Dimension legend: R rows (or E experts x cap rows per expert, masked layout), I expert intermediate (h holds
2I columns: gate, then up), BR/BI the tiles of rows and columns, NBIN a power of two >= E.

`silu_mul`: [.., 2I] -> [.., I], silu(gate) * up in float32 rounded to the output dtype; rows that m_indices
marks -1 (or masked rows j >= masked_m[e]) are skipped: neither read nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_permute import INT_DTYPES, _check_rows, _expert_tile, _tile


@triton.jit(do_not_specialize=["R", "cap"])
def _silu_mul_kernel(h_ptr, out_ptr, sel_ptr, R, I, E, cap, stride_h, stride_o, MODE: tl.constexpr,
                     BR: tl.constexpr, BI: tl.constexpr, NBIN: tl.constexpr):
    # MODE 0: every row; 1: rows with sel[r] (m_indices) >= 0; 2: row r = (e, j) with j < sel[e] (masked_m),
    # on a grid sized by the rows in use (_expert_tile)
    if MODE == 2:
        rows, ok = _expert_tile(sel_ptr, E, cap, tl.program_id(0), BR, NBIN)
    else:
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = rows < R
    if MODE == 1:
        ok = ok & (tl.load(sel_ptr + rows, mask=ok, other=-1) >= 0)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    m = ok[:, None] & (cols < I)[None, :]
    hp = h_ptr + rows.to(tl.int64)[:, None] * stride_h + cols[None, :]
    gate = tl.load(hp, mask=m, other=0.0).to(tl.float32)
    up = tl.load(hp + I, mask=m, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], act.to(out_ptr.dtype.element_ty),
             mask=m)


def silu_mul(h: torch.Tensor, out: torch.Tensor | None = None, m_indices: torch.Tensor | None = None,
             masked_m: torch.Tensor | None = None, max_rows: int | None = None) -> torch.Tensor:
    """silu(gate) * up for h [R, 2I] (or [E, cap, 2I] with masked_m) -> out [R, I] ([E, cap, I]) in h's
    dtype (out's, when given), computed in float32. gate = the first I columns, up = the last I.
    m_indices [R] int32 (2-dim h): rows with m_indices < 0 are skipped; masked_m [E] int (3-dim h): rows
    j >= masked_m[e] of expert e are skipped. Skipped rows are neither read nor written. max_rows: a bound
    on sum(masked_m) known on the host (the grid is sized by it; rows past it are the caller's error)."""
    if masked_m is not None and m_indices is not None:
        raise ValueError("give m_indices (2-dim h) or masked_m (3-dim h), not both")
    _check_rows("h", h, 3 if masked_m is not None else 2)
    if h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dim (gate columns, then up columns), got {tuple(h.shape)}")
    I = h.shape[-1] // 2
    lead = tuple(h.shape[:-1])
    if out is None:
        out = h.new_empty((*lead, I))
    _check_rows("out", out, h.dim())
    if tuple(out.shape) != (*lead, I) or out.device != h.device:
        raise ValueError(f"out must be {(*lead, I)} on {h.device}, got {tuple(out.shape)} on {out.device}")
    sel, mode, cap = None, 0, 1
    if m_indices is not None:
        _check_rows("m_indices", m_indices, 1, (torch.int32,))
        if m_indices.shape[0] != lead[0] or not m_indices.is_contiguous() or m_indices.device != h.device:
            raise ValueError(f"m_indices must be contiguous int32 [{lead[0]}] on {h.device}, got "
                             f"{tuple(m_indices.shape)} on {m_indices.device}")
        sel, mode = m_indices, 1
    if masked_m is not None:
        _check_rows("masked_m", masked_m, 1, INT_DTYPES)
        if masked_m.shape[0] != lead[0] or masked_m.device != h.device:
            raise ValueError(f"masked_m must be [{lead[0]}] on {h.device}, got {tuple(masked_m.shape)}")
        if masked_m.dtype != torch.int32 or not masked_m.is_contiguous():
            masked_m = masked_m.to(torch.int32).contiguous()
        sel, mode, cap = masked_m, 2, max(lead[1], 1)
    if h.numel() == 0 or I == 0:
        return out
    try:  # 3-dim: one row per (expert, slot)
        hf, of = h.view(-1, 2 * I), out.view(-1, I)
    except RuntimeError as err:
        raise ValueError(f"h and out must flatten to rows without a copy, got strides {h.stride()} and "
                         f"{out.stride()}") from err
    R = hf.shape[0]
    bi = _tile(I, 2048)  # H200 sweep at I=2048: 2 rows x 2048 columns, 8 warps
    br = max(1, min(16, 4096 // bi))
    E, tiles = (lead[0], lead[0] * triton.cdiv(cap, br)) if mode == 2 else (1, triton.cdiv(R, br))
    if mode == 2 and max_rows is not None:  # each expert adds at most one partial tile
        tiles = min(tiles, triton.cdiv(max(max_rows, 0), br) + E)
    _silu_mul_kernel[(max(tiles, 1), triton.cdiv(I, bi))](
        hf, of, sel, R, I, E, cap, hf.stride(0), of.stride(0), MODE=mode, BR=br, BI=bi,
        NBIN=triton.next_power_of_2(max(E, 16)), num_warps=8 if br * bi >= 4096 else 4)
    return out
