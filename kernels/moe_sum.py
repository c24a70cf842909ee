"""The top-k sum of an MoE layer's pair rows in one Triton pass: out[t] = sum_j pairs[t * k + j].

Dimension legend: T tokens, k experts per token, H columns, BT tokens x BH columns per program.

The fused MoE's down GEMM writes each (token, k) pair's weighted row in pair order, [T * k, H]; this adds
each token's k rows in float32 and rounds once to the rows' dtype, as `pairs.view(T, k, H).sum(1)` does, in
one read of the pairs and one write of the sums (torch's reduction ran at ~65% of the HBM rate on the H200:
bench/results/expert_ffn_notes.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from nanomoe_kernels.moe_permute import _check_rows


@triton.jit(do_not_specialize=["T"])
def _sum_k_kernel(p_ptr, out_ptr, T, H, stride_p, stride_o, K: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    toks = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BH + tl.arange(0, BH)
    ok = (toks < T)[:, None] & (cols < H)[None, :]
    rows = toks.to(tl.int64) * K
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(p_ptr + (rows + j)[:, None] * stride_p + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


def sum_pairs(pairs: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """pairs [T * k, H] (unit column stride, float16/bfloat16/float32) -> [T, H] in pairs' dtype: row t is
    the float32 sum of rows t*k .. t*k + k - 1, rounded once. out: a [T, H] tensor of that dtype to write."""
    _check_rows("pairs", pairs, 2)
    if not isinstance(k, int) or k < 1 or pairs.shape[0] % k:
        raise ValueError(f"k must be an int >= 1 dividing pairs' {pairs.shape[0]} rows, got {k!r}")
    T, H = pairs.shape[0] // k, pairs.shape[1]
    if out is None:
        out = pairs.new_empty((T, H))
    elif _check_rows("out", out, 2, (pairs.dtype,)).shape != (T, H) or out.device != pairs.device:
        raise ValueError(f"out must be [{T}, {H}] on {pairs.device}, got {tuple(out.shape)} on {out.device}")
    if T == 0 or H == 0:
        return out
    bh = min(512, triton.next_power_of_2(H))
    bt = max(1, min(16, 1024 // bh))
    _sum_k_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](pairs, out, T, H, pairs.stride(0), out.stride(0),
                                                             K=k, BT=bt, BH=bh, num_warps=4)
    return out
