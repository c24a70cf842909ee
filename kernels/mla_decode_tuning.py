"""Launch parameters of the Triton MLA decode (kernels/mla_decode.py): tile shapes, split count, TMA.

Dimension legend: R query rows, N heads, C latent dims, L context, K splits of the context,
BH heads per program, BN cache rows per tile, G page size. Plain Python: no kernels here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no host-side TMA descriptors; tuning.tma then raises
    TensorDescriptor = None


@dataclass(frozen=True)
class DecodeTuning:
    """Heads per program (BH), rows per tile (BN), value slices (2: each program owns C/2 value columns
    and still scores all Dc), warps, stages, TMA loads of full tiles, programs resident per SM."""

    block_h: int = 64
    block_n: int = 64
    value_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    ctas_per_sm: int = 1


def default_tuning(num_heads: int) -> DecodeTuning:
    """Measured on H200 (bench/results/mla_notes.md): 16-head shards are memory-bound and want two
    small programs per SM; 128 heads are compute-bound and want 128-head programs over value halves
    with TMA tile loads (mla_decode falls back to plain loads where TMA cannot serve the cache)."""
    if num_heads <= 16:
        return DecodeTuning(block_h=16, block_n=32, value_splits=1, num_warps=4, num_stages=3, ctas_per_sm=2)
    return DecodeTuning(block_h=128, block_n=32, value_splits=2, num_warps=8, num_stages=2, tma=True)


def pick_splits(rows: int, head_programs: int, max_len: int, slots: int, block_n: int) -> int:
    """Context splits K so that programs fill whole waves of `slots` (SMs x programs per SM).

    max_len bounds every row's context (the cache capacity), so K never leaves a split with fewer
    than 4 tiles of the longest possible row. Chosen without looking at the real lengths (no sync).
    """
    base = rows * head_programs
    k_max = max(1, min(64, max_len // (4 * block_n)))
    best, best_eff = 1, 0.0
    for k in range(1, k_max + 1):
        progs = base * k
        eff = progs / (-(-progs // slots) * slots)
        eff -= 0.01 * (k > 1) + 0.002 * k  # the reduction pass costs a little per split
        if eff > best_eff + 0.02:
            best, best_eff = k, eff
    return best


def default_splits(rows: int, heads: int, max_len: int, tuning: DecodeTuning, device: torch.device) -> int:
    """pick_splits for this tuning on this device (SM count read from the device; 4 off the GPU)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    head_programs = triton.cdiv(heads, tuning.block_h) * tuning.value_splits
    return pick_splits(rows, head_programs, max_len, sms * tuning.ctas_per_sm, tuning.block_n)


def tma_unsupported(kv: torch.Tensor, c: int, t: DecodeTuning) -> str:
    """Why TMA tile loads cannot serve this cache ('' when they can): descriptors need 16-byte aligned
    rows and slices, and a tile (block_n rows) must not cross a page or a sequence."""
    if TensorDescriptor is None:
        return "tuning.tma needs triton.tools.tensor_descriptor (Triton >= 3.4)"
    if not kv.is_contiguous() or kv.data_ptr() % 16 or (kv.shape[-1] * kv.element_size()) % 16:
        return "tuning.tma needs a contiguous cache with 16-byte aligned rows"
    if (c * kv.element_size()) % 16 or kv.shape[1] % t.block_n:
        return "tuning.tma needs 16-byte aligned latent width and block_n dividing the page (or capacity)"
    return ""
