"""Launch parameters of the Triton MLA decode (kernels/mla_decode.py): tile shapes, split count, TMA.

Dimension legend: R query rows, N heads, C latent dims, L context, K splits of the context,
BH heads per program, BN cache rows per tile, G page size, BC value columns per reduce program,
T tiles of the longest row. Plain Python: no kernels here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: no host-side TMA descriptors; tuning.tma then raises
    TensorDescriptor = None


@dataclass(frozen=True)
class DecodeTuning:
    """Heads per program (BH), rows per tile (BN), value slices (2: each program owns C/2 value columns
    and still scores all Dc), warps, stages, TMA loads of full tiles, programs per SM the split count
    assumes (ctas_per_sm; paged_ctas_per_sm for a paged cache, 0: the same), the split reduction's
    blocks, and key_major: stage 1 computed transposed (keys as the MMA's rows,
    kernels/mla_decode_keymajor.py; value_splits must then be 1); input_dtype_partials: the split partials
    stored in q's dtype (bf16/fp16: half the bytes written by stage 1 and read by the reduction) instead of
    float32 (the lse stays float32); pdl: the split reduction is launched with programmatic dependent launch
    (Hopper and later, behind the Triton stage 1 or the warp-specialised Gluon one; mla_decode ignores it
    elsewhere): stage 1 lets it in as its programs start, so the reduction's programs are placed while stage 1
    runs and wait on the GPU (griddepcontrol) for its end, instead of the launch gap between two kernels.
    wgmma: stage 1 is the Gluon Hopper kernel
    (kernels/mla_decode_wgmma.py: 64 heads x all value columns a program, each tile scored once by two
    warpgroups; block_h and block_n must be 64, the other tile fields do not apply); warp_specialize (with
    wgmma, Triton >= 3.6): its warp-specialised form (kernels/mla_decode_wgmma_ws.py: a TMA warp, one
    warpgroup for the scores, the softmax and half the value columns, one for the other half); store_tma (with
    warp_specialize): each warpgroup writes its split partials through shared memory (the drained cache-tile
    ring) and one TMA store, full lines instead of the accumulator layout's 8-byte pieces. first_tile_alone / q_first
    (with warp_specialize): the load warp issues a program's second cache tile only once its first has landed / its
    first tile only once Q has, so no program's first tile queues behind the second ones; reduce_warps: warps of a
    split reduction program."""

    block_h: int = 64
    block_n: int = 64
    value_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    ctas_per_sm: int = 1
    reduce_h: int = 0   # split reduction's heads / value columns per program (0: reduce_blocks picks)
    reduce_c: int = 0
    key_major: bool = False
    paged_ctas_per_sm: int = 0
    input_dtype_partials: bool = False
    pdl: bool = False
    wgmma: bool = False
    warp_specialize: bool = False
    store_tma: bool = False
    first_tile_alone: bool = False
    q_first: bool = False
    reduce_warps: int = 1   # one warp: 5.6 -> 3.3 us at one 128-head row, never slower (run 216, mla_notes.md)


def check_fields(t: DecodeTuning) -> None:
    """Raise ValueError naming the first field of t that cannot go with the others (whatever the GPU)."""
    if t.wgmma and (t.block_h, t.block_n, t.value_splits, t.key_major) != (64, 64, 1, False):
        raise ValueError(f"tuning.wgmma needs block_h = block_n = 64, value_splits 1, key_major off, got {t}")
    for name in ("store_tma", "first_tile_alone", "q_first"):
        if getattr(t, name) and not t.warp_specialize:
            raise ValueError(f"tuning.{name} needs tuning.warp_specialize (the warp-specialised Gluon stage 1)")
    if t.reduce_warps not in (1, 2, 4, 8):
        raise ValueError(f"tuning.reduce_warps must be 1, 2, 4 or 8, got {t.reduce_warps}")
    if t.value_splits not in (1, 2) or (t.key_major and t.value_splits != 1):
        raise ValueError(f"tuning.value_splits must be 1 or 2 (1 with key_major), got {t.value_splits}")


def triton_at_least(major: int, minor: int) -> bool:
    """Whether the installed Triton is major.minor or newer (the Gluon kernels' API moved between releases)."""
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


# the warp-specialised form where Gluon has list-form warp_specialize (Triton >= 3.6): 1.3x the plain one at
# B >= 32, 1.16x at B = 4, 1.07x at one row (run 128 in bench/results/mla_notes.md)
WGMMA = DecodeTuning(block_h=64, block_n=64, num_warps=8, wgmma=True, warp_specialize=triton_at_least(3, 6))
# few rows (default_tuning): bf16 split partials stored through TMA by the warp-specialised stage 1,
# each program's first cache tile loaded ahead of its second; one row also launches the reduction with PDL
FEW_ROWS_WGMMA = replace(WGMMA, warp_specialize=True, store_tma=True, input_dtype_partials=True,
                         first_tile_alone=True)
ONE_ROW_WGMMA = replace(FEW_ROWS_WGMMA, pdl=True)
FEW_ROWS = 8          # default_tuning: query rows that take FEW_ROWS_WGMMA (3% faster at 8 rows, 1% at 16: run 217)
MAX_SPLITS = 256      # pick_splits' largest K
PROGRAM_TILES = 2.0   # a stage-1 program's fixed cost (query load, partial store), in tiles
REDUCE_TILES = 2.0    # the reduction launch's fixed cost, in tiles
SMALL_ROWS = 16       # default_tuning: at most this many query rows count as few (measured B = 1-16)


def default_tuning(num_heads: int, rows: int | None = None, wgmma: bool = False) -> DecodeTuning:
    """Measured on H200 (bench/results/mla_notes.md): 16-head shards are memory-bound and want two
    small programs per SM (four on a paged cache), or for a single query row one key-major program
    over 64-row tiles; 128 heads are compute-bound and want 128-head programs over value halves
    with TMA tile loads, except for few rows (<= SMALL_ROWS query rows), where 64-head, 4-warp programs
    over 64-row tiles ran 7-25% faster (B = 1-16). mla_decode falls back to plain loads where TMA cannot.
    16 heads launch the split reduction with PDL (0.7 us less at one row and 4k context, no change at 16k or
    many rows; 1.6 us more with 128 heads at one row: run 101 in bench/results/mla_notes.md).
    wgmma: the Gluon stage 1 can run here (mla_decode asks kernels/mla_decode_wgmma.unsupported); it then
    serves every head count that is a multiple of 64 (WGMMA: warp-specialised where Triton allows): 2.2x the
    tl.dot kernels at 128 heads and B = 32-128, 1.2x at one row and 16k, 1.5-1.7x at B = 4-8 (run 128 in
    bench/results/mla_notes.md); up to FEW_ROWS rows also store bf16 partials by TMA (FEW_ROWS_WGMMA,
    ONE_ROW_WGMMA)."""
    if wgmma and num_heads % 64 == 0:
        # few rows: bf16 partials through TMA stores (float32 partials fill the L2's write rate, ~3.6 TB/s, at the
        # end of stage 1: run 212), the first tile alone; with one-warp reduction programs 128 heads at one 16k row
        # take 22.6 us (25.3 before), 2 / 4 / 8 x 16k 30.7 / 45.9 / 76.2 (36.4 / 50.0 / 78.7); 64 heads 1 / 4 / 8 x
        # 16k 20.8 / 38.2 / 57.4 (23.7 / 42.8 / 60.2); PDL: 0.6-0.7 us less at one 4k row, +0.5 to 0 at 16k
        # (runs 215-218, bench/results/mla_notes.md)
        if rows is not None and rows <= FEW_ROWS and WGMMA.warp_specialize:
            return ONE_ROW_WGMMA if rows == 1 else FEW_ROWS_WGMMA
        return WGMMA
    if num_heads <= 16 and rows == 1:   # one query row: key-major 64-row tiles, 4% faster at 16k (0 at 4k)
        return DecodeTuning(block_h=16, block_n=64, value_splits=1, num_warps=4, num_stages=2, key_major=True,
                            pdl=True)
    if num_heads <= 16:   # paged: a page id before each tile; twice the programs keep HBM busy (B=32-128:
        # the K that fills 4 programs per SM was the best of the sweep on every paged shape, 0.74 -> 0.96)
        return DecodeTuning(block_h=16, block_n=32, value_splits=1, num_warps=4, num_stages=3, ctas_per_sm=2,
                            paged_ctas_per_sm=4, pdl=True)
    if rows is not None and rows <= SMALL_ROWS:
        return DecodeTuning(block_h=64, block_n=64, value_splits=2, num_warps=4, num_stages=2, tma=True)
    return DecodeTuning(block_h=128, block_n=32, value_splits=2, num_warps=8, num_stages=2, tma=True)


def pick_splits(rows: int, head_programs: int, max_len: int, slots: int, block_n: int,
                partial_tiles: float = 0.0) -> int:
    """Context splits K that minimise a wave model of the launch, in units of one program's tile time:

        waves(K) * (ceil(T / K) + PROGRAM_TILES) + [K > 1] * (REDUCE_TILES + K * partial_tiles)

    with T = ceil(max_len / block_n) tiles and waves(K) = ceil(rows * head_programs * K / slots).
    partial_tiles prices one split's float32 partial outputs (written, then read by the reduction)
    against the cache; with it, 128 heads do not take absurd K. Every split keeps >= 2 tiles of the
    longest possible row (max_len, the cache capacity) and K <= MAX_SPLITS; chosen without looking at
    the real lengths (no sync). Ties go to the smaller K.
    """
    tiles = -(-max_len // block_n)
    base = rows * head_programs
    best, best_t = 1, float("inf")
    for k in range(1, max(1, min(MAX_SPLITS, tiles // 2)) + 1):
        t = -(-base * k // slots) * (-(-tiles // k) + PROGRAM_TILES)
        t += (REDUCE_TILES + k * partial_tiles) if k > 1 else 0.0
        if t < best_t * (1 - 1e-9):
            best, best_t = k, t
    return best


def device_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 off the GPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_splits(rows: int, heads: int, max_len: int, tuning: DecodeTuning, device: torch.device,
                   latent: int = 512, row_bytes: int = 1152, paged: bool = False) -> int:
    """pick_splits for this tuning on this device and cache kind; latent (C) and row_bytes (one cache row)
    price the float32 partials: one split's are rows * heads * C * 8 bytes (written, then read), and the
    machine moves slots tiles of block_n rows in one tile time."""
    per_sm = (tuning.paged_ctas_per_sm if paged else 0) or tuning.ctas_per_sm
    slots = device_sms(device) * per_sm
    head_programs = triton.cdiv(heads, tuning.block_h) * tuning.value_splits
    partial = rows * heads * latent * 8 / (slots * tuning.block_n * row_bytes)
    return pick_splits(rows, head_programs, max_len, slots, tuning.block_n, partial)


def reduce_blocks(rows: int, heads: int, latent: int, splits: int, sms: int,
                  tuning: DecodeTuning | None = None) -> tuple[int, int, int]:
    """(BH, BC, CHUNK_K) of the split reduction: the widest blocks that still give >= 4 programs per SM
    (few rows: 1-2 heads x 32-64 columns a program), tuning.reduce_h / reduce_c when set; a program
    loads [BH, CHUNK_K, BC] <= 4096 partial values at a time."""
    top_h = min(16, triton.next_power_of_2(heads))
    top_c = min(128, max(16, triton.next_power_of_2(latent)))
    bh, bc = top_h, top_c
    while rows * -(-heads // bh) * -(-latent // bc) < 4 * sms and (bh > 1 or bc > min(32, top_c)):
        bh, bc = (bh // 2, bc) if bh > 1 else (bh, bc // 2)
    if tuning is not None:
        bh, bc = tuning.reduce_h or bh, tuning.reduce_c or bc
    kc = max(2, min(triton.next_power_of_2(splits), 4096 // (bh * bc)))
    return bh, bc, kc


def pdl_supported(device: torch.device, interpreted: bool) -> bool:
    """Whether kernels on this device can use programmatic dependent launch: a CUDA GPU of compute
    capability >= 9 (Hopper), compiled (not interpreted) Triton kernels, and a Triton that has the
    griddepcontrol intrinsics (tl.extra.cuda.gdc_wait, Triton >= 3.3). Cached per GPU (a decode step asks)."""
    if interpreted or device.type != "cuda":
        return False
    return _pdl_on_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_on_gpu(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    from triton.language.extra import cuda as tl_cuda
    return hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


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
