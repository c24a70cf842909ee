"""Triton MLA decode over the compressed cache: one shared latent KV head, split along the sequence.

Dimension legend: R query rows (B sequences x S tokens each), N heads, C latent (value) dims,
Dr rope dims, Dc = C + Dr key dims, L context per row, P pages, G page size, M pages per sequence,
K splits of the context, BH heads per program, BN cache rows per tile, BV value dims per program,
BC value columns per reduce program.

Stage 1 (`_mla_decode_partial`): program (head block x value slice, row, split) walks its slice of
the row's context in tiles of BN rows. Each tile is loaded once and serves every head of the block
through tl.dot (heads are the M dimension): scores = q_lat . k_lat^T + q_pe . k_pe^T, then
acc += p . v with v = the tile's latent columns (the same bytes as k_lat). With K == 1 it writes the
normalised output; otherwise a partial output and its base-2 log-sum-exp, which stage 2
(`_mla_decode_reduce`, grid over head blocks x rows x value-column blocks, so one row still spreads
over the SMs) merges. A paged tile whose BN divides G reads one page id; smaller pages, one per row.
Row lengths are read on the device: no host sync. On sm_90 with heads a multiple of 64, stage 1 is the Gluon
kernel of kernels/mla_decode_wgmma.py instead, or its warp-specialised form (kernels/mla_decode_wgmma_ws.py, the
default on Triton >= 3.6): DecodeTuning.wgmma / warp_specialize; the same partials, the same stage 2.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl
from nanomoe_kernels import mla_decode_wgmma, mla_decode_wgmma_ws
from nanomoe_kernels.mla_decode_keymajor import _mla_decode_partial_km, block_v
from nanomoe_kernels.mla_decode_tuning import (  # noqa: F401 (re-exported: the wrapper's tuning API)
    DecodeTuning,
    TensorDescriptor,
    check_fields,
    default_splits,
    default_tuning,
    device_sms,
    pdl_supported,
    pick_splits,
    reduce_blocks,
    tma_unsupported,
)
from nanomoe_kernels.mla_tile_rows import split_range, tile_offsets, tile_row0
from nanomoe_kernels.reduce_ops import add as _add
from nanomoe_kernels.reduce_ops import maximum as _maximum

# tl.reduce combine functions: see kernels/reduce_ops.py for why not tl.max/tl.sum


@triton.jit
def _tile(acc, m_i, l_i, q_a, q_b, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr, seq, n0, end,
          stride_kv0, stride_kv1, stride_bt, max_len, scale_log2, ha,
          C: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, PAGE_TILE: tl.constexpr,
          TMA: tl.constexpr, MASKED: tl.constexpr, VSPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
          BLOCK_R: tl.constexpr):
    """One tile of BN cache rows from n0: scores for all heads of the block, online softmax, p . v.

    k_a holds this program's BV latent columns (all of them when VSPLIT == 1): key and value at
    once. With VSPLIT == 2 the other half k_b only scores."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_a = ha * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_b = (1 - ha) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    if TMA and not MASKED:
        row0 = tile_row0(bt_ptr, seq, n0, stride_bt, max_len, PAGE, PAGED)
        k_a = lat_desc.load([row0, ha * BLOCK_V])
        k_pe = pe_desc.load([row0, 0])
        if VSPLIT == 2:
            k_b = lat_desc.load([row0, (1 - ha) * BLOCK_V])
    else:
        mask_n = offs_n < end
        base = tile_offsets(bt_ptr, seq, n0, offs_n, mask_n, stride_kv0, stride_kv1, stride_bt, PAGE, PAGED,
                            PAGE_TILE, BLOCK_N)
        k_row = kv_ptr + base[:, None]
        row_ok = mask_n[:, None] if MASKED else offs_n[:, None] >= 0   # full tiles: every row valid
        k_a = tl.load(k_row + offs_a[None, :], mask=row_ok & (offs_a[None, :] < C), other=0.0)
        k_pe = tl.load(k_row + C + offs_r[None, :], mask=row_ok & (offs_r[None, :] < DR), other=0.0)
        if VSPLIT == 2:
            k_b = tl.load(k_row + offs_b[None, :], mask=row_ok & (offs_b[None, :] < C), other=0.0)
    qk = tl.dot(q_a, tl.trans(k_a))
    if VSPLIT == 2:
        qk = tl.dot(q_b, tl.trans(k_b), qk)
    qk = tl.dot(q_pe, tl.trans(k_pe), qk) * scale_log2
    if MASKED:
        qk = tl.where((offs_n < end)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(qk, 1, _maximum))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _add)
    acc = tl.dot(p.to(k_a.dtype), k_a, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["S", "SPLITS", "max_len"])
def _mla_decode_partial(
    q_ptr, kv_ptr, lat_desc, pe_desc, bt_ptr, len_ptr, o_ptr, lse_ptr,
    stride_qr, stride_qn, stride_kv0, stride_kv1, stride_bt,
    stride_or, stride_on, stride_ok, stride_lr, stride_ln,
    S, N, SPLITS, max_len, scale_log2,
    C: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, PAGE_TILE: tl.constexpr,
    TMA: tl.constexpr, FINAL: tl.constexpr, VSPLIT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, TRIGGER: tl.constexpr = False,
):
    if TRIGGER:   # the reduction (launched with PDL) may be placed now; it waits for this grid's end itself
        tl.extra.cuda.gdc_launch_dependents()
    pid0 = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    hblk = pid0 // VSPLIT
    ha = pid0 % VSPLIT                                      # which value slice this program owns
    seq = row // S
    start, end, end_full = split_range(len_ptr, row, split, SPLITS, max_len, BLOCK_N)

    offs_h = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_a = ha * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_b = (1 - ha) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < N
    q_row = q_ptr + row.to(tl.int64) * stride_qr + offs_h[:, None] * stride_qn
    q_a = tl.load(q_row + offs_a[None, :], mask=mask_h[:, None] & (offs_a[None, :] < C), other=0.0)
    q_pe = tl.load(q_row + C + offs_r[None, :], mask=mask_h[:, None] & (offs_r[None, :] < DR), other=0.0)
    q_b = q_pe
    if VSPLIT == 2:
        q_b = tl.load(q_row + offs_b[None, :], mask=mask_h[:, None] & (offs_b[None, :] < C), other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_V], 0.0, tl.float32)
    if TMA:  # full tiles by TMA, then the row's ragged last tile by masked loads
        for n0 in range(start, end_full, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q_a, q_b, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr, seq,
                                  n0, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2, ha,
                                  C, DR, PAGE, PAGED, PAGE_TILE, True, False, VSPLIT, BLOCK_N, BLOCK_V, BLOCK_R)
        if end_full < end:
            acc, m_i, l_i = _tile(acc, m_i, l_i, q_a, q_b, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr, seq,
                                  end_full, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2, ha,
                                  C, DR, PAGE, PAGED, PAGE_TILE, True, True, VSPLIT, BLOCK_N, BLOCK_V, BLOCK_R)
    else:    # one masked loop (a separate tail tile costs the mma.sync path registers)
        for n0 in range(start, end, BLOCK_N):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q_a, q_b, q_pe, kv_ptr, lat_desc, pe_desc, bt_ptr, seq,
                                  n0, end, stride_kv0, stride_kv1, stride_bt, max_len, scale_log2, ha,
                                  C, DR, PAGE, PAGED, PAGE_TILE, False, True, VSPLIT, BLOCK_N, BLOCK_V, BLOCK_R)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + row.to(tl.int64) * stride_or + offs_h[:, None] * stride_on + split * stride_ok
    tl.store(o_ptrs + offs_a[None, :], out.to(o_ptr.dtype.element_ty),
             mask=mask_h[:, None] & (offs_a[None, :] < C))
    if not FINAL:
        if ha == 0:  # every value slice computes the same lse; one writes it
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + row.to(tl.int64) * stride_lr + offs_h * stride_ln + split, lse, mask=mask_h)


@triton.jit(do_not_specialize=["SPLITS"])
def _mla_decode_reduce(
    o_part_ptr, lse_ptr, out_ptr,
    stride_pr, stride_pn, stride_pk, stride_lr, stride_ln, stride_or, stride_on,
    N, C, SPLITS,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK_K: tl.constexpr,
    WAIT: tl.constexpr = False,
):
    """Program (head block, row, value slice): out = sum_k 2^(lse_k - m) o_k / sum_k 2^(lse_k - m), the
    K partials read CHUNK_K splits at a time as [BH, CHUNK_K, BC] tiles. WAIT: launched with PDL, so
    stage 1 may still run; griddepcontrol.wait returns once it has ended and its stores are visible."""
    if WAIT:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(1)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, CHUNK_K)
    mask_h = offs_h < N
    mask_hc = mask_h[:, None, None] & (offs_c < C)[None, None, :]
    lse_rows = lse_ptr + row.to(tl.int64) * stride_lr + offs_h[:, None] * stride_ln
    part = (o_part_ptr + row.to(tl.int64) * stride_pr + offs_h[:, None, None].to(tl.int64) * stride_pn
            + offs_c[None, None, :])
    # the first chunk's partials are loaded before the lse max and sum need them: with K <= CHUNK_K (few rows,
    # the latency-bound case) the program's reads then all go out in one round trip
    o_0 = tl.load(part + offs_j[None, :, None] * stride_pk, mask=mask_hc & (offs_j < SPLITS)[None, :, None],
                  other=0.0)
    lse_0 = tl.load(lse_rows + offs_j[None, :], mask=mask_h[:, None] & (offs_j[None, :] < SPLITS),
                    other=float("-inf"))
    lse = tl.load(lse_rows + offs_k[None, :], mask=mask_h[:, None] & (offs_k[None, :] < SPLITS),
                  other=float("-inf"))
    m = tl.reduce(lse, 1, _maximum)
    m = tl.where(m == float("-inf"), 0.0, m)            # all splits empty: weights are all 0
    denom = tl.reduce(tl.exp2(lse - m[:, None]), 1, _add)
    acc = tl.reduce(tl.exp2(lse_0 - m[:, None])[:, :, None] * o_0.to(tl.float32), 1, _add)
    for k0 in range(CHUNK_K, SPLITS, CHUNK_K):
        ks = k0 + offs_j
        w = tl.exp2(tl.load(lse_rows + ks[None, :], mask=mask_h[:, None] & (ks[None, :] < SPLITS),
                            other=float("-inf")) - m[:, None])
        o_k = tl.load(part + ks[None, :, None] * stride_pk, mask=mask_hc & (ks < SPLITS)[None, :, None],
                      other=0.0)
        acc += tl.reduce(w[:, :, None] * o_k.to(tl.float32), 1, _add)
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = out_ptr + row.to(tl.int64) * stride_or + offs_h[:, None] * stride_on + offs_c[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & (offs_c < C)[None, :])


def runs_interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    return type(_mla_decode_partial).__name__ == "InterpretedFunction"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _descriptors(kv: torch.Tensor, c: int, dr: int, t: DecodeTuning, bv: int) -> tuple:
    """TMA descriptors over the cache rows viewed as [rows, Dc]: latent slices and the rope key."""
    why = tma_unsupported(kv, c, t)
    if why:
        raise ValueError(why)
    flat = kv.view(-1, kv.shape[-1])
    br = _pow2(dr)
    return (TensorDescriptor(flat, [flat.shape[0], c], [flat.shape[1], 1], [t.block_n, bv]),
            TensorDescriptor(flat[:, c:], [flat.shape[0], dr], [flat.shape[1], 1], [t.block_n, br]))


def decode_tuning_for(q: torch.Tensor, kv: torch.Tensor, kv_lora_rank: int) -> DecodeTuning:
    """The tuning mla_decode uses when given none: default_tuning for these heads and rows, with the Gluon wgmma
    stage 1 where it can run and plain loads where TMA cannot (q [R, N, Dc], kv the cache as mla_decode takes it)."""
    t = default_tuning(q.shape[1], q.shape[0],
                       wgmma=not mla_decode_wgmma.unsupported(q, kv, kv_lora_rank, runs_interpreted()))
    return replace(t, tma=False) if t.tma and tma_unsupported(kv, kv_lora_rank, t) else t


def mla_decode(q: torch.Tensor, kv: torch.Tensor, ctx_lens: torch.Tensor, kv_lora_rank: int, sm_scale: float,
               block_table: torch.Tensor | None = None, num_splits: int | None = None,
               tuning: DecodeTuning | None = None) -> torch.Tensor:
    """Attention of absorbed queries over the compressed cache; returns the latent output [R, N, C].

    q [R, N, Dc] (latent-absorbed query ++ roped query), rows r = b * S + s; kv [B, L_max, Dc]
    (contiguous) or [P, G, Dc] with block_table [B, M] int32 (paged); ctx_lens [R] int32: row r
    attends to cache rows [0, ctx_lens[r]) of sequence r // S, where S = R // B. Rows with length 0
    give 0. q and kv share a dtype (float16/bfloat16/float32); output has that dtype. No host sync.
    """
    if q.dim() != 3 or kv.dim() != 3 or q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"q must be [R, N, Dc] and kv [*, *, Dc], got {tuple(q.shape)} and "
                         f"{tuple(kv.shape)}")
    if q.dtype != kv.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q and kv must share a float16/bfloat16/float32 dtype, got {q.dtype} and {kv.dtype}")
    if q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("q and kv must have unit stride in their last dim")
    rows, heads, dc = q.shape
    dr = dc - kv_lora_rank
    if not 0 < kv_lora_rank < dc:
        raise ValueError(f"kv_lora_rank must be in (0, Dc={dc}), got {kv_lora_rank}")
    if ctx_lens.shape != (rows,) or ctx_lens.dtype != torch.int32 or not ctx_lens.is_contiguous():
        raise ValueError(f"ctx_lens must be contiguous [R={rows}] int32, got {tuple(ctx_lens.shape)} "
                         f"{ctx_lens.dtype}")
    paged = block_table is not None
    batch = block_table.shape[0] if paged else kv.shape[0]
    if rows == 0:  # no query rows (also no sequences): nothing to attend
        return q.new_zeros((0, heads, kv_lora_rank))
    if rows % batch:
        raise ValueError(f"rows R={rows} must be a multiple of the cache batch B={batch}")
    if paged and (block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.stride(1) != 1):
        raise ValueError(f"block_table must be [B, M] int32 with unit inner stride, got {block_table.dtype}")
    max_len = block_table.shape[1] * kv.shape[1] if paged else kv.shape[1]
    t = tuning or decode_tuning_for(q, kv, kv_lora_rank)
    check_fields(t)
    # the default picks wgmma only where it can run; an explicit tuning is checked here
    explicit_wgmma = tuning is not None and t.wgmma
    wgmma_why = mla_decode_wgmma.unsupported(q, kv, kv_lora_rank, runs_interpreted()) if explicit_wgmma else ""
    if wgmma_why:
        raise ValueError(wgmma_why)
    if t.warp_specialize and not (t.wgmma and mla_decode_wgmma_ws.supported_triton()):
        raise ValueError("tuning.warp_specialize needs tuning.wgmma and Triton >= 3.6 (Gluon's warp_specialize)")
    if t.key_major and t.num_stages < 2 and q.is_cuda and not runs_interpreted():
        # Triton 3.6 miscompiles the key-major tile staged in registers: one stage gave relative errors ~7 and
        # illegal addresses on an H200 (run 162, bench/results/mla_notes.md); two or more stages are right
        raise ValueError(f"tuning.num_stages must be >= 2 with key_major on a GPU, got {t.num_stages}")
    bv = block_v(kv_lora_rank) if t.key_major else _pow2(kv_lora_rank) // t.value_splits
    descs = _descriptors(kv, kv_lora_rank, dr, t, bv) if t.tma else (None, None)
    head_programs = triton.cdiv(heads, t.block_h) * t.value_splits
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    k = num_splits or default_splits(rows, heads, max_len, t, q.device, kv_lora_rank, dc * q.element_size(), paged)
    out = torch.empty(rows, heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    if k == 1:
        o_part, lse = out.unsqueeze(2), out  # lse unused when FINAL
    else:
        part_dtype = q.dtype if t.input_dtype_partials else torch.float32
        o_part = torch.empty(rows, heads, k, kv_lora_rank, dtype=part_dtype, device=q.device)
        lse = torch.empty(rows, heads, k, dtype=torch.float32, device=q.device)
    bt = block_table if paged else ctx_lens
    kernel, extra = (_mla_decode_partial_km, {}) if t.key_major else (_mla_decode_partial, {"VSPLIT": t.value_splits})
    pdl = k > 1 and t.pdl and (t.warp_specialize or not t.wgmma) and pdl_supported(q.device, runs_interpreted())
    if pdl:
        extra["TRIGGER"] = True
    if t.wgmma:
        launch = mla_decode_wgmma_ws.launch_partial if t.warp_specialize else mla_decode_wgmma.launch_partial
        launch(q, kv, bt, ctx_lens, o_part, lse, kv_lora_rank, rows // batch, k, max_len,
               sm_scale * 1.4426950408889634, paged, **({"trigger": True} if pdl else {}),
               **({"store_tma": True} if t.store_tma else {}),
               **({"order": t.first_tile_alone + 2 * t.q_first} if t.warp_specialize else {}))
    else:
        kernel[(head_programs, rows, k)](
            q, kv, *descs, bt, ctx_lens, o_part, lse,
            q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), bt.stride(0),
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
            rows // batch, heads, k, max_len, sm_scale * 1.4426950408889634,
            C=kv_lora_rank, DR=dr, PAGE=kv.shape[1] if paged else 1, PAGED=paged,
            PAGE_TILE=paged and kv.shape[1] % t.block_n == 0, TMA=t.tma, FINAL=k == 1,
            BLOCK_H=t.block_h, BLOCK_N=t.block_n, BLOCK_V=bv, BLOCK_R=_pow2(dr),
            num_warps=t.num_warps, num_stages=t.num_stages, **extra,
        )
    if k > 1:
        bh, bc, kc = reduce_blocks(rows, heads, kv_lora_rank, k, device_sms(q.device), t)
        _mla_decode_reduce[(triton.cdiv(heads, bh), rows, triton.cdiv(kv_lora_rank, bc))](
            o_part, lse, out,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), heads, kv_lora_rank, k,
            BLOCK_H=bh, BLOCK_C=bc, BLOCK_K=max(2, triton.next_power_of_2(k)), CHUNK_K=kc, num_warps=t.reduce_warps,
            **({"WAIT": True, "launch_pdl": True} if pdl else {}),
        )
    return out
