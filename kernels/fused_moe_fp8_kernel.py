"""Block-scaled FP8 grouped GEMM over aligned expert rows (Triton): DeepSeek-V3's FP8 experts.

Dimension legend: R aligned rows (sorted_ids, padded per expert), E experts, K reduction depth (H for
gate/up, I for down), N output columns (I for gate/up with SwiGLU, H for down), NW weight rows per
expert (2I or H), KG = K // 128 scale groups along K, BM/BN/BK the tile (BK = 128: one scale group per
K step), G = 128 the scale group (DeepSeek-V3's weight blocks are 128 x 128, activations 1 x 128).

Values: A ~= a_q * a_scale (a_q float8_e4m3fn rows, a_scale float32 [rows, KG], one scale per row and
128 columns), W[e] = w_q[e] * w_scale[e] (w_q float8_e4m3fn [E, NW, K], w_scale float32 [E, NW/128, KG],
one scale per 128 x 128 block). Each K step (one scale group) runs tl.dot(a_q, w_q) into a float32
partial and adds partial * a_scale[:, None] * w_scale to the float32 accumulator. A tile with BN <= 128
(BN divides 128, N a multiple of 128) lies inside one 128-row weight block: one scalar w_scale per step;
BN = 256 loads a per-column vector (the tile spans two blocks).

The same block machinery as kernels/fused_moe_kernel.py (moe_align rows, moe_blocks main/tail blocks,
MERGED single launch, GROUP_M ordering, sentinel rows masked and never stored); the epilogues:
- SWIGLU: gate tile (weight rows n) and up tile (rows N + n), silu(gate) * up in float32.
- QUANT_OUT (needs BN = 128): the output rows are quantised per 128 columns to float8_e4m3fn with
  scale = amax / 448 (1 for an all-zero group), written to c (fp8) and c_scale [rows, N / 128] (the
  down GEMM's A). With BN = 128 a row's scale group is exactly one tile's columns, so each program
  owns its groups' amax (BN < 128 would split a group across programs). Values are rounded onto the
  e4m3 grid in float32 (kernels/fp8_quant.py's scheme and rounding, bit for bit the same as
  quant_fp8_groups on the same float32 values) before the conversion, which is then exact.
- MUL_WEIGHT (row_weights[row id]) and SCATTER_C (store to the row id, i.e. (token, k) order) as the
  bf16 kernel; otherwise the output rounds to c's dtype.
Gathered A rows (A_DIV, A_INDEX) read the row and its scales through the same index.
On sm_90 Triton's fp8 dot accumulates with Hopper's reduced-precision fp8 MMA inside one 128-deep step
(its default); each step's partial is promoted into the float32 accumulator, as DeepGEMM does.
USE_TMA loads the weight tiles through a TensorDescriptor over W seen as [E*NW, K] (as the bf16 kernel);
A_TMA is refused. K_STEPS (1, 2 or 4; K a multiple of 128 * K_STEPS) unrolls that many scale groups per
loop iteration: more tile loads in flight per step, for the weight-bound decode sizes. A_TERMS and SWAP_AB
(the two-term activations and the swapped MMA) are kernels/fused_moe_fp8_tile.py's. Launches go through
kernels.launch.Launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.fp8_quant import check_terms
from nanomoe_kernels.fused_moe_fp8_tile import _fp8_tile
from nanomoe_kernels.fused_moe_kernel import _tma_descriptor, check_config, runs_interpreted
from nanomoe_kernels.launch import Launcher
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_blocks import BlockTables, block_tables

GROUP = 128  # the scale group (the tile's _GROUP)


# token counts change every step: do not compile a variant per divisibility of these two
@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def _moe_gemm_fp8_kernel(
    a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, w_ptr, sorted_ids_ptr, block_rows_ptr,
    block_experts_ptr, used_ptr, a_index_ptr,
    num_rows, N, K, num_blocks, align_m, stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
    stride_bsn, stride_cm, stride_csm, stride_csk,
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, A_INDEX: tl.constexpr, SCATTER_C: tl.constexpr,
    SWIGLU: tl.constexpr, MUL_WEIGHT: tl.constexpr, QUANT_OUT: tl.constexpr, USE_TMA: tl.constexpr,
    K_STEPS: tl.constexpr, A_FP8: tl.constexpr, A_TERMS: tl.constexpr, SWAP_AB: tl.constexpr,
    W_TILES: tl.constexpr, BLOCK_TABLE: tl.constexpr,
    MERGED: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    if MERGED:  # moe_blocks' merged list: used = (main, tail) counts; code = expert | is_tail << 30
        if pid_m >= tl.load(used_ptr) + tl.load(used_ptr + 1):
            return
        row0 = tl.load(block_rows_ptr + pid_m)
        code = tl.load(block_experts_ptr + pid_m)
        expert = (code & 0x3FFFFFFF).to(tl.int64)
        if code >= 0x40000000:
            _fp8_tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0,
                      expert, pid_n, num_rows, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                      stride_bse, stride_bsn, stride_cm, stride_csm, stride_csk, A_DIV, GATHER_A, A_INDEX,
                      SCATTER_C, SWIGLU, MUL_WEIGHT, QUANT_OUT, USE_TMA, K_STEPS, A_FP8, A_TERMS, SWAP_AB,
                      W_TILES, TAIL_M, BLOCK_N, BLOCK_K)
        else:
            _fp8_tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0,
                      expert, pid_n, num_rows, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn,
                      stride_bse, stride_bsn, stride_cm, stride_csm, stride_csk, A_DIV, GATHER_A, A_INDEX,
                      SCATTER_C, SWIGLU, MUL_WEIGHT, QUANT_OUT, USE_TMA, K_STEPS, A_FP8, A_TERMS, SWAP_AB,
                      W_TILES, BLOCK_M, BLOCK_N, BLOCK_K)
        return
    if BLOCK_TABLE:  # block pid_m starts at aligned row block_rows[pid_m]; used = blocks in use
        if pid_m >= tl.load(used_ptr):
            return
        row0 = tl.load(block_rows_ptr + pid_m)
        expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    else:  # block pid_m is aligned rows pid_m * BLOCK_M ..; used = num_padded, block_experts = expert_ids
        row0 = pid_m * BLOCK_M
        if row0 >= tl.load(used_ptr):
            return
        if tl.load(sorted_ids_ptr + row0) >= num_rows:  # all padding (BLOCK_M < align_m)
            return
        expert = tl.load(block_experts_ptr + row0 // align_m).to(tl.int64)
    _fp8_tile(a_ptr, as_ptr, b_ptr, b_desc, bs_ptr, c_ptr, cs_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0, expert,
              pid_n, num_rows, N, K, stride_am, stride_asm, stride_ask, stride_be, stride_bn, stride_bse,
              stride_bsn, stride_cm, stride_csm, stride_csk, A_DIV, GATHER_A, A_INDEX, SCATTER_C, SWIGLU,
              MUL_WEIGHT, QUANT_OUT, USE_TMA, K_STEPS, A_FP8, A_TERMS, SWAP_AB, W_TILES, BLOCK_M, BLOCK_N,
              BLOCK_K)


_launch = Launcher(_moe_gemm_fp8_kernel)


def check_fp8_config(config: dict, quant_out: bool = False) -> dict:
    """kernels.fused_moe_kernel.check_config plus the FP8 kernel's limits: BLOCK_K = 128 (one scale group
    per K step), BLOCK_N <= 256 (one or two weight blocks per tile), BLOCK_N = 128 when the output is
    quantised (a row's scale group must be one program's columns), no A_TMA or PERMUTE_A; K_STEPS
    (default 1) and SWAP_AB (default False) added."""
    cfg = check_config(config, extra_keys=("K_STEPS", "SWAP_AB"))
    if cfg["BLOCK_K"] != GROUP:
        raise ValueError(f"config['BLOCK_K'] must be {GROUP} for FP8 (one scale group per K step), "
                         f"got {cfg['BLOCK_K']}")
    if cfg["BLOCK_N"] > 2 * GROUP or (quant_out and cfg["BLOCK_N"] != GROUP):
        want = f"{GROUP} (the quantised output's scale group)" if quant_out else f"<= {2 * GROUP}"
        raise ValueError(f"config['BLOCK_N'] must be {want} for FP8, got {cfg['BLOCK_N']}")
    if cfg["A_TMA"] or cfg["PERMUTE_A"]:
        raise ValueError("config: A_TMA and PERMUTE_A are not implemented by the FP8 kernel (USE_TMA, for the "
                         "weights, is)")
    steps = config.get("K_STEPS", 1)
    if steps not in (1, 2, 4) or isinstance(steps, bool):
        raise ValueError(f"config['K_STEPS'] (scale groups per K iteration) must be 1, 2 or 4, got {steps!r}")
    return {**cfg, "K_STEPS": int(steps), "SWAP_AB": bool(config.get("SWAP_AB", False))}


def tile_weights(w: torch.Tensor) -> torch.Tensor:
    """FP8 weights [E, NW, K] (NW, K multiples of 128) -> the block layout [E, NW/128, K/128, 128, 128],
    contiguous: each 128 x 128 weight block's 16 KB in one run (the kernels' W_TILES; same math, faster
    streaming at decode). untile_weights inverts it."""
    if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[1] % GROUP or w.shape[2] % GROUP:
        raise ValueError(f"w must be [E, NW, K] with NW and K multiples of {GROUP}, got "
                         f"{tuple(getattr(w, 'shape', ()))}")
    E, NW, K = w.shape
    return w.reshape(E, NW // GROUP, GROUP, K // GROUP, GROUP).permute(0, 1, 3, 2, 4).contiguous()


def untile_weights(t: torch.Tensor) -> torch.Tensor:
    """The block layout [E, NWb, KG, 128, 128] back to rows [E, NWb * 128, KG * 128] (contiguous)."""
    if not is_tiled(t):
        raise ValueError(f"t must be [E, NW/128, K/128, 128, 128], got {tuple(getattr(t, 'shape', ()))}")
    E, NWb, KG = t.shape[:3]
    return t.permute(0, 1, 3, 2, 4).reshape(E, NWb * GROUP, KG * GROUP)


def is_tiled(w: object) -> bool:
    """w is FP8 weights in the block layout [E, NW/128, K/128, 128, 128]."""
    return isinstance(w, torch.Tensor) and w.dim() == 5 and tuple(w.shape[3:]) == (GROUP, GROUP)


def weight_dims(w: torch.Tensor) -> tuple[int, int, int]:
    """(E, NW, K) of FP8 weights in either layout."""
    if is_tiled(w):
        return int(w.shape[0]), int(w.shape[1]) * GROUP, int(w.shape[2]) * GROUP
    return tuple(int(d) for d in w.shape)


def _check_scale(name: str, s: torch.Tensor, shape: tuple[int, ...], contiguous: bool = False) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != shape:
        raise ValueError(f"{name} must be float32 {list(shape)}, got {getattr(s, 'dtype', type(s).__name__)} "
                         f"{tuple(getattr(s, 'shape', ()))}")
    if contiguous and not s.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def moe_gemm_fp8(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor,
                 out: torch.Tensor, align: Alignment, config: dict, *, gather_a: bool, scatter_c: bool,
                 a_div: int = 1, swiglu: bool = False, row_weights: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None, tables: BlockTables | None = None,
                 a_index: torch.Tensor | None = None, terms: int = 1) -> torch.Tensor:
    """out[rows] = epilogue((a * a_scale)[rows] @ (w * w_scale)[expert].T) over the aligned rows.

    a float8_e4m3fn [*, K] (unit stride in K), a_scale float32 [a rows, K/128] (any strides); or W8A16: a
    bf16/fp16 [*, K] with a_scale None (each weight tile dequantised to a's dtype, no activation scales). w
    float8_e4m3fn [E, NW, K] and w_scale float32 [E, NW/128, K/128], both contiguous, K and NW multiples
    of 128. out [*, N] (N = NW / 2 with swiglu): float8_e4m3fn with out_scale float32 [out rows, N/128]
    (quantised output), else bf16/fp16/fp32. Gathering, scattering, row_weights, tables and a_index as
    kernels.fused_moe_kernel.moe_gemm. terms=2 (FP8 a only): a is [*, 2K], each row [hi | lo] with a
    value (hi + lo) * a_scale (kernels/fp8_quant.py's two-term scheme), and a quantised out is [*, 2N]
    written the same way. w may also be in the block layout [E, NW/128, K/128, 128, 128] (tile_weights;
    TMA configs then need BLOCK_N <= 128). Returns out.
    """
    fp8 = torch.float8_e4m3fn
    cfg = check_fp8_config(config, quant_out=out_scale is not None)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiled = is_tiled(w)
    if not isinstance(w, torch.Tensor) or w.dtype != fp8 or w.dim() != (5 if tiled else 3) or not w.is_contiguous():
        raise ValueError(f"w must be a contiguous float8_e4m3fn [E, NW, K] (or its [E, NW/128, K/128, 128, 128] "
                         f"blocks), got {getattr(w, 'dtype', w)} {tuple(getattr(w, 'shape', ()))}")
    E, NW, K = weight_dims(w)
    if tiled and cfg["USE_TMA"] and bn > GROUP:
        raise ValueError(f"config USE_TMA with block-layout weights needs BLOCK_N <= {GROUP}, got {bn}")
    N = NW // 2 if swiglu else NW
    if K % GROUP or N % GROUP or (swiglu and NW % 2):
        raise ValueError(f"w [E, NW={NW}, K={K}] needs K and the output columns N={N} to be multiples of {GROUP}")
    if K % (GROUP * cfg["K_STEPS"]):
        raise ValueError(f"config K_STEPS={cfg['K_STEPS']} needs K={K} to be a multiple of {GROUP * cfg['K_STEPS']}")
    _check_scale("w_scale", w_scale, (E, NW // GROUP, K // GROUP), contiguous=True)
    check_terms(terms)
    if terms == 2 and a_scale is None:
        raise ValueError("terms=2 (two-term activations) needs FP8 a with a_scale, not W8A16")
    if cfg["SWAP_AB"] and a_scale is None:
        raise ValueError("config SWAP_AB is implemented for FP8 activations (with a_scale), not W8A16")
    want = (fp8,) if a_scale is not None else (torch.bfloat16, torch.float16)
    if not isinstance(a, torch.Tensor) or a.dtype not in want or a.dim() != 2 or a.shape[1] != terms * K or \
            a.stride(1) != 1:
        raise ValueError(f"a must be {' or '.join(str(d) for d in want)} [rows, {terms * K}] with unit stride "
                         f"in K ({'with' if a_scale is not None else 'without'} a_scale), got "
                         f"{getattr(a, 'dtype', a)} {tuple(getattr(a, 'shape', ()))}")
    if a_scale is not None:
        _check_scale("a_scale", a_scale, (a.shape[0], K // GROUP))
    n_out = terms * N if out_scale is not None else N
    if out.dim() != 2 or out.shape[1] != n_out or out.stride(1) != 1:
        raise ValueError(f"out must be [rows, {n_out}] with unit stride in its last dim, got {tuple(out.shape)}")
    if out_scale is not None:
        if out.dtype != fp8:
            raise ValueError(f"out must be float8_e4m3fn when out_scale is given, got {out.dtype}")
        _check_scale("out_scale", out_scale, (out.shape[0], N // GROUP))
    elif out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out must be bf16/fp16/fp32 (or float8_e4m3fn with out_scale), got {out.dtype}")
    tm, R, num_rows = align.block_m, align.sorted_ids.numel(), align.num_rows
    if (tm % bm if bm <= tm else bm % tm) or align.expert_ids.numel() != R // tm:
        raise ValueError(f"BLOCK_M={bm} and the alignment block {tm} must divide one another")
    if not gather_a and a.shape[0] < R:
        raise ValueError(f"a must hold all {R} aligned rows when it is not gathered, got {a.shape[0]}")
    if a_index is not None and (not gather_a or a_index.dim() != 1 or a_index.dtype not in (torch.int32, torch.int64)
                                or not a_index.is_contiguous() or a_index.numel() * a_div < num_rows):
        raise ValueError(f"a_index must be a contiguous int32/int64 [>= {-(-num_rows // a_div)}] with gather_a")
    if row_weights is not None and (row_weights.dtype != torch.float32 or row_weights.numel() < num_rows):
        raise ValueError(f"row_weights must be float32 with {num_rows} entries, got {row_weights.dtype}")
    if R == 0:
        return out
    # placeholders for the pointers a constexpr switches off: the launch takes tensors and ints only
    a_s = a_scale if a_scale is not None else w_scale
    os_ = out_scale if out_scale is not None else a_s
    rw = row_weights if row_weights is not None else a_s
    ai = a_index if a_index is not None else align.sorted_ids
    merged = cfg["MERGE_TAIL"] and bm > tm
    # weights through TMA: W seen as [E * NW, K] (or its blocks' rows, [E * NW * K / 128, 128]): fp8 rows of
    # K (or 128) bytes, 16-byte aligned
    w_rows = w.numel() // w.shape[-1]
    desc = _tma_descriptor(w, w_rows, bn, bk) if cfg["USE_TMA"] and (w.is_cuda or runs_interpreted()) else None

    def launch(block_m: int, rows: torch.Tensor | None, experts: torch.Tensor, used: torch.Tensor,
               num_blocks: int) -> None:
        """num_blocks blocks of block_m rows (a static grid; unused blocks exit at once)."""
        if num_blocks == 0:
            return
        _launch(
            (num_blocks * triton.cdiv(N, bn),), a, a_s, w, desc, w_scale, out, os_, rw, align.sorted_ids,
            align.sorted_ids if rows is None else rows, experts, used, ai,
            num_rows, N, K, num_blocks, tm, a.stride(0), a_s.stride(0), a_s.stride(-1), w.stride(0),
            w.stride(1), w_scale.stride(0), w_scale.stride(1), out.stride(0), os_.stride(0), os_.stride(1),
            A_DIV=a_div, GATHER_A=gather_a, A_INDEX=a_index is not None, SCATTER_C=scatter_c, SWIGLU=swiglu,
            MUL_WEIGHT=row_weights is not None, QUANT_OUT=out_scale is not None,
            USE_TMA=desc is not None, W_TILES=tiled,
            K_STEPS=cfg["K_STEPS"], A_FP8=a_scale is not None, A_TERMS=terms, SWAP_AB=cfg["SWAP_AB"],
            BLOCK_TABLE=rows is not None,
            MERGED=merged and block_m == bm, TAIL_M=tm, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    if bm <= tm:
        launch(bm, None, align.expert_ids, align.num_padded, R // bm)
        return out
    if tables is None:
        tables = block_tables(align, bm)
    if (tables.block_m, tables.tail_m) != (bm, tm):
        raise ValueError(f"tables are for blocks of {tables.block_m}/{tables.tail_m} rows, need {bm}/{tm}")
    if merged:
        launch(bm, tables.merged_rows, tables.merged_codes, tables.counts, tables.merged_rows.numel())
        return out
    launch(bm, tables.main_rows, tables.main_experts, tables.counts[0:1], tables.main_rows.numel())
    launch(tm, tables.tail_rows, tables.tail_experts, tables.counts[1:2], tables.tail_rows.numel())
    return out
