"""Glue around DeepGEMM's grouped GEMMs, as Triton kernels: rows into the padded per-expert layout,
and rows back out (with the top-k weighted sum).

Dimension legend: T tokens (rows of x, or of the output), k experts per token (a_div), H hidden (the
columns moved), I expert intermediate, N align.num_rows (rows the alignment sorts: T*k (token, k) pairs
or a batch's rows), R aligned rows (align.sorted_ids.numel(), a multiple of BM = align.block_m),
E experts, cap rows per expert (masked layout), BR/BH/BI/BT the tiles of rows and columns.

An `Alignment` (kernels.moe_align) lists rows grouped by expert, each expert padded to BM rows:
aligned row r holds row id sorted_ids[r] < N (live) or the sentinel N (padding); entries at or past
num_padded were never written. The kernels here read num_padded on the device (no host sync) and run
on static grids sized by R, so they can be captured in a CUDA graph.
- `permute_rows`: a [R, H] = x[sorted_ids // a_div] (or x[a_index[sorted_ids // a_div]]) plus
  m_indices [R] int32 (the expert of each live row, -1 elsewhere): DeepGEMM's contiguous layout.
  Padding rows below num_padded are written as zeros (DeepGEMM reads every row of a block it computes);
  rows at or past num_padded get m_indices -1 and are left unwritten unless zero_tail=True (DeepGEMM
  skips a 128-row block whose first m_index is -1, and a GEMM row depends on its own input row only).
  Hole rows (id N + 1: moe_capacity.with_capacity's slots past an expert's padded count) are not written
  either, and get m_indices -1. In the masked layout (`capacity`) with the live counts given, padding rows are
  not written either: DeepGEMM's masked GEMMs compute whole blocks, but no live row reads another row's output.
- `unpermute_sum`: out [T, H] = sum_j w[t, j] * y[pos(t*k + j)] in float32, rounded once, where pos is
  the inverse of sorted_ids (`inverse_rows`: one scatter kernel). A pair with no aligned row (an
  expert id the alignment dropped) adds nothing: the sum kernel checks sorted_ids[pos] == pair, so
  the inverse needs no fill and a stale entry is never trusted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _expert_tile(counts_ptr, E, cap, p, BR: tl.constexpr, NBIN: tl.constexpr):
    # rows e * cap + j of the p-th BR-row tile over slots j < counts[e], expert by expert, and which are in use
    bins = tl.arange(0, NBIN)
    counts = tl.load(counts_ptr + bins, mask=bins < E, other=0)
    tiles = (counts + BR - 1) // BR
    ends = tl.cumsum(tiles, 0)
    e = tl.sum((ends <= p).to(tl.int32), 0)
    count = tl.sum(tl.where(bins == e, counts, 0), 0)
    j = (p - tl.sum(tl.where(bins == e, ends - tiles, 0), 0)) * BR + tl.arange(0, BR)
    return e.to(tl.int64) * cap + j, j < tl.where(e < E, count, 0)


@triton.jit(do_not_specialize=["R", "num_rows", "cap"])
def _permute_kernel(x_ptr, a_ptr, m_ptr, sorted_ids_ptr, expert_ids_ptr, used_ptr, a_index_ptr, counts_ptr, R,
                    num_rows, H, E, cap, stride_x, stride_a, A_DIV: tl.constexpr, A_INDEX: tl.constexpr,
                    ZERO_TAIL: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
                    COMPACT: tl.constexpr, LIVE_ONLY: tl.constexpr, NBIN: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    if COMPACT:  # [E, cap] layout: only each expert's first counts[e] slots, on a grid sized by the rows in use
        rows, in_r = _expert_tile(counts_ptr, E, cap, pid_r, BR, NBIN)
    else:
        rows = pid_r * BR + tl.arange(0, BR)
        in_r = rows < R
    used = tl.load(used_ptr)
    in_used = in_r & (rows < used)
    ids = tl.load(sorted_ids_ptr + rows, mask=in_used, other=num_rows)
    live = in_used & (ids < num_rows)
    if pid_h == 0 and not COMPACT:  # (m_indices is for the contiguous layout)
        experts = tl.load(expert_ids_ptr + rows // BM, mask=live, other=-1)
        tl.store(m_ptr + rows, tl.where(live, experts, -1), mask=in_r)
    if ZERO_TAIL:
        write = in_r
    elif LIVE_ONLY:  # counts_ptr holds live counts: padding rows stay unwritten (nothing reads their outputs)
        write = live
    else:
        write = in_used & (ids <= num_rows)  # a hole (id num_rows + 1, moe_capacity.with_capacity) is never read
        if not COMPACT and pid_r * BR >= used:  # past num_padded: DeepGEMM never reads these rows
            return
    src = ids // A_DIV
    if A_INDEX:
        src = tl.load(a_index_ptr + src, mask=live, other=0)
    cols = pid_h * BH + tl.arange(0, BH)
    col_ok = cols < H
    vals = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_x + cols[None, :],
                   mask=live[:, None] & col_ok[None, :], other=0.0)
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * stride_a + cols[None, :], vals,
             mask=write[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["R", "num_rows"])
def _inverse_kernel(sorted_ids_ptr, used_ptr, inv_ptr, R, num_rows, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < R) & (rows < tl.load(used_ptr))
    ids = tl.load(sorted_ids_ptr + rows, mask=ok, other=num_rows)
    tl.store(inv_ptr + ids, rows, mask=ok & (ids >= 0) & (ids < num_rows))


@triton.jit(do_not_specialize=["T"])
def _unpermute_kernel(y_ptr, out_ptr, inv_ptr, sorted_ids_ptr, used_ptr, w_ptr, T, H, stride_y, stride_o,
                      stride_wt, stride_wk, K: tl.constexpr, WEIGHTED: tl.constexpr, ACCUM: tl.constexpr,
                      BT: tl.constexpr, BH: tl.constexpr):
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    tok_ok = toks < T
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    col_ok = cols < H
    used = tl.load(used_ptr)
    out_ptrs = out_ptr + toks.to(tl.int64)[:, None] * stride_o + cols[None, :]
    if ACCUM:  # out is float32, and holds the sums of earlier groups of experts
        acc = tl.load(out_ptrs, mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
    else:
        acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(K):
        pair = toks * K + j
        pos = tl.load(inv_ptr + pair, mask=tok_ok, other=-1)
        ok = tok_ok & (pos >= 0) & (pos < used)
        # the inverse is trusted only where it points back at the pair (entries are never cleared)
        ok = ok & (tl.load(sorted_ids_ptr + pos, mask=ok, other=-1) == pair)
        v = tl.load(y_ptr + pos.to(tl.int64)[:, None] * stride_y + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(w_ptr + toks * stride_wt + j * stride_wk, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])


def runs_interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    return type(_permute_kernel).__name__ == "InterpretedFunction"


def _check_rows(name: str, t: object, dim: int, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}")
    if t.device.type != "cuda" and not runs_interpreted():
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                         f"set before kernels/ is imported")
    return t


def _check_align(align: object, device: torch.device) -> None:
    ids = getattr(align, "sorted_ids", None)
    if not isinstance(ids, torch.Tensor) or not hasattr(align, "num_padded") or not hasattr(align, "block_m"):
        raise TypeError(f"align must be a kernels.moe_align.Alignment, got {type(align).__name__}")
    R, bm = ids.numel(), align.block_m
    if ids.dtype != torch.int32 or ids.dim() != 1 or R % bm or align.expert_ids.numel() != R // bm:
        raise ValueError(f"align.sorted_ids must be int32 [R] with R a multiple of block_m={bm} and expert_ids "
                         f"[R // block_m], got {ids.dtype} {tuple(ids.shape)} and {tuple(align.expert_ids.shape)}")
    if ids.device != device:
        raise ValueError(f"align must live on {device} (with the rows), got {ids.device}")


def _tile(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 16)))


def permute_rows(x: torch.Tensor, align, a_div: int = 1, a_index: torch.Tensor | None = None,
                 zero_tail: bool = False, capacity: int = 0,
                 live: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, H] -> (a [R, H], m_indices [R] int32): a[r] = x[sorted_ids[r] // a_div] (x[a_index[..]] with
    a_index) for live rows, zeros for padding rows below num_padded; m_indices[r] = the expert of r's
    block for live rows, -1 otherwise. Rows at or past num_padded are left unwritten in `a` unless
    zero_tail (see the module docstring). a_index [>= ceil(N / a_div)] int32/int64 values in [0, T)
    are the caller's to check. capacity > 0: `align` comes from moe_capacity.with_capacity(., capacity)
    (R = E * capacity); only each expert's first padded_counts[e] rows are visited, on a grid sized by
    N + E * (block_m - 1) rows rather than R, and m_indices is None (the masked layout has no use for it).
    live [E] int32 (with capacity: with_capacity's second output): only each expert's live rows are visited and
    written, on a grid sized by N + E * (BR - 1) rows; its padding rows are left unwritten, which the masked
    GEMMs allow (a GEMM row depends on its own input row only, and only live rows are read back).
    out: the [R, H] tensor (x's dtype and device) to write `a` into; rows not written keep their values."""
    _check_rows("x", x, 2)
    _check_align(align, x.device)
    if not isinstance(a_div, int) or a_div < 1:
        raise ValueError(f"a_div must be an int >= 1, got {a_div!r}")
    T, H = x.shape
    N, R = align.num_rows, align.sorted_ids.numel()
    need = -(-N // a_div)
    if a_index is None and need > T:
        raise ValueError(f"x must have at least ceil(num_rows / a_div) = {need} rows, got {T}")
    if a_index is not None:
        _check_rows("a_index", a_index, 1, INT_DTYPES)
        if a_index.numel() < need or not a_index.is_contiguous() or a_index.device != x.device:
            raise ValueError(f"a_index must be contiguous with at least {need} entries on {x.device}, got "
                             f"{tuple(a_index.shape)} on {a_index.device}")
    E = align.padded_counts.numel()
    if not isinstance(capacity, int) or capacity < 0 or (capacity and (R != E * capacity or zero_tail)):
        raise ValueError(f"capacity must be 0 or the capacity of a with_capacity alignment ({R} rows over {E} "
                         f"experts), without zero_tail; got {capacity!r}")
    if live is not None and (not capacity or not isinstance(live, torch.Tensor) or live.dtype != torch.int32
                             or tuple(live.shape) != (E,) or live.device != x.device):
        raise ValueError(f"live must come with a capacity, as int32 [{E}] on {x.device} (with_capacity's live "
                         f"counts), got {getattr(live, 'dtype', type(live).__name__)} "
                         f"{tuple(getattr(live, 'shape', ()))} with capacity={capacity}")
    if out is None:
        a = x.new_empty((R, H))
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (R, H) or out.dtype != x.dtype \
            or out.device != x.device or (out.numel() and out.stride(1) != 1):
        raise ValueError(f"out must be [{R}, {H}] {x.dtype} on {x.device} with unit column stride, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    else:
        a = out
    m_indices = None if capacity else torch.empty(R, dtype=torch.int32, device=x.device)
    if R == 0:
        return a, m_indices
    # tiles from an H200 sweep at DeepSeek-V3 dims (H=7168, T=64..4096): 8 x 512 within 5% of the best
    bh = _tile(H, 512)
    br = max(1, min(16, 4096 // bh))  # a power of two <= 16 <= block_m: a tile never straddles num_padded
    # capacity: the padded counts are multiples of block_m, so their tiles number sum(padded) / br at most
    tiles = min(R, N + E * (align.block_m - 1)) // br if capacity else R // br
    if live is not None:  # each expert adds at most one partial tile of live rows
        tiles = min(tiles, triton.cdiv(N, br) + E)
    _permute_kernel[(max(tiles, 1), triton.cdiv(max(H, 1), bh))](
        x, a, m_indices, align.sorted_ids, align.expert_ids, align.num_padded, a_index,
        align.padded_counts if live is None else live, R, N, H, E, max(capacity, 1), x.stride(0), a.stride(0),
        A_DIV=a_div, A_INDEX=a_index is not None, ZERO_TAIL=bool(zero_tail), BM=align.block_m, BR=br, BH=bh,
        COMPACT=capacity > 0, LIVE_ONLY=live is not None, NBIN=triton.next_power_of_2(max(E, 16)), num_warps=4)
    return a, m_indices


def inverse_rows(align) -> torch.Tensor:
    """inv [N] int32 with inv[sorted_ids[r]] = r for the live aligned rows; other entries are unwritten
    (unpermute_sum validates each entry against sorted_ids, so no fill is needed)."""
    _check_align(align, align.sorted_ids.device)
    N, R = align.num_rows, align.sorted_ids.numel()
    inv = torch.empty(N, dtype=torch.int32, device=align.sorted_ids.device)
    if N and R:
        _inverse_kernel[(triton.cdiv(R, 1024),)](align.sorted_ids, align.num_padded, inv, R, N, BLOCK=1024)
    return inv


def unpermute_sum(y: torch.Tensor, align, T: int, k: int, topk_weights: torch.Tensor | None = None,
                  inv: torch.Tensor | None = None, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """y [R, H] aligned rows -> out [T, H] in y's dtype: out[t] = sum_j topk_weights[t, j] * y[pos(t*k + j)]
    (weights 1 when None) in float32, rounded once; pos(p) = the aligned row holding row id p (align must
    sort N = T*k rows). Pairs the alignment left out add nothing (a row with none gets zeros). k = 1 and
    no weights is the plain unpermute out[i] = y[pos(i)]. inv: `inverse_rows(align)`, made when None.
    accumulate: a float32 [T, H] tensor the sums are added to (and returned), for alignments that each hold
    a group of the experts (moe_capacity.with_capacity(..., experts=)); the caller rounds it once at the end."""
    _check_rows("y", y, 2)
    _check_align(align, y.device)
    R, H = y.shape
    if not isinstance(k, int) or not isinstance(T, int) or k < 1 or T < 0:
        raise ValueError(f"T must be an int >= 0 and k an int >= 1, got T={T!r}, k={k!r}")
    if align.num_rows != T * k or R < align.sorted_ids.numel():
        raise ValueError(f"align must sort T*k = {T * k} rows into at most y's {R} rows, got num_rows="
                         f"{align.num_rows} and {align.sorted_ids.numel()} aligned rows")
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != (T, k) \
                or not topk_weights.is_floating_point() or topk_weights.device != y.device:
            raise ValueError(f"topk_weights must be a float tensor [{T}, {k}] on {y.device}, got "
                             f"{getattr(topk_weights, 'shape', topk_weights)}")
    if inv is None:
        inv = inverse_rows(align)
    elif inv.dtype != torch.int32 or tuple(inv.shape) != (T * k,) or inv.device != y.device:
        raise ValueError(f"inv must be int32 [{T * k}] on {y.device} (inverse_rows(align)), got {inv.dtype} "
                         f"{tuple(inv.shape)}")
    if accumulate is None:
        out = y.new_empty((T, H))
    elif not isinstance(accumulate, torch.Tensor) or accumulate.dtype != torch.float32 \
            or tuple(accumulate.shape) != (T, H) or accumulate.device != y.device or accumulate.stride(1) != 1:
        raise ValueError(f"accumulate must be float32 [{T}, {H}] on {y.device} with unit column stride, got "
                         f"{getattr(accumulate, 'dtype', type(accumulate).__name__)} "
                         f"{tuple(getattr(accumulate, 'shape', ()))}")
    else:
        out = accumulate
    if T == 0 or H == 0:
        return out
    # small tiles (k loads of 2 x 512 in flight per program): 1.5-2.7x faster on the H200 than 4 x 1024
    bh = _tile(H, 512)
    bt = max(1, min(16, 1024 // bh))
    w = topk_weights
    _unpermute_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](
        y, out, inv, align.sorted_ids, align.num_padded, w, T, H, y.stride(0), out.stride(0),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        K=k, WEIGHTED=w is not None, ACCUM=accumulate is not None, BT=bt, BH=bh, num_warps=4)
    return out
