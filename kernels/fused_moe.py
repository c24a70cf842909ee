"""Triton fused MoE expert FFN: align rows per expert, then one or two grouped GEMMs with fused epilogues.

Dimension legend: T tokens, k experts per token, H hidden, I expert intermediate, E experts,
N rows of a batch (T*k pairs for the unsorted entry), cap rows per expert in the masked layout,
R aligned rows (kernels.moe_align), M the row count a tuned config is looked up by, G token rows a
gathered batch reads through its index.

Weights: SwiGLU (w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]) or linear ((w [E, H_out, H],),
no bias). SwiGLU runs GEMM "up" (gate and up tiles of the same columns, silu(gate) * up in float32,
rounded to the input dtype: [R, I]) then GEMM "down" ([R, I] -> the rows' own places); linear is one
GEMM ("linear"). Entry points by layout:
- `fused_moe(x [T, H], topk_ids [T, k], topk_weights [T, k])`: x unsorted; rows are the (token, k)
  pairs; the down GEMM scales each pair by its top-k weight and writes [T*k, H] in pair order; a
  sum over k gives [T, H] (the whole MoE expert FFN, what reference.moe_experts computes).
- `fused_moe_contiguous(rows [N, H] sorted by expert, counts [E]) -> [N, H]`: no weighting.
- `fused_moe_gathered(rows [G, H], index [N], counts [E]) -> [N, H]`: as contiguous with batch row i
  = rows[index[i]]; the first GEMM loads its A rows through the index (no [N, H] copy).
- `fused_moe_masked(x [E, cap, H], counts [E]) -> [E, cap, H]`: decode's masked layout.
Rows that no expert owns (past sum(counts), or past counts[e] in the masked layout) are not written.

Block configs come from kernels/tuned/*.json, one file per (op, E, N, K, dtype, GPU name) with entries keyed by M;
the nearest M (in log scale) wins. The directory is read once, when this module is imported (`TABLES`), so a
forward only looks up a dict; a missing table borrows the nearest tuned expert count's at the same rows per
expert, or falls back to `default_config` with a warning once per table name. `config=`: a flat dict for every
GEMM or {"up"/"down"/"linear": dict}; keys BLOCK_M/N/K, GROUP_M, num_warps, num_stages, USE_TMA (weights by TMA),
SPLIT_M (experts padded to SPLIT_M rows: BLOCK_M blocks + SPLIT_M-row tails; 0 = pad to BLOCK_M), WGMMA, STAGE_C,
EXPERT_GROUPS, SWAP (Hopper kernels; kernels/fused_moe_kernel.check_config).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import warnings
from collections.abc import Mapping
from types import MappingProxyType

import torch
from nanomoe_kernels.checks import check_routing, check_values
from nanomoe_kernels.fused_moe_kernel import check_config, moe_gemm, runs_interpreted
from nanomoe_kernels.moe_align import Alignment, _check_ids, moe_align, moe_align_contiguous, moe_align_masked
from nanomoe_kernels.moe_blocks import block_tables
from nanomoe_kernels.moe_permute import permute_rows
from nanomoe_kernels.moe_sum import sum_pairs
from nanomoe_kernels.moe_swap_blocks import swap_blocks

EXPERT_TYPES = ("swiglu", "linear")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TUNED_DIR = pathlib.Path(__file__).resolve().parent / "tuned"


def config_name(op: str, E: int, N: int, K: int, dtype: torch.dtype, device_name: str) -> str:
    """File name of the tuned table for one GEMM: op in up/down/linear, N output cols, K depth."""
    dev = device_name.replace(" ", "_")
    return f"E={E},N={N},K={K},op={op},dtype={str(dtype).replace('torch.', '')},device={dev}.json"


def load_tables(directory: pathlib.Path) -> Mapping[str, dict[int, dict]]:
    """Every tuned table in `directory`: file name -> {M: checked config} (read-only mapping)."""
    tables = {}
    for path in sorted(directory.glob("*.json")):
        raw = json.loads(path.read_text())
        check = check_config
        if "dtype=float8_e4m3fn" in path.name:  # the FP8 kernel's tables keep its own keys (K_STEPS)
            from nanomoe_kernels.fused_moe_fp8_kernel import check_fp8_config

            quant_out = ",op=up," in path.name
            check = lambda c, q=quant_out: check_fp8_config(c, quant_out=q)  # noqa: E731
        tables[path.name] = {int(m): check(c) for m, c in raw.items() if not m.startswith("_")}
    return MappingProxyType(tables)


# read at import, never in a forward; bench/tune_fused_moe.py writes new tables for the next process
TABLES = load_tables(TUNED_DIR)


@functools.cache
def _warn_default(name: str) -> None:
    warnings.warn(f"kernels.fused_moe: no tuned config {TUNED_DIR / name}; using default_config "
                  f"(run bench/tune_fused_moe.py on this GPU)", stacklevel=3)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_config(op: str, M: int, E: int) -> dict:
    """Fallback tile for a GEMM with M rows over E experts: the H200 winners of bench/tune_fused_moe.py
    (bench/results/expert_ffn_notes.md) by rows per expert; they assume Hopper's ~227 KB of shared
    memory per block (run the tuner on other GPUs)."""
    per_expert = M / max(E, 1)
    up = op == "up"  # two weight tiles (gate, up) per step, so half the columns of the other GEMMs
    if per_expert <= 8:
        return dict(BLOCK_M=16, BLOCK_N=64 if up else 128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=128 if up else 256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128 if up else 256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4,
                SPLIT_M=64 if per_expert >= 128 else 0)


# get_config's cost of borrowing another expert count's entry, per unit of |log(E' / E)| (rows per expert
# being equal): a tuned entry for E itself wins unless its rows per expert are ~10% further off
_OTHER_E_COST = 0.1


def get_config(op: str, E: int, N: int, K: int, dtype: torch.dtype, M: int, device: torch.device) -> dict:
    """The tuned config nearest in rows per expert (M / E, log scale) over this GEMM's tables on this device:
    E's own, and those of other expert counts E' (powers of two) at the same rows per expert, a little
    dearer (_OTHER_E_COST), since the tile follows the rows per expert. So a table tuned at prefill sizes
    only does not hand its tiles to decode sizes that another table covers. No table: `default_config`."""
    dev = _device_name(device)
    key = (op, E, N, K, dtype, dev, M)
    if _NEAREST[0] is not TABLES:  # a memo per TABLES object (tests swap the tables)
        _NEAREST[:] = [TABLES, {}]
    if key not in _NEAREST[1]:
        _NEAREST[1][key] = _nearest_config(op, E, N, K, dtype, dev, M)
    return _NEAREST[1][key]


_NEAREST: list = [None, {}]  # [the TABLES it was computed from, {get_config's arguments: config}]


def _nearest_config(op: str, E: int, N: int, K: int, dtype: torch.dtype, dev: str, M: int) -> dict:
    rows = math.log(max(M, 1) / max(E, 1))
    best, best_d = None, math.inf
    for e in sorted({E, *(2 ** i for i in range(11))}):
        table = TABLES.get(config_name(op, e, N, K, dtype, dev))
        for m, cfg in (table or {}).items():
            d = abs(math.log(m / e) - rows) + _OTHER_E_COST * abs(math.log(e / max(E, 1)))
            if d < best_d:
                best, best_d = cfg, d
    if best is None:
        _warn_default(config_name(op, E, N, K, dtype, dev))
        return check_config(default_config(op, M, E))
    return best


def _check_weights(weights: object, expert_type: str, x: torch.Tensor, H: int) -> tuple[int, int, int]:
    """(E, I, H_out) after checking the weights against x [.., H]."""
    if expert_type not in EXPERT_TYPES:
        raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
    want = 2 if expert_type == "swiglu" else 1
    if not isinstance(weights, (tuple, list)) or len(weights) != want:
        raise ValueError(f"weights must be a tuple of {want} tensor(s) for {expert_type!r} experts")
    names = ("w13", "w2") if expert_type == "swiglu" else ("w",)
    for name, w in zip(names, weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            raise ValueError(f"{name} must be a 3-dim tensor [E, rows, cols], got {getattr(w, 'shape', w)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"{name} must match x ({x.dtype} on {x.device}), got {w.dtype} on {w.device}")
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    E = weights[0].shape[0]
    if expert_type == "linear":
        if weights[0].shape[2] != H:
            raise ValueError(f"w must be [E, H_out, {H}], got {tuple(weights[0].shape)}")
        return E, 0, weights[0].shape[1]
    w13, w2 = weights
    I2 = w13.shape[1]
    if w13.shape[2] != H or I2 % 2 or tuple(w2.shape) != (E, H, I2 // 2):
        raise ValueError(f"w13 must be [E, 2I, {H}] and w2 [E, {H}, I], got {tuple(w13.shape)} and "
                         f"{tuple(w2.shape)}")
    return E, I2 // 2, H


def _check_x(name: str, x: object, dim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.device.type != "cuda" and not runs_interpreted():
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need CUDA tensors, or "
                         f"TRITON_INTERPRET=1 set before kernels/ is imported")
    return x


def stage_configs(config: dict | None, expert_type: str, E: int, H: int, I: int, H_out: int,
                  dtype: torch.dtype, M: int, device: torch.device) -> tuple[dict, dict | None, int]:
    """(first GEMM config, down config or None, alignment block): rows are padded per expert to the
    smallest of the GEMMs' BLOCK_M and SPLIT_M, so a GEMM with a larger BLOCK_M runs full blocks plus
    tail blocks of that size (kernels.moe_blocks) instead of padding every expert to its BLOCK_M."""
    ops = {"up": (I, H), "down": (H, I)} if expert_type == "swiglu" else {"linear": (H_out, H)}
    cfgs = []
    for op, (n, k) in ops.items():
        if config is None:
            cfgs.append(get_config(op, E, n, k, dtype, M, device))
        else:
            cfgs.append(check_config(config[op] if op in config else config))
    first, down = cfgs[0], (cfgs[1] if len(cfgs) > 1 else None)
    return first, down, min(c["SPLIT_M"] or c["BLOCK_M"] for c in cfgs)


def fused_moe_aligned(a: torch.Tensor, align: Alignment, weights: tuple[torch.Tensor, ...], expert_type: str,
                      first: dict, down: dict | None, a_div: int = 1, row_weights: torch.Tensor | None = None,
                      out: torch.Tensor | None = None, a_index: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMMs on already aligned rows: out [align.num_rows, H_out], row r = expert(a[r // a_div])
    (expert(a[a_index[r // a_div]]) with a_index), scaled by row_weights[r] when given. Checks are the
    caller's (the public wrappers)."""
    w = weights
    out = a.new_empty((align.num_rows, w[-1].shape[1])) if out is None else out
    tables = {}   # one block table per BLOCK_M above the alignment block (SWAP: its block list), made once
    for c in (first, down):
        if c is not None and (c["BLOCK_M"] > align.block_m or c["SWAP"]) and c["BLOCK_M"] not in tables:
            tables[c["BLOCK_M"]] = swap_blocks(align) if c["SWAP"] else block_tables(align, c["BLOCK_M"])
    if expert_type == "linear":
        return moe_gemm(a, w[0], out, align, first, gather_a=True, scatter_c=True, a_div=a_div,
                        row_weights=row_weights, tables=tables.get(first["BLOCK_M"]), a_index=a_index)
    inter = a.new_empty((align.sorted_ids.numel(), w[0].shape[1] // 2))
    if first["PERMUTE_A"]:  # rows copied into aligned order first, so the up GEMM loads A tiles through TMA
        a_sorted, _ = permute_rows(a, align, a_div=a_div, a_index=a_index)
        moe_gemm(a_sorted, w[0], inter, align, {**first, "A_TMA": True}, gather_a=False, scatter_c=False,
                 swiglu=True, tables=tables.get(first["BLOCK_M"]))
    else:
        moe_gemm(a, w[0], inter, align, first, gather_a=True, scatter_c=False, a_div=a_div, swiglu=True,
                 tables=tables.get(first["BLOCK_M"]), a_index=a_index)
    return moe_gemm(inter, w[1], out, align, down, gather_a=False, scatter_c=True, row_weights=row_weights,
                    tables=tables.get(down["BLOCK_M"]))


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              weights: tuple[torch.Tensor, ...], expert_type: str = "swiglu", config: dict | None = None,
              validate: bool = False) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H] -> [T, H_out] in x.dtype.

    topk_ids [T, k] int32/int64, topk_weights [T, k] float. Ids outside [0, E) are an error with
    validate=True (async on GPUs); otherwise their rows are undefined.
    """
    _check_x("x", x, 2)
    T, H = x.shape
    E, I, H_out = _check_weights(weights, expert_type, x, H)
    k = check_routing(topk_ids, topk_weights, T, E)
    if x.stride(1) != 1:
        x = x.contiguous()
    first, down, bm = stage_configs(config, expert_type, E, H, I, H_out, x.dtype, T * k, x.device)
    if T == 0:
        return x.new_zeros((0, H_out))
    align = moe_align(topk_ids, E, bm, validate=validate)
    row_w = topk_weights.reshape(-1).to(torch.float32).contiguous()
    pairs = fused_moe_aligned(x, align, weights, expert_type, first, down, a_div=k, row_weights=row_w)
    return sum_pairs(pairs, k) if k > 1 else pairs


def _check_counts(counts: object, E: int) -> torch.Tensor:
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1 or counts.shape[0] != E:
        raise ValueError(f"counts must be a 1-dim tensor with one entry per expert ({E}), got "
                         f"{getattr(counts, 'shape', counts)}")
    return counts


def fused_moe_contiguous(rows: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                         expert_type: str = "swiglu", config: dict | None = None,
                         validate: bool = False) -> torch.Tensor:
    """rows [N, H] sorted by expert (expert e owns counts[e] rows after the previous experts') ->
    [N, H_out], row i = expert(rows[i]); no weighting. Rows past sum(counts) are left unwritten."""
    _check_x("rows", rows, 2)
    N, H = rows.shape
    E, I, H_out = _check_weights(weights, expert_type, rows, H)
    _check_counts(counts, E)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    first, down, bm = stage_configs(config, expert_type, E, H, I, H_out, rows.dtype, N, rows.device)
    if N == 0:
        return rows.new_empty((0, H_out))
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    return fused_moe_aligned(rows, align, weights, expert_type, first, down)


def fused_moe_gathered(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
                       weights: tuple[torch.Tensor, ...], expert_type: str = "swiglu", config: dict | None = None,
                       validate: bool = False) -> torch.Tensor:
    """rows [G, H] token rows, index [N] int32/int64 in [0, G), counts [E] (expert e owns batch rows
    offsets[e] .. offsets[e] + counts[e]) -> [N, H_out], row i = expert(rows[index[i]]), as
    fused_moe_contiguous on rows[index] without making it. validate=True checks the index and counts
    (async on GPUs); otherwise an index out of range is undefined. Rows past sum(counts) are unwritten."""
    _check_x("rows", rows, 2)
    G, H = rows.shape
    E, I, H_out = _check_weights(weights, expert_type, rows, H)
    _check_counts(counts, E)
    if _check_ids("index", index, (1,)).device != rows.device:
        raise ValueError(f"index must be on {rows.device} (with the rows), got {index.device}")
    N = index.shape[0]
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    first, down, bm = stage_configs(config, expert_type, E, H, I, H_out, rows.dtype, N, rows.device)
    if N == 0:
        return rows.new_empty((0, H_out))
    if validate:
        lo, hi = torch.aminmax(index)
        check_values((lo >= 0) & (hi < G), f"index must lie in [0, {G}) (the rows)")
    align = moe_align_contiguous(counts, N, bm, validate=validate)
    return fused_moe_aligned(rows, align, weights, expert_type, first, down, a_index=index.contiguous())


def fused_moe_masked(x: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                     expert_type: str = "swiglu", config: dict | None = None, expected_m: int | None = None,
                     validate: bool = False) -> torch.Tensor:
    """x [E, cap, H], expert e's rows x[e, :counts[e]] -> [E, cap, H_out]; rows past counts[e] are left
    unwritten. expected_m (rows per expert the caller expects; default cap) picks the tuned config."""
    _check_x("x", x, 3)
    E_x, cap, H = x.shape
    E, I, H_out = _check_weights(weights, expert_type, x, H)
    if E_x != E:
        raise ValueError(f"x must be [E={E}, cap, {H}] (one slab per expert), got {tuple(x.shape)}")
    _check_counts(counts, E)
    flat = x.reshape(E * cap, H)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    M = E * (cap if expected_m is None else max(1, expected_m))
    first, down, bm = stage_configs(config, expert_type, E, H, I, H_out, x.dtype, M, x.device)
    align = moe_align_masked(counts, cap, bm, validate=validate)
    out = x.new_empty((E, cap, H_out))
    if E * cap == 0:
        return out
    fused_moe_aligned(flat, align, weights, expert_type, first, down, out=out.view(E * cap, H_out))
    return out
