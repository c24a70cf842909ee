"""Block-scaled FP8 fused MoE: DeepSeek-V3's SwiGLU experts with float8_e4m3fn weights and activations.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, G = 128 the scale group,
HG = H / 128, IG = I / 128, N rows of a contiguous or gathered batch, R token rows of a gathered batch,
cap rows per expert (masked layout), RA aligned rows (moe_align's sorted_ids).

Weights as DeepSeek-V3 ships them: w13_q float8_e4m3fn [E, 2I, H] (gate rows, then up rows) with
w13_scale float32 [E, 2I/128, HG] (w13 = q * scale per 128 x 128 block), w2_q [E, H, I] with w2_scale
[E, HG, IG]. H and I must be multiples of 128 (DeepSeek-V3: 7168 and 2048); other dims are refused.
The weights may also come in the block layout of kernels.fused_moe_fp8_kernel.tile_weights ([E, 2I/128,
H/128, 128, 128] and [E, H/128, I/128, 128, 128]: each 128 x 128 block's 16 KB contiguous; the same math,
faster weight streaming at decode).

The FFN (kernels/fused_moe_fp8_kernel.py does the GEMMs):
1. x quantised per row and 128-channel group: xq [rows, H] fp8 and xs [rows, HG] (x ~= xq * xs,
   xs = amax / 448). Each token row once: every (token, k) pair reads its token's quantised row.
2. gate/up GEMM with SwiGLU in float32, quantised per row and 128 columns in the epilogue: inter
   [RA, I] fp8 + inter_scale [RA, IG] (never a bf16 [RA, I], never [RA, 2I]).
3. down GEMM on inter, each row scaled by its top-k weight (fused_moe_fp8) and scattered to its row;
   output in x's dtype; fused_moe_fp8 sums the k rows of a token.
Entry points as kernels/fused_moe.py: `fused_moe_fp8(x [T, H], topk_ids, topk_weights, ...) -> [T, H]`,
`fused_moe_fp8_contiguous(rows [N, H], counts [E], ...) -> [N, H]`, `fused_moe_fp8_gathered(rows [R, H],
index [N], counts, ...) -> [N, H]` (the R token rows are quantised once and the up GEMM gathers them
through the index: no [N, H] copy) and `fused_moe_fp8_masked(x [E, cap, H], counts, ...) -> [E, cap,
H]` (all E * cap rows are quantised: no host sync on the counts; padding rows are never read). Rows no
expert owns are left unwritten. No host syncs: CUDA-graph capturable.

Two-term activations (act_terms=2 on every entry point): x and the SwiGLU output are quantised as
kernels/fp8_quant.py's [hi | lo] pairs and every GEMM step runs two FP8 MMAs (twice the MMA work, the same
weight bytes): ~1e-3 relative error against the unquantised FFN instead of the one-term scheme's ~4e-2; where
the weights' bytes bound the time (decode) it costs ~8% (bench/results/fp8_notes.md). Pre-quantised rows are
one-term.

Configs: tables in kernels/tuned named by kernels.fused_moe.config_name with dtype float8_e4m3fn and op
up/down and suffixes per variant (table_suffixes: _hilo, _tiles, _w8a16), else `default_config_fp8`. `config=`
overrides as in kernels/fused_moe.py (a flat dict or {"up": .., "down": ..}); BLOCK_K must be 128 and the up
GEMM's BLOCK_N 128 (its output scale groups are its tiles).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from nanomoe_kernels.checks import check_routing, check_values
from nanomoe_kernels.fp8_quant import check_terms, quant_fp8_groups, runs_interpreted
from nanomoe_kernels.fused_moe import TABLES, TUNED_DIR, _check_counts, _check_x, _device_name, config_name
from nanomoe_kernels.fused_moe_fp8_kernel import GROUP, check_fp8_config, is_tiled, moe_gemm_fp8, weight_dims
from nanomoe_kernels.moe_align import Alignment, _check_ids, moe_align, moe_align_contiguous, moe_align_masked
from nanomoe_kernels.moe_blocks import block_tables
from nanomoe_kernels.moe_sum import sum_pairs

FP8 = torch.float8_e4m3fn


@functools.cache
def _warn_default(name: str) -> None:
    warnings.warn(f"kernels.fused_moe_fp8: no tuned config {TUNED_DIR / name}; using default_config_fp8",
                  stacklevel=3)


def default_config_fp8(op: str, M: int, E: int) -> dict:
    """Fallback tile for the FP8 `op` ("up" or "down") with M rows over E experts, by rows per expert:
    BLOCK_K = 128 (a scale group), BLOCK_N = 128 (the up GEMM's output groups); untuned guesses sized
    for Hopper's shared memory (fp8 tiles are half the bytes of bf16 ones)."""
    per_expert = M / max(E, 1)
    if per_expert <= 8:
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64 if op == "up" else 128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8,
                num_stages=3, SPLIT_M=64 if per_expert >= 128 else 0)


def table_suffixes(w8a16: bool = False, act_terms: int = 1, tiles: bool = False) -> list[str]:
    """The op suffixes of the tuned tables for this kernel variant, preferred first: "_w8a16" (W8A16),
    "_hilo" (two-term activations), "_tiles" (block-layout weights), combined as "_hilo_tiles"; W8A8 and
    its variants fall back to the plain tables ("")."""
    if w8a16:
        return ["_w8a16"]
    if act_terms == 2:  # the extra A tile's shared memory matters more than the weight layout
        return ["_hilo_tiles", "_hilo", "_tiles", ""] if tiles else ["_hilo", ""]
    return ["_tiles", ""] if tiles else [""]


def fp8_configs(config: dict | None, E: int, H: int, I: int, M: int, device: torch.device,
                w8a16: bool = False, act_terms: int = 1, tiles: bool = False) -> tuple[dict, dict, int]:
    """(up config, down config, alignment block = the smaller of their BLOCK_M / SPLIT_M) from the first
    tuned table of table_suffixes(w8a16, act_terms, tiles) that exists (w8a16: ops up_w8a16 / down_w8a16,
    bf16 activations, the up GEMM's output unquantised), else default_config_fp8."""
    cfgs = []
    for op, (n, k) in {"up": (I, H), "down": (H, I)}.items():
        if config is not None:
            c = config[op] if op in config else config
        else:
            dev = _device_name(device)
            names = [config_name(op + sfx, E, n, k, FP8, dev) for sfx in table_suffixes(w8a16, act_terms, tiles)]
            table = next((TABLES[nm] for nm in names if TABLES.get(nm)), None)
            if table:
                lm = math.log(max(M, 1))
                c = table[min(table, key=lambda m: abs(math.log(m) - lm))]
            else:
                _warn_default(names[-1])
                c = default_config_fp8(op, M, E)
        cfgs.append(check_fp8_config(c, quant_out=op == "up" and not w8a16))
    return cfgs[0], cfgs[1], min(c["SPLIT_M"] or c["BLOCK_M"] for c in cfgs)


def _check_fp8_weights(w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor,
                       w2_scale: torch.Tensor, x: torch.Tensor, H: int, tiles: bool = False) -> tuple[int, int]:
    """(E, I) after checking the four weight tensors against x [.., H]; tiles=True also takes both weights in
    the block layout [E, rows/128, cols/128, 128, 128] (kernels.fused_moe_fp8_kernel.tile_weights)."""
    if is_tiled(w13_q) != is_tiled(w2_q) or (is_tiled(w13_q) and not tiles):
        raise ValueError("w13_q and w2_q must both be [E, rows, cols]" + (
            " or both in the block layout [E, rows/128, cols/128, 128, 128]" if tiles else
            " (the block layout of tile_weights runs on fused_moe_fp8's entry points only)"))
    for name, w in (("w13_q", w13_q), ("w2_q", w2_q)):
        if not isinstance(w, torch.Tensor) or w.dim() != (5 if is_tiled(w) else 3):
            raise ValueError(f"{name} must be a 3-dim tensor [E, rows, cols], got {getattr(w, 'shape', w)}")
        if w.dtype != FP8:
            raise TypeError(f"{name} must be float8_e4m3fn (block-scaled FP8 weights), got {w.dtype}; "
                            f"{w.dtype} weights run on kernels.fused_moe")
        if w.device != x.device or not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous on {x.device}, got {w.device}")
    E, I2, H_w = weight_dims(w13_q)
    I = I2 // 2
    if H_w != H or I2 % 2 or weight_dims(w2_q) != (E, H, I):
        raise ValueError(f"w13_q must be [E, 2I, H={H}] and w2_q [E, {H}, I], got {tuple(w13_q.shape)} and "
                         f"{tuple(w2_q.shape)}")
    for dim, size in (("hidden size H", H), ("intermediate size I", I)):
        if size % GROUP:
            raise ValueError(f"{dim}={size} must be a multiple of {GROUP} (the FP8 scale block)")
    for name, s, shape in (("w13_scale", w13_scale, (E, 2 * I // GROUP, H // GROUP)),
                           ("w2_scale", w2_scale, (E, H // GROUP, I // GROUP))):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != shape:
            raise ValueError(f"{name} must be float32 {list(shape)} (one scale per 128 x 128 block), got "
                             f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
        if s.device != x.device or not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous on {x.device}")
    return E, I


def quant_rows(x: torch.Tensor, terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q float8_e4m3fn [M, terms * K], scales float32 [M, K/128]): kernels/fp8_quant.py's
    scheme (scale = amax / 448, 1 for an all-zero group; q = x / scale rounded to nearest even; [hi | lo])."""
    return quant_fp8_groups(x if x.stride(1) == 1 else x.contiguous(), group=GROUP, scale_layout="row",
                            terms=terms)


def check_rows(name: str, rows: object, dim: int, rows_scale: object, act_terms: int = 1) -> torch.Tensor:
    """rows [.., H] in bf16/fp16/fp32 (rows_scale None) or float8_e4m3fn already quantised with rows_scale
    float32 [.., H/128] beside it (any strides; unit stride in the last dim of rows; one-term only)."""
    check_terms(act_terms, "act_terms")
    if act_terms == 2 and isinstance(rows, torch.Tensor) and rows.dtype == FP8:
        raise ValueError(f"act_terms=2 quantises {name} itself: pass bf16/fp16/fp32 {name}, not pre-quantised "
                         f"(one-term) float8_e4m3fn ones")
    if not isinstance(rows, torch.Tensor) or rows.dtype != FP8:
        if rows_scale is not None:
            raise ValueError(f"rows_scale is for float8_e4m3fn {name} only (pre-quantised rows), got {name} "
                             f"{getattr(rows, 'dtype', type(rows).__name__)}")
        return _check_x(name, rows, dim)
    if rows.dim() != dim or rows.stride(-1) != 1:
        raise ValueError(f"{name} must have {dim} dims and unit stride in the last, got {tuple(rows.shape)} "
                         f"strides {rows.stride()}")
    want = (*rows.shape[:-1], rows.shape[-1] // GROUP)
    if not isinstance(rows_scale, torch.Tensor) or rows_scale.dtype != torch.float32 or \
            tuple(rows_scale.shape) != want or rows_scale.device != rows.device:
        raise ValueError(f"float8_e4m3fn {name} need rows_scale float32 {list(want)} on {rows.device} (one "
                         f"scale per row and {GROUP} channels), got {getattr(rows_scale, 'dtype', rows_scale)} "
                         f"{tuple(getattr(rows_scale, 'shape', ()))}")
    if rows.device.type != "cuda" and not runs_interpreted():
        raise ValueError(f"{name} is on {rows.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    return rows


def rows_fp8(rows: torch.Tensor, rows_scale: torch.Tensor | None,
             terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [M, H] -> (fp8 rows [M, terms * H], scales [M, H/128]): quantised here, or the given pair."""
    return (rows, rows_scale) if rows_scale is not None else quant_rows(rows, terms)


def _out_dtype(rows: torch.Tensor, want: torch.dtype | None = None) -> torch.dtype:
    """The output dtype: `want` (bf16/fp16/fp32) when given, else the rows' own, bfloat16 for FP8 rows."""
    if want is not None and want not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {want}")
    return want or (torch.bfloat16 if rows.dtype == FP8 else rows.dtype)


def fp8_ffn_aligned(xq: torch.Tensor, xs: torch.Tensor, align: Alignment, w13_q: torch.Tensor,
                    w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor, up: dict, down: dict,
                    out: torch.Tensor, a_div: int = 1, row_weights: torch.Tensor | None = None,
                    a_index: torch.Tensor | None = None, terms: int = 1) -> torch.Tensor:
    """The two FP8 GEMMs on aligned rows: out [align.num_rows, H] row r = expert(xq[r // a_div] * xs)
    (through a_index when given), times row_weights[r] when given; terms=2: xq and the intermediate are
    two-term. Checks are the callers'."""
    R, I = align.sorted_ids.numel(), weight_dims(w2_q)[2]
    if is_tiled(w13_q):  # the tables' 256-wide TMA tiles span two blocks: pointer loads for those
        up, down = ({**c, "USE_TMA": False} if c["USE_TMA"] and c["BLOCK_N"] > GROUP else c for c in (up, down))
    tables = {c["BLOCK_M"]: block_tables(align, c["BLOCK_M"]) for c in (up, down) if c["BLOCK_M"] > align.block_m}
    inter = torch.empty((R, terms * I), dtype=FP8, device=xq.device)
    inter_scale = torch.empty((R, I // GROUP), dtype=torch.float32, device=xq.device)
    moe_gemm_fp8(xq, xs, w13_q, w13_scale, inter, align, up, gather_a=True, scatter_c=False, a_div=a_div,
                 swiglu=True, out_scale=inter_scale, tables=tables.get(up["BLOCK_M"]), a_index=a_index, terms=terms)
    return moe_gemm_fp8(inter, inter_scale, w2_q, w2_scale, out, align, down, gather_a=False, scatter_c=True,
                        row_weights=row_weights, tables=tables.get(down["BLOCK_M"]), terms=terms)


def fused_moe_fp8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13_q: torch.Tensor,
                  w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor, config: dict | None = None,
                  validate: bool = False, act_terms: int = 1) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H] bf16/fp16/fp32 -> [T, H] in
    x.dtype, with FP8 weights and activations (module docstring; act_terms=2: two-term activations).
    topk_ids [T, k] int32/int64 in [0, E) (validate=True checks it, async on GPUs), topk_weights [T, k]."""
    check_terms(act_terms, "act_terms")
    _check_x("x", x, 2)
    T, H = x.shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, x, H, tiles=True)
    k = check_routing(topk_ids, topk_weights, T, E)
    up, down, bm = fp8_configs(config, E, H, I, T * k, x.device, act_terms=act_terms,
                                tiles=is_tiled(w13_q))
    if T == 0:
        return x.new_zeros((0, H))
    align = moe_align(topk_ids, E, bm, validate=validate)
    xq, xs = quant_rows(x, act_terms)
    row_w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    pairs = fp8_ffn_aligned(xq, xs, align, w13_q, w13_scale, w2_q, w2_scale, up, down,
                            x.new_empty((T * k, H)), a_div=k, row_weights=row_w, terms=act_terms)
    return sum_pairs(pairs, k) if k > 1 else pairs


def fused_moe_fp8_contiguous(rows: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                             w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                             config: dict | None = None, validate: bool = False,
                             rows_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                             act_terms: int = 1) -> torch.Tensor:
    """rows [N, H] sorted by expert (expert e owns counts[e] rows after the previous experts') -> [N, H],
    row i = expert(rows[i]) with FP8 math; no weighting. Rows past sum(counts) are left unwritten.
    Pre-quantised rows: float8_e4m3fn rows with rows_scale [N, H/128]; the output is then bfloat16 (or
    out_dtype: bf16/fp16/fp32, for any rows); act_terms as fused_moe_fp8."""
    check_rows("rows", rows, 2, rows_scale, act_terms)
    N, H = rows.shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, rows, H, tiles=True)
    _check_counts(counts, E)
    up, down, bm = fp8_configs(config, E, H, I, N, rows.device, act_terms=act_terms,
                                tiles=is_tiled(w13_q))
    out = rows.new_empty((N, H), dtype=_out_dtype(rows, out_dtype))
    if N == 0:
        return out
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    xq, xs = rows_fp8(rows, rows_scale, act_terms)
    return fp8_ffn_aligned(xq, xs, align, w13_q, w13_scale, w2_q, w2_scale, up, down, out, terms=act_terms)


def fused_moe_fp8_gathered(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor,
                           w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                           config: dict | None = None, validate: bool = False,
                           rows_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                           act_terms: int = 1) -> torch.Tensor:
    """rows [R, H] token rows, index [N] int32/int64 in [0, R), counts [E] -> [N, H], row i =
    expert(rows[index[i]]): the R rows are quantised once (or come pre-quantised: float8_e4m3fn with
    rows_scale [R, H/128], bfloat16 output) and read through the index. validate=True checks index and
    counts (async on GPUs). Rows past sum(counts) are left unwritten. act_terms as fused_moe_fp8."""
    check_rows("rows", rows, 2, rows_scale, act_terms)
    R, H = rows.shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, rows, H, tiles=True)
    _check_counts(counts, E)
    if _check_ids("index", index, (1,)).device != rows.device:
        raise ValueError(f"index must be on {rows.device} (with the rows), got {index.device}")
    N = index.shape[0]
    up, down, bm = fp8_configs(config, E, H, I, N, rows.device, act_terms=act_terms,
                                tiles=is_tiled(w13_q))
    out = rows.new_empty((N, H), dtype=_out_dtype(rows, out_dtype))
    if N == 0:
        return out
    if validate:
        lo, hi = torch.aminmax(index)
        check_values((lo >= 0) & (hi < R), f"index must lie in [0, {R}) (the rows)")
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    xq, xs = rows_fp8(rows, rows_scale, act_terms)
    return fp8_ffn_aligned(xq, xs, align, w13_q, w13_scale, w2_q, w2_scale, up, down, out,
                           a_index=index.contiguous(), terms=act_terms)


def fused_moe_fp8_masked(x: torch.Tensor, counts: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor,
                         w2_q: torch.Tensor, w2_scale: torch.Tensor, config: dict | None = None,
                         expected_m: int | None = None, validate: bool = False,
                         rows_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                         act_terms: int = 1) -> torch.Tensor:
    """x [E, cap, H], expert e's rows x[e, :counts[e]] -> [E, cap, H]; rows past counts[e] are left
    unwritten. expected_m (rows per expert the caller expects; default cap) picks the config.
    Pre-quantised rows: float8_e4m3fn x with rows_scale [E, cap, H/128] (bfloat16 output). act_terms as
    fused_moe_fp8."""
    check_rows("x", x, 3, rows_scale, act_terms)
    E_x, cap, H = x.shape
    E, I = _check_fp8_weights(w13_q, w13_scale, w2_q, w2_scale, x, H, tiles=True)
    if E_x != E:
        raise ValueError(f"x must be [E={E}, cap, {H}] (one slab per expert), got {tuple(x.shape)}")
    _check_counts(counts, E)
    M = E * (cap if expected_m is None else max(1, expected_m))
    up, down, bm = fp8_configs(config, E, H, I, M, x.device, act_terms=act_terms,
                                tiles=is_tiled(w13_q))
    align = moe_align_masked(counts, cap, bm, validate=validate)
    out = x.new_empty((E, cap, H), dtype=_out_dtype(x, out_dtype))
    if E * cap == 0:
        return out
    if rows_scale is None:
        xq, xs = quant_rows(x.reshape(E * cap, H), act_terms)
    else:  # a comm's strided receive rows stay views where their strides allow
        xq, xs = x.reshape(E * cap, H), rows_scale.reshape(E * cap, H // GROUP)
    fp8_ffn_aligned(xq, xs, align, w13_q, w13_scale, w2_q, w2_scale, up, down, out.view(E * cap, H),
                    terms=act_terms)
    return out
