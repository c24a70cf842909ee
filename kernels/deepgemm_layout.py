"""Which of DeepGEMM's two grouped layouts a batch runs in, and how many rows per expert the masked one holds.

Dimension legend: E experts, N rows the alignment sorts, A DeepGEMM's row alignment (128 on Hopper),
cap rows per expert in the masked layout, B the most rows one expert can get (bound_rows: T for top-k
routing of T tokens, whose k experts per token are distinct).

The contiguous layout sizes its buffers for the worst padding, N + E * (A - 1) rows, and DeepGEMM's
contiguous kernel spends about as long on the blocks past the used rows as on real ones; the masked layout
computes only each expert's blocks (1.06-1.67x faster GEMMs at 1024-4096 tokens of DeepSeek-V3 on an H200,
bench/results/expert_ffn_notes.md). Its capacity comes one of two ways:
- "masked": one host read of the largest padded count. After it DeepGEMM's own host work (~0.2 ms a
  launch) is no longer hidden behind the GPU, and a CUDA graph cannot capture it.
- "bounded": cap = B rounded up, known without a read (no sync; graphs capture it), at the price of
  cap rows of buffers per expert (the permute writes, and the GEMMs compute, only the live rows). Where the
  E experts' buffers would pass BOUNDED_MAX_BYTES the experts run in groups that fit (`experts_per_group`:
  each group's GEMMs read only its own experts' weights, so the weights are still read once; but each group's
  glue runs on grids sized for all N rows and adds its sums into a float32 [T, H] (4 H bytes a token more,
  outside BOUNDED_MAX_BYTES), so every group past the
  first costs ~80 us at 1024 tokens and ~230 at 4096 on an H200 (run 169)). An expert
  past B rows (routing that repeats an expert within a token) is an error: an async device assert, never a
  silent drop.
"auto" takes "bounded" from BOUNDED_ROWS_PER_EXPERT rows per expert on average when B is known, the
contiguous layout's spare rows (beyond an average padding of A / 2) cost at least BOUNDED_MIN_SPARE_FLOP and
the buffers fit BOUNDED_MAX_BYTES in at most BOUNDED_MAX_GROUPS groups of experts; else "masked" from
MASKED_ROWS_PER_EXPERT rows per expert when the spare
rows are worth a host read (MASKED_MIN_SPARE_FLOP), no graph is being captured, nothing compiles and skewed
routing does not make the masked buffers more than twice the contiguous ones; else the contiguous layout.
Measured on an H200 at DeepSeek-V3 dims (bench/results/expert_ffn_notes.md, runs 110-113): the masked layout
beat the contiguous one at 16-256 rows per expert (256 experts, 512 tokens: 5.86 against 7.46 ms), bounded
beat masked at 32+ (no host read; run 169 at 256 experts x 1024 tokens: 5.68 ms in one group, 5.76 in two,
against 5.99 masked; at 256 x 4096 7.51 in one group, 10.0 in seven, 8.22 masked).
"""

from __future__ import annotations

import torch
from nanomoe_kernels.moe_align import Alignment

LAYOUTS = ("auto", "contiguous", "masked", "bounded")
BOUNDED_ROWS_PER_EXPERT = 32
MASKED_ROWS_PER_EXPERT = 16  # below: decode sizes, where a host read would stall the step
BOUNDED_MIN_SPARE_FLOP = 0.05e12  # ~0.07 ms of bf16 GEMM on an H200: the capacity kernel's cost, many times over
MASKED_MIN_SPARE_FLOP = 0.25e12  # ~0.4 ms: the exposed host work after the read
BOUNDED_MAX_BYTES = 4 << 30  # a group's cap * bytes_per_row * experts; DeepSeek-V3 dims: 32 experts x 4096 tokens
BOUNDED_MAX_GROUPS = 2  # "auto": more groups cost more than the host read they save (run 169)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def pick_layout(align: Alignment, E: int, layout: str, A: int, flop_per_row: float = 0.0,
                bound_rows: int | None = None, bytes_per_row: int = 0) -> tuple[str, int]:
    """("contiguous", 0), ("masked", cap) or ("bounded", cap) for the rows `align` sorts (see the module
    docstring). cap: a multiple of A and of align.block_m. flop_per_row: the FFN's FLOPs per row (6 H I for
    SwiGLU); bound_rows: B, or None when unknown; bytes_per_row: the masked buffers' bytes per row."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        return "contiguous", 0
    if bound_rows is not None and (not isinstance(bound_rows, int) or bound_rows < 0):
        raise ValueError(f"bound_rows must be an int >= 0 or None, got {bound_rows!r}")
    N = align.num_rows
    step = max(A, align.block_m)  # with_capacity wants whole blocks
    bound = None if bound_rows is None else _round_up(min(bound_rows, N), step)
    if layout == "bounded":
        if bound is None:
            raise ValueError("layout 'bounded' needs bound_rows (the most rows one expert can get)")
        return "bounded", bound
    if layout == "auto":
        spare_flop = (min(E, N) * (A - 1) - E * A // 2) * flop_per_row  # the contiguous bound's spare rows
        if (bound is not None and N >= BOUNDED_ROWS_PER_EXPERT * E and spare_flop >= BOUNDED_MIN_SPARE_FLOP
                and bound * bytes_per_row <= BOUNDED_MAX_BYTES  # one expert fits, and E in few groups
                and -(-E // experts_per_group(E, bound, bytes_per_row)) <= BOUNDED_MAX_GROUPS):
            return "bounded", bound
        if (N < MASKED_ROWS_PER_EXPERT * E or spare_flop < MASKED_MIN_SPARE_FLOP or torch.compiler.is_compiling()
                or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
            return "contiguous", 0
    cap = _round_up(int(align.padded_counts.max()), step) if align.padded_counts.numel() else 0  # the host read
    if layout == "masked" or E * cap <= 2 * (N + E * A):
        return "masked", cap
    return "contiguous", 0  # auto: skewed routing, the masked buffers would be far bigger


def experts_per_group(E: int, cap: int, bytes_per_row: int) -> int:
    """How many experts the bounded layout runs at a time: all E when their E * cap rows of buffers fit
    BOUNDED_MAX_BYTES, else as many as fit (at least one), in groups of near-equal size."""
    if E < 1 or cap * bytes_per_row * E <= BOUNDED_MAX_BYTES:
        return max(E, 1)
    fit = max(1, BOUNDED_MAX_BYTES // max(cap * bytes_per_row, 1))
    groups = -(-E // fit)
    return -(-E // groups)
