"""Adapter over DeepGEMM's bf16 m-grouped GEMMs (package `deep_gemm` from `sgl-deep-gemm`), optional.

Dimension legend: E experts, H hidden, I expert intermediate, N rows of a contiguous batch,
R rows after padding each expert to the alignment A (DeepGEMM's m alignment for the contiguous
layout, 128 on Hopper; asked from the package), cap rows per expert in the masked layout.

DeepGEMM computes D = A @ B[g].T per group g, bf16 in, bf16 out:
- contiguous: A [R, H], B [E, rows, H], D [R, rows], m_indices [R] int32 = the group of each row,
  -1 for padding (a block whose first row is -1 is skipped); every group starts at a multiple of A.
- masked: A [E, cap, H], D [E, cap, rows], masked_m [E] int32 rows used per group, expected_m an
  int hint of the typical masked_m (it picks the kernel's tile).
The whole SwiGLU expert FFN here is two grouped GEMMs plus torch glue: silu(gate) * up in float32
rounded to bf16, and for the contiguous layout a gather into the padded order and a scatter back.
Known-good build: sgl-deep-gemm 0.1.4.post1 with apache-tvm-ffi 0.1.11 on torch 2.11 (0.1.5.post3 to
0.2.2 load but misread tensors; see ANCHORS.md). `supports` says why DeepGEMM cannot run.
"""

from __future__ import annotations

import functools

import torch
from nanomoe_kernels.activation import swiglu_act
from nanomoe_kernels.moe_align import moe_align_contiguous

# versions that import but compute wrong results on the GPU machine's torch (ANCHORS.md)
_BAD_VERSIONS = ("0.1.5", "0.1.6", "0.1.7", "0.2.0", "0.2.1", "0.2.2")


@functools.cache
def _deep_gemm() -> tuple[object | None, str]:
    """(module, "") or (None, why it is unavailable); imported once."""
    try:
        import deep_gemm
    except Exception as err:  # ImportError, or its JIT/runtime failing to initialise
        return None, f"deep_gemm is not importable ({type(err).__name__}: {err}); pip install sgl-deep-gemm"
    version = getattr(deep_gemm, "__version__", "unknown")
    if version.startswith(_BAD_VERSIONS):
        return None, f"deep_gemm {version} is known to misread tensors here; use sgl-deep-gemm 0.1.4.post1"
    for fn in ("m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked"):
        if not hasattr(deep_gemm, fn):
            return None, f"deep_gemm {version} has no {fn}"
    return deep_gemm, ""


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


def _require(x: torch.Tensor, weights: tuple[torch.Tensor, ...]):
    ok, why = supports(x, weights)
    if not ok:
        raise ValueError(f"deepgemm backend cannot run: {why}")
    return _deep_gemm()[0]


def alignment() -> int:
    """Rows per expert in the contiguous layout must be padded to a multiple of this (128 on Hopper)."""
    dg, why = _deep_gemm()
    if dg is None:
        raise ValueError(f"deepgemm backend cannot run: {why}")
    get = getattr(dg, "get_mk_alignment_for_contiguous_layout", None) or \
        getattr(dg, "get_m_alignment_for_contiguous_layout", None)
    return int(get()) if get is not None else 128


def deepgemm_grouped_ffn(a: torch.Tensor, m_indices: torch.Tensor, w13: torch.Tensor,
                         w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN on the padded contiguous layout: a [R, H] bf16, m_indices [R] int32 -> [R, H]."""
    dg = _require(a, (w13, w2))
    R, H = a.shape
    if m_indices.dtype != torch.int32 or m_indices.shape != (R,) or not m_indices.is_contiguous():
        raise ValueError(f"m_indices must be contiguous int32 [{R}], got {m_indices.dtype} "
                         f"{tuple(m_indices.shape)}")
    h = a.new_empty((R, w13.shape[1]))
    dg.m_grouped_bf16_gemm_nt_contiguous(a, w13, h, m_indices)
    y = a.new_empty((R, H))
    dg.m_grouped_bf16_gemm_nt_contiguous(swiglu_act(h, h.dtype), w2, y, m_indices)
    return y


def deepgemm_moe_contiguous(rows: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                            validate: bool = False) -> torch.Tensor:
    """rows [N, H] sorted by expert, counts [E] -> [N, H] (row i = its expert's SwiGLU FFN, no weighting).

    Pads each expert's rows to `alignment()` (a gather), runs `deepgemm_grouped_ffn` and scatters the
    rows back; no host sync. Rows past sum(counts) are left unwritten.
    """
    _require(rows, tuple(weights))
    w13, w2 = weights
    N, H = rows.shape
    if counts.dim() != 1 or counts.shape[0] != w13.shape[0]:
        raise ValueError(f"counts must be [E={w13.shape[0]}], got {tuple(counts.shape)}")
    out = rows.new_empty((N + 1, H))  # the extra row takes the padding's scatter
    if N == 0:
        return out[:0]
    al = moe_align_contiguous(counts, N, alignment(), validate=validate)
    R = al.sorted_ids.numel()
    pos = torch.arange(R, device=rows.device)
    live = (pos < al.num_padded) & (al.sorted_ids < N)
    src = torch.where(live, al.sorted_ids, N).long()  # entries past num_padded were never written
    m_indices = torch.where(live, al.expert_ids.repeat_interleave(al.block_m), -1).to(torch.int32)
    a = rows.index_select(0, src.clamp(max=N - 1))
    y = deepgemm_grouped_ffn(a, m_indices.contiguous(), w13, w2)
    out.index_copy_(0, src, y)
    return out[:N]


def deepgemm_moe_masked(x: torch.Tensor, counts: torch.Tensor, weights: tuple[torch.Tensor, ...],
                        expected_m: int | None = None) -> torch.Tensor:
    """x [E, cap, H] bf16, expert e's rows x[e, :counts[e]] -> [E, cap, H]; rows past counts[e] are
    whatever DeepGEMM leaves there (unspecified). expected_m: typical rows per expert (default cap)."""
    dg = _require(x, tuple(weights))
    w13, w2 = weights
    E, cap, H = x.shape
    if w13.shape[0] != E or counts.shape != (E,):
        raise ValueError(f"x must be [E={w13.shape[0]}, cap, H] and counts [E], got {tuple(x.shape)} "
                         f"and {tuple(counts.shape)}")
    if cap == 0:
        return x.new_empty((E, 0, H))
    masked_m = counts.to(torch.int32).contiguous()
    expected = max(1, min(cap, cap if expected_m is None else expected_m))
    # DeepGEMM's masked kernel reads [E, cap, H] in whole row blocks: a cap that is not a multiple of
    # the alignment computes wrong rows (seen on the H200 with cap=48), so pad the capacity up
    pad = (-cap) % alignment()
    xp = torch.cat([x, x.new_zeros((E, pad, H))], dim=1) if pad else x.contiguous()
    h = x.new_empty((E, cap + pad, w13.shape[1]))
    dg.m_grouped_bf16_gemm_nt_masked(xp, w13, h, masked_m, expected)
    y = x.new_empty((E, cap + pad, H))
    dg.m_grouped_bf16_gemm_nt_masked(swiglu_act(h, h.dtype), w2, y, masked_m, expected)
    return y[:, :cap]
