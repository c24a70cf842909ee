"""The router GEMM up to ~1k tokens: float32 logits [T, E] = x [T, H] @ w [E, H].T, split over H.

Dimension legend: T tokens, H hidden, E experts, S splits of H (each CHUNK columns), BT tokens x BE experts
x BK columns per program step.

At decode sizes cuBLAS runs [32, 7168] x [7168, 256] in float32 on a handful of programs (25 us on an H200
for 7.3 MB of weight: bench/results/pipeline_notes.md). Here S splits of H give ~2 programs per SM; each
reads one slice of w once and writes float32 partials [S, T, E], which a second pass adds in a fixed order
(deterministic: a near-tie routes the same way on every call). The dot runs on tensor cores as "tf32x3"
(each float32 operand split into a TF32 high and low part, three products; error ~2^-22 of a product, not
TF32's 2^-11), and each program sums only CHUNK columns before the IEEE float32 partial sums: 1.4e-6 off the
float32 GEMM at 32 tokens of DeepSeek-V3 (largest logit 3.8), 15 us against cuBLAS's 24; the FMA-unit
("ieee") dot took 30 us there (bench/results/pipeline_notes.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.mla_decode_tuning import device_sms

BE = 64          # experts per program
BK = 32          # columns per step
MAX_TOKENS = 64  # BT's ceiling: more tokens take more token blocks


@triton.jit(do_not_specialize=["T"])
def _router_partial_kernel(x_ptr, w_ptr, part_ptr, T, E, H, CHUNK, stride_x, stride_w,
                           BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(1) * BT + tl.arange(0, BT)
    cols = tl.program_id(0) * BE + tl.arange(0, BE)
    split = tl.program_id(2)
    start = split * CHUNK
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for kk in range(0, CHUNK, BK):
        ks = start + kk + tl.arange(0, BK)
        k_ok = ks < H
        xa = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                     mask=(rows < T)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        wb = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],
                     mask=(cols < E)[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
        acc += tl.dot(xa, wb, input_precision=PREC)
    out = part_ptr + split.to(tl.int64) * T * E + rows[:, None].to(tl.int64) * E + cols[None, :]
    tl.store(out, acc, mask=(rows < T)[:, None] & (cols < E)[None, :])


def plan(T: int, E: int, H: int, sms: int, be: int = BE, bk: int = BK, per_sm: int = 2) -> tuple[int, int, int]:
    """(BT, CHUNK, S): token block, columns per split and split count for ~per_sm programs per SM."""
    bt = min(MAX_TOKENS, max(16, triton.next_power_of_2(T)))
    tiles = triton.cdiv(E, be) * triton.cdiv(T, bt)
    want = max(1, min(triton.cdiv(H, bk), (per_sm * sms) // tiles))
    chunk = triton.cdiv(triton.cdiv(H, want), bk) * bk
    return bt, chunk, triton.cdiv(H, chunk)


def router_logits_splitk(x: torch.Tensor, w: torch.Tensor, sms: int | None = None, block_e: int = BE,
                         block_k: int = BK, per_sm: int = 2, precision: str = "tf32x3",
                         num_warps: int = 4) -> torch.Tensor:
    """float32 x [T, H] @ w [E, H].T -> [T, E] (x bf16/fp16/fp32, w fp32 or bf16; unit column strides), as
    split-H partials added in a fixed order. sms: the programs' target (default: the device's SMs); the rest
    are tunings for bench/gpu/route_probe.py (precision "ieee": the dot on FMA units, twice the time)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [T, H] and w [E, H] with the same H, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or w.dtype not in (torch.float32,
                                                                                        torch.bfloat16):
        raise ValueError(f"x must be bf16/fp16/fp32 and w fp32/bf16, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x must be on {w.device} (with w), got {x.device}")
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    T, H = x.shape
    E = w.shape[0]
    if T == 0:
        return x.new_zeros((0, E), dtype=torch.float32)
    bt, chunk, S = plan(T, E, H, device_sms(x.device) if sms is None else sms, block_e, block_k, per_sm)
    part = torch.empty((S, T, E), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(E, block_e), triton.cdiv(T, bt), S)
    _router_partial_kernel[grid](x, w, part, T, E, H, chunk, x.stride(0), w.stride(0), BT=bt, BE=block_e,
                                 BK=block_k, PREC=precision, num_warps=num_warps)
    return part.sum(0) if S > 1 else part[0]


@triton.jit
def _bf16_round(v):
    """float32 v -> (v rounded to bf16, as float32; its bf16 bits in the low half of an int32), to nearest with
    ties to even as torch rounds, NaN to 0x7FC0. On the bits: exact under TRITON_INTERPRET=1 too, whose bf16
    casts are not. Only NaNs' bits overflow in the add, and the where replaces them."""
    bits = v.to(tl.int32, bitcast=True)
    r = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
    r = tl.where(v != v, 0x7FC00000, r)
    return r.to(tl.float32, bitcast=True), r >> 16


@triton.jit
def _bf16_parts_kernel(w_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    hi, hi_bits = _bf16_round(w)
    rest = w - hi              # exact: w less its rounding
    mid, mid_bits = _bf16_round(rest)
    _, lo_bits = _bf16_round(rest - mid)
    tl.store(out_ptr + offs, hi_bits.to(tl.int16), mask=ok)
    tl.store(out_ptr + N + offs, mid_bits.to(tl.int16), mask=ok)
    tl.store(out_ptr + 2 * N + offs, lo_bits.to(tl.int16), mask=ok)


def split_bf16_parts(w: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """float32 w [..., H] -> bf16 [3, ...] hi, mid, lo, whose sum is w exactly (each part the next 8 significant
    bits of what the others leave; float32 subnormals below 2^-126 aside), in one pass over w: the split router
    GEMM's weight parts (nanomoe_fn/moe/route.py) in one kernel instead of five elementwise torch ones."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
        raise ValueError(f"w must be a float32 tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    w = w.contiguous()
    out = torch.empty((3, *w.shape), dtype=torch.int16, device=w.device)
    N = w.numel()
    if N:
        _bf16_parts_kernel[(triton.cdiv(N, block),)](w, out, N, BLOCK=block, num_warps=4)
    return out.view(torch.bfloat16)
