"""Grouped GEMM over aligned expert rows (Triton), with the MoE epilogues fused.

Dimension legend: R aligned rows (sorted_ids, padded per expert to align_m), NB = R // BLOCK_M row
blocks, E experts, K reduction depth (H for gate/up and linear, I for down), N output columns
(I for gate/up with SwiGLU, H otherwise), NW = weight rows per expert (2I for gate/up, else N),
BM/BN/BK the tile (BLOCK_M x BLOCK_N output tile, BLOCK_K deep steps).

One program computes a BM x BN output tile of one row block: every row of a block belongs to one
expert (the alignment guarantees it), so the tile is A[rows of the block, :] @ W[expert, cols, :].T.
- A rows: gathered through sorted_ids (row id // A_DIV: A_DIV = top-k maps a (token, k) pair to its
  token) or, for the second GEMM, the aligned row position itself (the first GEMM's output).
  A_INDEX (with GATHER_A): one more hop, A row = a_index[row id // A_DIV] (a gathered batch: batch row
  m reads token row a_index[m]); padding rows load no index and stay masked.
- SWIGLU: the program loads the gate tile (rows n) and the up tile (rows I + n) of the same output
  columns and writes silu(gate) * up in float32 rounded to the output dtype: [rows, I], no [rows, 2I].
- C rows: scattered to the row id (back to (token, k) order or the batch's own row) or the aligned
  position; MUL_WEIGHT scales each row by row_weights[row id] (the top-k weight) before rounding.
- Padding rows (sentinel ids) read zeros and are never stored. Blocks at or past num_padded exit at
  once, so the grid is a static upper bound (CUDA-graph capturable).
- BLOCK_TABLE: blocks come from kernels.moe_blocks (first row and expert per block) instead of
  row pid_m * BLOCK_M of the alignment: BLOCK_M-row main blocks and align-block-row tail blocks,
  so an expert pays for at most align_m - 1 padding rows rather than BLOCK_M - 1.
- USE_TMA loads weight tiles with a host TensorDescriptor over W seen as [E*NW, K] (tiles past an
  expert's rows land in masked-out columns; past the tensor, TMA fills zeros). A_TMA does the same for
  A when A is not gathered (the down GEMM's aligned [R, I] rows; padding rows are masked at the store).
- MERGED: one launch over moe_blocks' merged list (per expert: main blocks, then its tail block), so
  a tail tile (TAIL_M rows) runs next to the main tiles that read the same weights and L2 serves it;
  two launches would read the weights of every expert with a tail twice from HBM. PAIR_TAILS: a tail program
  covers two column tiles, so it walks K at its main blocks' pace (kernels/moe_gemm_tile.py).
Programs are ordered GROUP_M row blocks at a time for each column tile, so the row blocks of one
expert (consecutive) share the weight tile through L2. MERGED with EXPERT_GROUP > 0 (config EXPERT_GROUPS): groups
of one expert's blocks only (kernels.moe_blocks.expert_group), so no expert's weights stream twice from HBM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.fused_moe_swap import moe_gemm_swap
from nanomoe_kernels.fused_moe_swap import unsupported as swap_unsupported
from nanomoe_kernels.fused_moe_wgmma import moe_gemm_wgmma, unsupported
from nanomoe_kernels.moe_align import Alignment
from nanomoe_kernels.moe_blocks import BlockTables, block_tables, expert_group, expert_group_blocks
from nanomoe_kernels.moe_gemm_tile import gemm_tile
from nanomoe_kernels.moe_swap_blocks import GRAIN, SwapBlocks


# token counts change every step: do not compile a variant per divisibility of these two
@triton.jit(do_not_specialize=["num_rows", "num_blocks"])
def _moe_gemm_kernel(
    a_ptr, b_ptr, b_desc, a_desc, a_tail_desc, c_ptr, w_ptr, sorted_ids_ptr, block_rows_ptr, block_experts_ptr,
    used_ptr, a_index_ptr, expert_first_ptr, expert_blocks_ptr,
    num_rows, N, K, num_blocks, align_m, stride_am, stride_be, stride_bn, stride_cm,
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, A_INDEX: tl.constexpr, SCATTER_C: tl.constexpr, SWIGLU: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, USE_TMA: tl.constexpr, A_TMA: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_TABLE: tl.constexpr, MERGED: tl.constexpr, TAIL_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EXPERT_GROUP: tl.constexpr, PAIR_TAILS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    if MERGED:
        # kernels.moe_blocks merged list: each expert's main blocks then its tail blocks, in one launch
        # (a tail tile runs beside the main tiles that read the same weight tile, so L2 serves it);
        # used_ptr = the (main, tail) counts; code = expert | is_tail << 30
        used = tl.load(used_ptr) + tl.load(used_ptr + 1)
        if EXPERT_GROUP > 0:  # groups of at most EXPERT_GROUP blocks of one expert (moe_blocks.expert_group)
            if pid // num_pid_n >= used:
                return
            pid_m, pid_n = expert_group(pid, num_pid_n, block_experts_ptr, expert_first_ptr, expert_blocks_ptr,
                                        EXPERT_GROUP)
        elif pid_m >= used:
            return
        row0 = tl.load(block_rows_ptr + pid_m)
        code = tl.load(block_experts_ptr + pid_m)
        expert = (code & 0x3FFFFFFF).to(tl.int64)
        if code >= 0x40000000:
            # PAIR_TAILS: a tail program covers two column tiles (moe_gemm_tile's PAIR), so odd ones have no work
            if pid_n % (2 if PAIR_TAILS else 1) == 0:
                gemm_tile(a_ptr, b_ptr, b_desc, a_tail_desc, c_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0, expert,
                          pid_n, num_rows, N, K, stride_am, stride_be, stride_bn, stride_cm, A_DIV, GATHER_A,
                          A_INDEX, SCATTER_C, SWIGLU, MUL_WEIGHT, USE_TMA, A_TMA, EVEN_K, TAIL_M, BLOCK_N, BLOCK_K,
                          PAIR_TAILS)
        else:
            gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0, expert,
                      pid_n, num_rows, N, K, stride_am, stride_be, stride_bn, stride_cm, A_DIV, GATHER_A,
                      A_INDEX, SCATTER_C, SWIGLU, MUL_WEIGHT, USE_TMA, A_TMA, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
        return
    if BLOCK_TABLE:
        # kernels.moe_blocks: block pid_m starts at aligned row block_rows[pid_m]; used_ptr = blocks used
        if pid_m >= tl.load(used_ptr):
            return
        row0 = tl.load(block_rows_ptr + pid_m)
        expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    else:
        # block pid_m is aligned rows pid_m * BLOCK_M ..; used_ptr = num_padded, block_experts = expert_ids
        row0 = pid_m * BLOCK_M
        if row0 >= tl.load(used_ptr):
            return
        # with BLOCK_M < align_m a block can be all padding (the tail of an expert's aligned segment)
        if tl.load(sorted_ids_ptr + row0) >= num_rows:
            return
        expert = tl.load(block_experts_ptr + row0 // align_m).to(tl.int64)
    gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, w_ptr, sorted_ids_ptr, a_index_ptr, row0, expert, pid_n,
              num_rows, N, K, stride_am, stride_be, stride_bn, stride_cm, A_DIV, GATHER_A, A_INDEX, SCATTER_C,
              SWIGLU, MUL_WEIGHT, USE_TMA, A_TMA, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)


def runs_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    return type(_moe_gemm_kernel).__name__ == "InterpretedFunction"


CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
OPTIONAL_KEYS = ("USE_TMA", "SPLIT_M", "A_TMA", "MERGE_TAIL", "PERMUTE_A", "WGMMA", "STAGE_C", "EXPERT_GROUPS",
                 "PAIR_TAILS", "TAIL_N", "SWAP")


def check_config(config: dict, extra_keys: tuple[str, ...] = ()) -> dict:
    """A launch config with every key (USE_TMA, A_TMA, MERGE_TAIL, PERMUTE_A, WGMMA, STAGE_C and PAIR_TAILS default
    to False, SPLIT_M to 0 = no tail split, EXPERT_GROUPS to True: see moe_blocks.expert_group_blocks). PERMUTE_A
    (kernels/fused_moe.py, the first GEMM): copy the rows into aligned order first and load A through TMA instead of
    gathering it. WGMMA: run the GEMM on kernels/fused_moe_wgmma.py's warp-specialised Hopper kernel where
    `wgmma_unsupported` allows it, else this module's; STAGE_C (with WGMMA): that kernel stores its output
    tile through shared memory as 16-byte row pieces; TAIL_N (16 or 32, 0 = off; with WGMMA): an expert's last main
    block carries a tail of at most that many rows (kernels/fused_moe_wgmma_tail.py). PAIR_TAILS (with MERGE_TAIL,
    this module's kernel): each tail program computes two column tiles (kernels/moe_gemm_tile.py's PAIR); its
    stages take 1.5x a main block's shared memory, so the H200's 128 x (2 x 128) up tiles need num_stages <= 3
    (Triton refuses more at launch). SWAP (BLOCK_M = 16, the alignment's grain): run the GEMM on
    kernels/fused_moe_swap.py's swap-AB Hopper kernel (tokens as wgmma's N, one block per expert of up to 288 rows)
    where `swap_unsupported` allows it, else this module's kernel on the same 16-row alignment.
    Keys outside these (and the caller's `extra_keys`) are refused by name."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict with keys {CONFIG_KEYS}, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config is missing {missing} (has {sorted(config)})")
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(OPTIONAL_KEYS) - set(extra_keys))
    if unknown:   # a misspelt key would otherwise run another kernel without a word
        raise ValueError(f"config has unknown keys {unknown}; known: {CONFIG_KEYS + OPTIONAL_KEYS + extra_keys}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = config[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config[{k!r}] must be a power of two >= 16, got {v!r}")
    split = config.get("SPLIT_M", 0)
    bad_split = not isinstance(split, int) or split < 16 or split & (split - 1) or split > config["BLOCK_M"]
    if split and bad_split:
        raise ValueError(f"config['SPLIT_M'] must be 0 or a power of two in [16, BLOCK_M], got {split!r}")
    if config.get("STAGE_C", False) and not config.get("WGMMA", False):   # else a key that silently does nothing
        raise ValueError("config['STAGE_C'] stages the wgmma kernel's output tile: it needs WGMMA=True")
    tail_n = config.get("TAIL_N", 0)
    if tail_n not in (0, 16, 32) or isinstance(tail_n, bool) or (tail_n and not config.get("WGMMA", False)):
        raise ValueError(f"config['TAIL_N'] must be 0, 16 or 32 (16 and 32 need WGMMA=True), got {tail_n!r}")
    swap = config.get("SWAP", False)
    if not isinstance(swap, bool) or (swap and (config["BLOCK_M"] != GRAIN or config.get("WGMMA", False) or tail_n)):
        raise ValueError(f"config['SWAP'] must be a bool; True needs BLOCK_M={GRAIN} (the rows' alignment) and no "
                         f"WGMMA or TAIL_N, got SWAP={swap!r}, BLOCK_M={config['BLOCK_M']}")
    groups = config.get("EXPERT_GROUPS", True)
    if not isinstance(groups, (bool, int)) or groups < 0:
        raise ValueError(f"config['EXPERT_GROUPS'] must be True, False or a positive int, got {groups!r}")
    return {**{k: config[k] for k in CONFIG_KEYS}, "USE_TMA": bool(config.get("USE_TMA", False)),
            "SPLIT_M": 0 if split == config["BLOCK_M"] else split, "A_TMA": bool(config.get("A_TMA", False)),
            "MERGE_TAIL": bool(config.get("MERGE_TAIL", False)), "PERMUTE_A": bool(config.get("PERMUTE_A", False)),
            "WGMMA": bool(config.get("WGMMA", False)), "STAGE_C": bool(config.get("STAGE_C", False)),
            "EXPERT_GROUPS": groups,
            "PAIR_TAILS": bool(config.get("PAIR_TAILS", False)), "TAIL_N": tail_n, "SWAP": swap}


def wgmma_unsupported(cfg: dict, a: torch.Tensor, w: torch.Tensor, align: Alignment, swiglu: bool) -> str:
    """Why a checked config's GEMM does not run on the wgmma kernel ('' when it does; a config without WGMMA
    says so): kernels/fused_moe_wgmma.unsupported, plus a ring of 2-4 stages (48 KB of shared memory each)."""
    if not cfg["WGMMA"]:
        return "the config does not ask for WGMMA"
    if not 2 <= cfg["num_stages"] <= 4:
        return f"the wgmma expert GEMM needs num_stages in 2..4, got {cfg['num_stages']}"
    return unsupported(a, w, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], align.block_m, swiglu, cfg["TAIL_N"],
                       cfg["num_stages"], cfg["STAGE_C"])


def _tma_descriptor(w: torch.Tensor, rows: int, block_n: int, block_k: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(w.view(rows, w.shape[-1]), [block_n, block_k])


def moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, align: Alignment, config: dict, *,
             gather_a: bool, scatter_c: bool, a_div: int = 1, swiglu: bool = False,
             row_weights: torch.Tensor | None = None, tables: BlockTables | SwapBlocks | None = None,
             a_index: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows] = epilogue(A[rows] @ w[expert].T) for the aligned rows (see the module docstring).

    a [*, K] (gathered rows, or [R, K] aligned), w [E, NW, K] contiguous, out [*, N] (N = NW // 2 with
    swiglu), align from kernels.moe_align, row_weights [num_rows] float32 or None, a_index (gather_a
    only) contiguous int32/int64 [>= ceil(num_rows / a_div)] or None: A row = a_index[row id // a_div],
    values in [0, a.shape[0]) (the caller's check). BLOCK_M larger than
    align.block_m runs main blocks of BLOCK_M rows and tail blocks of align.block_m rows (two launches,
    or one with MERGE_TAIL; `tables` = kernels.moe_blocks.block_tables(align, BLOCK_M), made here when
    not given). A_TMA loads A tiles through TMA when A is not gathered (the down GEMM). SWAP: `tables` may be the
    alignment's kernels.moe_swap_blocks.swap_blocks (shared by the FFN's two GEMMs). Returns out.
    """
    cfg = check_config(config)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    E, NW, K = w.shape
    N = NW // 2 if swiglu else NW
    tm, R, num_rows = align.block_m, align.sorted_ids.numel(), align.num_rows
    if a.dim() != 2 or a.shape[1] != K or a.stride(1) != 1:
        raise ValueError(f"a must be [rows, {K}] with unit stride in its last dim, got {tuple(a.shape)} "
                         f"strides {a.stride()}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous [E, NW, K]")
    if out.dim() != 2 or out.shape[1] != N or out.stride(1) != 1:
        raise ValueError(f"out must be [rows, {N}] with unit stride in its last dim, got {tuple(out.shape)}")
    if swiglu and NW % 2:
        raise ValueError(f"swiglu weights need an even row count (gate then up), got {NW}")
    if (tm % bm if bm <= tm else bm % tm) or align.expert_ids.numel() != R // tm:
        raise ValueError(f"BLOCK_M={bm} and the alignment block {tm} must divide one another")
    if not gather_a and a.shape[0] < R:
        raise ValueError(f"a must hold all {R} aligned rows when it is not gathered, got {a.shape[0]}")
    if a_index is not None and (not gather_a or a_index.dim() != 1 or a_index.dtype not in (torch.int32, torch.int64)
                                or not a_index.is_contiguous() or a_index.numel() * a_div < num_rows):
        raise ValueError(f"a_index must be a contiguous int32/int64 [>= {-(-num_rows // a_div)}] with gather_a, "
                         f"got {a_index.dtype} {tuple(a_index.shape)} (gather_a={gather_a})")
    if row_weights is not None and (row_weights.dtype != torch.float32 or row_weights.numel() < num_rows):
        raise ValueError(f"row_weights must be float32 with {num_rows} entries, got {row_weights.dtype} "
                         f"{tuple(row_weights.shape)}")
    if R == 0 or N == 0:
        return out
    if cfg["SWAP"] and not swap_unsupported(a, w, bn, bk, tm, swiglu, row_weights is not None, cfg["num_stages"]):
        return moe_gemm_swap(a, w, out, align, stages=cfg["num_stages"], group=cfg["GROUP_M"], swiglu=swiglu,
                             gather_a=gather_a, scatter_c=scatter_c, a_div=a_div, row_weights=row_weights,
                             a_index=a_index, blocks=tables if isinstance(tables, SwapBlocks) else None)
    group = expert_group_blocks(cfg["EXPERT_GROUPS"], bm, K, a.element_size(), cfg["GROUP_M"])
    if not wgmma_unsupported(cfg, a, w, align, swiglu):
        if tables is None:
            tables = block_tables(align, bm)
        return moe_gemm_wgmma(a, w, out, align, block_n=bn, stages=cfg["num_stages"], group_m=cfg["GROUP_M"],
                              expert_group=group, swiglu=swiglu, gather_a=gather_a, scatter_c=scatter_c, a_div=a_div,
                              row_weights=row_weights, tables=tables, a_index=a_index, stage_c=cfg["STAGE_C"],
                              tail_n=cfg["TAIL_N"])
    # TMA needs 16-byte aligned rows; the interpreter emulates descriptors, so CPU tests cover the path
    tma_ok = (w.is_cuda or runs_interpreted()) and (K * w.element_size()) % 16 == 0
    use_tma = cfg["USE_TMA"] and tma_ok
    desc = _tma_descriptor(w, E * NW, bn, bk) if use_tma else None
    a_tma = (cfg["A_TMA"] and tma_ok and not gather_a and a.is_contiguous() and a.data_ptr() % 16 == 0)
    merged = cfg["MERGE_TAIL"] and bm > tm

    def a_desc(block_m: int):
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor.from_tensor(a, [block_m, bk]) if a_tma else None

    def launch(block_m: int, rows: torch.Tensor | None, experts: torch.Tensor, used: torch.Tensor,
               num_blocks: int) -> None:
        """Run the kernel over num_blocks blocks of block_m rows (a static grid; unused blocks exit)."""
        # rows None: blocks of the alignment, used = num_padded rows; else a block table's first rows,
        # used [1] = its blocks in use (merged: [2], main and tail). experts [num_blocks]: each block's expert.
        if num_blocks == 0:
            return
        grouped = merged and block_m == bm and group > 0
        _moe_gemm_kernel[(num_blocks * triton.cdiv(N, bn),)](
            a, w, desc, a_desc(block_m), a_desc(tm) if merged else None, out, row_weights, align.sorted_ids,
            rows, experts, used, a_index, tables.expert_first if grouped else None,
            tables.expert_blocks if grouped else None,
            num_rows, N, K, num_blocks, tm, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
            A_DIV=a_div, GATHER_A=gather_a, A_INDEX=a_index is not None, SCATTER_C=scatter_c, SWIGLU=swiglu,
            MUL_WEIGHT=row_weights is not None, USE_TMA=use_tma, A_TMA=a_tma, EVEN_K=K % bk == 0,
            BLOCK_TABLE=rows is not None, MERGED=merged and block_m == bm, TAIL_M=tm, BLOCK_M=block_m,
            BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
            EXPERT_GROUP=group if grouped else 0, PAIR_TAILS=cfg["PAIR_TAILS"] and merged and block_m == bm,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

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
