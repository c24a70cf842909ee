"""Adapter over DeepGEMM's bf16 m-grouped GEMMs (package `deep_gemm` from `sgl-deep-gemm`), optional.

Dimension legend: E experts, H hidden, I expert intermediate, T tokens, k experts per token,
N rows of a contiguous batch, G token rows a gathered batch reads through its index,
R rows after padding each expert to the alignment A (DeepGEMM's m alignment for the contiguous
layout, 128 on Hopper; asked from the package), cap rows per expert in the masked layout.

DeepGEMM computes D = A @ B[g].T per group g, bf16 in, bf16 out:
- contiguous: A [R, H], B [E, rows, H], D [R, rows], m_indices [R] int32 = the group of each row,
  -1 for padding (a block whose first row is -1 is skipped); every group starts at a multiple of A.
- masked: A [E, cap, H], D [E, cap, rows], masked_m [E] int32 rows used per group, expected_m an
  int hint of the typical masked_m (it picks the kernel's tile).
The whole SwiGLU expert FFN here is two grouped GEMMs plus Triton glue (kernels/moe_permute.py, kernels/moe_silu.py):
`permute_rows` gathers rows into the padded order and writes m_indices, `silu_mul` is silu(gate) * up
in float32 rounded to bf16 (padding rows skipped), `unpermute_sum` reads each token's rows back and
sums them with the top-k weights. At prefill sizes the two GEMMs run in the masked layout instead
(`with_capacity` places expert e's aligned rows at e * cap): kernels/deepgemm_layout.py picks the layout and
cap, from a bound on any expert's rows (no host sync) or one host read. The contiguous path has no host sync
either: with an alignment made ahead (or moe_align inside the capture) it captures into a CUDA graph.
Entry points mirror kernels/fused_moe:
`deepgemm_fused_moe` (x [T, H] + top-k routing -> [T, H]), `deepgemm_moe_contiguous`,
`deepgemm_moe_gathered` and `deepgemm_moe_masked`.
Known-good build: sgl-deep-gemm 0.1.4.post1 with apache-tvm-ffi 0.1.11 on torch 2.11 (0.1.5.post3 to
0.2.2 load there but misread tensors). `supports` says why DeepGEMM cannot run.
"""

from __future__ import annotations

import functools

import torch
from nanomoe_kernels.checks import check_routing, check_values
from nanomoe_kernels.deepgemm_layout import LAYOUTS, experts_per_group, pick_layout
from nanomoe_kernels.moe_align import Alignment, moe_align, moe_align_contiguous
from nanomoe_kernels.moe_capacity import with_capacity
from nanomoe_kernels.moe_permute import permute_rows, unpermute_sum
from nanomoe_kernels.moe_silu import silu_mul

# versions that import but compute wrong results on the GPU machine's torch 2.11
_BAD_VERSIONS = ("0.1.5", "0.1.6", "0.1.7", "0.2.0", "0.2.1", "0.2.2")


def probe_deep_gemm(fns: tuple[str, ...]) -> tuple[object | None, str]:
    """(module, "") when `deep_gemm` imports, is not a known-bad version and has every function in `fns`,
    else (None, why). Uncached: each adapter caches its own answer."""
    try:
        import deep_gemm
    except Exception as err:  # ImportError, or its JIT/runtime failing to initialise
        return None, f"deep_gemm is not importable ({type(err).__name__}: {err}); pip install sgl-deep-gemm"
    version = getattr(deep_gemm, "__version__", "unknown")
    if version.startswith(_BAD_VERSIONS):
        return None, f"deep_gemm {version} is known to misread tensors here; use sgl-deep-gemm 0.1.4.post1"
    for fn in fns:
        if not hasattr(deep_gemm, fn):
            return None, f"deep_gemm {version} has no {fn}"
    return deep_gemm, ""


def contiguous_alignment(dg: object) -> int:
    """DeepGEMM's row alignment per group in the contiguous layout (128 on Hopper), asked from the module."""
    get = getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or \
        getattr(dg, "get_m_alignment_for_contiguous_layout", None)
    return int(get()) if get is not None else 128


@functools.cache
def _deep_gemm() -> tuple[object | None, str]:
    """(module, "") or (None, why its bf16 grouped GEMMs are unavailable); imported once."""
    return probe_deep_gemm(("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked"))


def supports(x: torch.Tensor | None = None,
             weights: tuple[torch.Tensor, ...] | None = None) -> tuple[bool, str]:
    """(True, "") when DeepGEMM can run these tensors here, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "DeepGEMM needs a CUDA GPU; none is visible"
    device = x.device if x is not None else torch.device("cuda")
    if device.type != "cuda":
        return False, f"DeepGEMM needs CUDA tensors, got {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return False, f"DeepGEMM's grouped GEMMs need Hopper (sm_90) or Blackwell, got sm_{major}{minor}"
    dg, why = _deep_gemm()
    if dg is None:
        return False, why
    tensors = ([x] if x is not None else []) + list(weights or ())
    for t in tensors:
        if t.dtype != torch.bfloat16:
            return False, f"this adapter runs DeepGEMM in bfloat16 only, got {t.dtype}"
    if weights is not None:
        if len(weights) != 2:
            return False, "this adapter runs SwiGLU experts (w13, w2) only"
        _, I2, H = weights[0].shape
        if H % 64 or (I2 // 2) % 64:
            return False, f"hidden ({H}) and intermediate ({I2 // 2}) must be multiples of 64 for DeepGEMM"
    return True, ""


def _require(x: torch.Tensor, weights: tuple[torch.Tensor, ...], layout: str = "auto"):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ok, why = supports(x, weights)
    if not ok:
        raise ValueError(f"deepgemm backend cannot run: {why}")
    return _deep_gemm()[0]


def alignment() -> int:
    """Rows per expert in the contiguous layout must be padded to a multiple of this (128 on Hopper)."""
    dg, why = _deep_gemm()
    if dg is None:
        raise ValueError(f"deepgemm backend cannot run: {why}")
    return contiguous_alignment(dg)


def deepgemm_grouped_ffn(a: torch.Tensor, m_indices: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN on the padded contiguous layout: a [R, H] bf16, m_indices [R] int32 -> [R, H].

    Rows with m_indices -1 are padding: their output rows are unspecified (never meant to be read)."""
    dg = _require(a, (w13, w2))
    R, H = a.shape
    if m_indices.dtype != torch.int32 or m_indices.shape != (R,) or not m_indices.is_contiguous():
        raise ValueError(f"m_indices must be contiguous int32 [{R}], got {m_indices.dtype} "
                         f"{tuple(m_indices.shape)}")
    h = a.new_empty((R, w13.shape[1]))
    dg.m_grouped_bf16_gemm_nt_contiguous(a, w13, h, m_indices)
    y = a.new_empty((R, H))
    dg.m_grouped_bf16_gemm_nt_contiguous(silu_mul(h, m_indices=m_indices), w2, y, m_indices)
    return y


def _check_alignment(align: Alignment, num_rows: int) -> None:
    A = alignment()
    if align.block_m % A or align.num_rows != num_rows:
        raise ValueError(f"align must pad experts to a multiple of DeepGEMM's alignment ({A}) and sort "
                         f"{num_rows} rows, got block_m={align.block_m}, num_rows={align.num_rows}")


def deepgemm_fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       weights: tuple[torch.Tensor, ...], align: Alignment | None = None,
                       validate: bool = False, layout: str = "auto") -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H] bf16 -> [T, H] (the contract
    of kernels.fused_moe.fused_moe, SwiGLU experts).

    align: moe_align(topk_ids, E, alignment()) made ahead (a bench timing the FFN alone, or a CUDA graph
    replaying with fixed routing); None aligns here. layout: one of kernels/deepgemm_layout.LAYOUTS
    ("auto", "contiguous", "masked", "bounded"; bounded at T rows per expert: k distinct experts a token).
    The weighted k-sum is in float32, rounded once. Ids outside [0, E) are an error
    with validate=True (async on GPUs); otherwise their pairs add nothing."""
    _require(x, tuple(weights), layout)
    w13, w2 = weights
    E = w13.shape[0]
    if x.dim() != 2 or x.shape[1] != w13.shape[2]:
        raise ValueError(f"x must be [T, H={w13.shape[2]}], got {tuple(x.shape)}")
    T = x.shape[0]
    k = check_routing(topk_ids, topk_weights, T, E)
    if x.stride(1) != 1:
        x = x.contiguous()
    if align is None:
        align = moe_align(topk_ids, E, alignment(), validate=validate)
    _check_alignment(align, T * k)
    if T == 0:
        return x.new_zeros((0, x.shape[1]))
    # bound_rows = T: a token's k experts are distinct, so no expert gets more than T rows
    return _grouped_ffn(x, align, k, None, w13, w2, layout, T, T, k, topk_weights)


def _grouped_ffn(x: torch.Tensor, align: Alignment, a_div: int, a_index: torch.Tensor | None,
                 w13: torch.Tensor, w2: torch.Tensor, layout: str, bound_rows: int | None, T: int, k: int,
                 topk_weights: torch.Tensor | None) -> torch.Tensor:
    """out [T, H]: the SwiGLU FFN of the aligned rows of x, summed per token over its k rows (weighted by
    topk_weights); the two GEMMs run in DeepGEMM's masked layout or its contiguous one, as
    kernels/deepgemm_layout.pick_layout chooses; the bounded masked layout runs its experts in groups whose
    buffers fit (deepgemm_layout.experts_per_group), each group's sums added in float32, rounded once."""
    E, H, I = w13.shape[0], w13.shape[2], w2.shape[2]
    row_bytes = (H + 3 * I) * x.element_size()
    kind, cap = pick_layout(align, E, layout, alignment(), flop_per_row=6.0 * H * I, bound_rows=bound_rows,
                            bytes_per_row=row_bytes)
    if cap == 0:
        a, m_indices = permute_rows(x, align, a_div=a_div, a_index=a_index)
        return unpermute_sum(deepgemm_grouped_ffn(a, m_indices, w13, w2), align, T, k, topk_weights)
    if kind == "bounded":  # no host read: an expert past the bound is an error (async), never a dropped row
        check_values(align.padded_counts.max() <= cap,
                     f"an expert got more than {bound_rows} rows, the bound of DeepGEMM's masked layout here "
                     f"(does the routing repeat an expert within a token?)")
    group = experts_per_group(E, cap, row_bytes) if kind == "bounded" else E
    acc = None if group >= E else torch.zeros((T, H), dtype=torch.float32, device=x.device)
    for e0 in range(0, E, group):
        e1 = min(E, e0 + group)
        al, live = with_capacity(align, cap, experts=None if group >= E else (e0, e1))
        a, _ = permute_rows(x, al, a_div=a_div, a_index=a_index, capacity=cap, live=live)  # live rows only
        a = a.view(e1 - e0, cap, H)
        y = _masked_ffn(a, live, w13[e0:e1], w2[e0:e1], max(1, align.num_rows // E), out=a,  # a is ours
                        max_rows=align.num_rows)
        out = unpermute_sum(y.view((e1 - e0) * cap, H), al, T, k, topk_weights, accumulate=acc)
    return out if acc is None else acc.to(x.dtype)


def _batch_ffn(rows: torch.Tensor, index: torch.Tensor | None, N: int, counts: torch.Tensor,
               weights: tuple[torch.Tensor, ...], validate: bool, layout: str) -> torch.Tensor:
    """[N, H], batch row i = expert(rows[i]) (rows[index[i]] with an index); see the two callers. With an
    index, each expert reads distinct token rows (its bound: the G rows), as top-k routing gives."""
    _require(rows, tuple(weights), layout)
    w13, w2 = weights
    if rows.dim() != 2 or rows.shape[1] != w13.shape[2]:
        raise ValueError(f"rows must be [rows, H={w13.shape[2]}], got {tuple(rows.shape)}")
    if counts.dim() != 1 or counts.shape[0] != w13.shape[0]:
        raise ValueError(f"counts must be [E={w13.shape[0]}], got {tuple(counts.shape)}")
    if N == 0:
        return rows.new_empty((0, rows.shape[1]))
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    align = moe_align_contiguous(counts, N, alignment(), validate=validate)
    bound = rows.shape[0] if index is not None else None
    return _grouped_ffn(rows, align, 1, index, w13, w2, layout, bound, N, 1, None)


def deepgemm_moe_contiguous(rows: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                            validate: bool = False, layout: str = "auto") -> torch.Tensor:
    """rows [N, H] sorted by expert, counts [E] -> [N, H] (row i = its expert's SwiGLU FFN, no weighting).

    Pads each expert's rows to `alignment()` (permute_rows), runs the two grouped GEMMs in DeepGEMM's
    contiguous or masked layout (`layout`: kernels/deepgemm_layout.py; no bound is known here, so
    "bounded" is refused) and reads the rows back (unpermute_sum). Rows past sum(counts) come back as zeros.
    """
    return _batch_ffn(rows, None, rows.shape[0] if rows.dim() == 2 else 0, counts, weights, validate, layout)


def deepgemm_moe_gathered(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
                          weights: tuple[torch.Tensor, ...], validate: bool = False,
                          layout: str = "auto") -> torch.Tensor:
    """rows [G, H] token rows, index [N] int32/int64 in [0, G), counts [E] -> [N, H], row i =
    expert(rows[index[i]]): deepgemm_moe_contiguous on rows[index] without making it (permute_rows
    reads through the index). Each expert's rows must be distinct token rows (as top-k routing gives): the
    masked layout's "bounded" capacity is G. validate=True checks the index (async on GPUs)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be a 1-dim int32/int64 tensor, got {getattr(index, 'shape', index)}")
    if index.device != rows.device:
        raise ValueError(f"index must be on {rows.device} (with the rows), got {index.device}")
    if validate and index.numel():
        lo, hi = torch.aminmax(index)
        check_values((lo >= 0) & (hi < rows.shape[0]), f"index must lie in [0, {rows.shape[0]}) (the rows)")
    return _batch_ffn(rows, index.contiguous(), index.shape[0], counts, weights, validate, layout)


def deepgemm_moe_masked(x: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                        expected_m: int | None = None) -> torch.Tensor:
    """x [E, cap, H] bf16, expert e's rows x[e, :counts[e]] -> [E, cap, H]; rows past counts[e] are
    whatever DeepGEMM leaves there (unspecified). expected_m: typical rows per expert (default cap)."""
    _require(x, tuple(weights))
    w13, w2 = weights
    E, cap, H = x.shape
    if w13.shape[0] != E or counts.shape != (E,):
        raise ValueError(f"x must be [E={w13.shape[0]}, cap, H] and counts [E], got {tuple(x.shape)} "
                         f"and {tuple(counts.shape)}")
    if cap == 0:
        return x.new_empty((E, 0, H))
    # DeepGEMM's masked kernel reads [E, cap, H] in whole row blocks: a cap that is not a multiple of
    # the alignment computes wrong rows (seen on the H200 with cap=48), so pad the capacity up
    pad = (-cap) % alignment()
    xp = torch.cat([x, x.new_zeros((E, pad, H))], dim=1) if pad else x.contiguous()
    expected = max(1, min(cap, cap if expected_m is None else expected_m))
    return _masked_ffn(xp, counts, w13, w2, expected)[:, :cap]


def _masked_ffn(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, expected: int,
                out: torch.Tensor | None = None, max_rows: int | None = None) -> torch.Tensor:
    """The two masked GEMMs on x [E, cap, H] (cap a multiple of the alignment) -> [E, cap, H], written into
    `out` when given (it may be x itself: x is read only by the first GEMM). max_rows: a host bound on
    sum(counts), for silu_mul's grid."""
    dg = _deep_gemm()[0]
    masked_m = counts.to(torch.int32).contiguous()
    h = x.new_empty((*x.shape[:2], w13.shape[1]))
    dg.m_grouped_bf16_gemm_nt_masked(x, w13, h, masked_m, expected)
    y = x.new_empty(x.shape) if out is None else out
    # rows past masked_m[e] are neither read nor written by silu_mul
    dg.m_grouped_bf16_gemm_nt_masked(silu_mul(h, masked_m=masked_m, max_rows=max_rows), w2, y, masked_m, expected)
    return y
