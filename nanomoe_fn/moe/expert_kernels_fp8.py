"""The FP8 expert backends `triton_fp8`, `triton_fp8_hilo`, `deepgemm_fp8` and `triton_w8a16`: ExpertBatch ->
the FP8 kernels in kernels/.

Dimension legend: P_local local experts, M rows (contiguous layout), C capacity (masked layout), H hidden,
I intermediate, R token rows of a gathered batch, HG = H / 128.
Both run SwiGLUExpertsFP8 (DeepSeek-V3's 128 x 128 block-scaled float8_e4m3fn weights) on any of the three
layouts and never sync with the host; rows past an expert's count are padding (unspecified in the output;
combine and to_contiguous never read them); a gathered batch gives a contiguous [M, H] (its R token rows
are quantised once and read through the index, never materialized). Batch rows are bf16/fp16/fp32
(quantised per token and 128 channels in the kernels; output in that dtype) or already FP8: batch.x
float8_e4m3fn with batch.x_scale float32 [..., HG] (a comm that sends FP8; strided views allowed), passed
on as rows_scale; the output is then bfloat16.
- `triton_fp8`: kernels/fused_moe_fp8.py (Triton FP8 grouped GEMMs, quantisation fused into the epilogue);
  records in the block layout (moe/fp8_params.tile_experts) run here (and on triton_fp8_hilo) only.
- `triton_fp8_hilo`: the same kernels with two-term activations (act_terms=2: x and the SwiGLU output as
  [hi | lo] FP8 pairs, two FP8 MMAs per step): ~1e-3 from the unquantised FFN where W8A8 is ~4e-2, ~8% slower
  than triton_fp8 where weight bytes bound the time (decode); FP8 batches (one-term) are refused.
- `deepgemm_fp8`: kernels/deepgemm_fp8.py (DeepGEMM's FP8 m-grouped GEMMs, contiguous or masked, with the
  Triton glue of kernels/fp8_glue.py); Hopper (sm_90) and the sgl-deep-gemm package.
- `triton_w8a16`: kernels/fused_moe_w8a16.py: the same FP8 weights, bf16/fp16 rows never quantised (each
  weight tile dequantised in the GEMM); FP8 batches are refused.
"""

from __future__ import annotations

import torch

from nanomoe_fn.batch import ExpertBatch
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.expert_kernels import triton_supports
from nanomoe_fn.moe.params import SwiGLUExpertsFP8
from nanomoe_fn.opaque import opaque_to_compile

FP8_BLOCK = 128  # the kernels' scale block (DeepSeek-V3's), both ways


def _check_cfg(cfg: MoEConfig, what: str) -> tuple[bool, str]:
    if cfg.expert_type != "swiglu":
        return False, f"{what} implement SwiGLU experts, not {cfg.expert_type!r}"
    if cfg.hidden % FP8_BLOCK or cfg.intermediate % FP8_BLOCK:
        return False, (f"FP8 block scales need hidden ({cfg.hidden}) and intermediate ({cfg.intermediate}) to be "
                       f"multiples of {FP8_BLOCK}")
    return True, ""


def _fp8_weights(experts: SwiGLUExpertsFP8, backend: str) -> tuple[torch.Tensor, ...]:
    """(w13, w13_scale, w2, w2_scale) after checking the record is FP8 with 128 x 128 blocks."""
    if not isinstance(experts, SwiGLUExpertsFP8):
        raise TypeError(f"expert backend {backend!r} runs SwiGLUExpertsFP8 (block-scaled FP8 weights), got "
                        f"{type(experts).__name__}: quantize with nanomoe_fn.moe.fp8_params.quantize_experts")
    if tuple(experts.block) != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"expert backend {backend!r} needs {FP8_BLOCK} x {FP8_BLOCK} scale blocks, got "
                         f"experts.block={tuple(experts.block)}")
    if experts.tiled and not backend.startswith("triton_fp8"):
        raise ValueError(f"expert backend {backend!r} runs FP8 weights as rows [E, 2I, H] / [E, H, I]; these are in "
                         f"the block layout (tile_experts): use triton_fp8 / triton_fp8_hilo, or "
                         f"nanomoe_fn.moe.fp8_params.untile_experts first")
    return experts.w13, experts.w13_scale, experts.w2, experts.w2_scale


def triton_fp8_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """FP8 Triton kernels: SwiGLU experts with hidden and intermediate multiples of 128 (the scale block),
    on a CUDA GPU with float8 tensor cores (sm_89+: Ada, Hopper, Blackwell) or the CPU interpreter."""
    ok, why = _check_cfg(cfg, "the FP8 Triton kernels")
    if not ok:
        return ok, why
    ok, why = triton_supports(cfg, device)
    if ok and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return False, f"FP8 tensor cores need sm_89 or newer (Ada, Hopper, Blackwell), got sm_{major}{minor}"
    return ok, why


@opaque_to_compile  # Triton kernels: opaque to torch.compile
def triton_fp8_run(experts: SwiGLUExpertsFP8, batch: ExpertBatch, act_terms: int = 1) -> ExpertBatch:
    """Block-scaled FP8 grouped GEMMs (kernels/fused_moe_fp8.py) on an FP8 record; output in batch.x's dtype
    (bfloat16 for FP8 rows, whose batch.x_scale goes on as rows_scale); act_terms=2: two-term activations."""
    from nanomoe_kernels import fused_moe_fp8 as f8

    name = "triton_fp8" if act_terms == 1 else "triton_fp8_hilo"
    ws, scale = _fp8_weights(experts, name), batch.x_scale
    if scale is not None and act_terms == 2:
        raise TypeError("expert backend 'triton_fp8_hilo' quantises bf16/fp16/fp32 rows itself (two terms); this "
                        "batch holds one-term FP8 rows (an FP8 dispatch): use triton_fp8, or dispatch in bf16")
    kw = dict(rows_scale=scale, act_terms=act_terms)
    if batch.layout == "masked":
        return batch.with_x(f8.fused_moe_fp8_masked(batch.x, batch.counts, *ws, **kw))
    if batch.layout == "gathered":
        return batch.with_x(f8.fused_moe_fp8_gathered(batch.x, batch.index, batch.counts, *ws, **kw))
    return batch.with_x(f8.fused_moe_fp8_contiguous(batch.x, batch.counts, *ws, **kw))


@opaque_to_compile  # Triton kernels: opaque to torch.compile
def triton_fp8_hilo_run(experts: SwiGLUExpertsFP8, batch: ExpertBatch) -> ExpertBatch:
    """triton_fp8 with two-term activations (module docstring): FP8 MMAs at about bf16's accuracy."""
    return triton_fp8_run(experts, batch, act_terms=2)


def deepgemm_fp8_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """DeepGEMM FP8: SwiGLU experts with hidden and intermediate multiples of 128, a Hopper (sm_90) GPU and
    the sgl-deep-gemm package (kernels/deepgemm_fp8.py); tensors are checked when it runs."""
    ok, why = _check_cfg(cfg, "DeepGEMM's FP8 grouped GEMMs")
    if not ok:
        return ok, why
    if device.type != "cuda":
        return False, f"DeepGEMM needs a CUDA device, got {device}"
    from nanomoe_kernels.deepgemm_fp8 import supports_fp8

    return supports_fp8()


@opaque_to_compile  # DeepGEMM and Triton kernels: opaque to torch.compile
def deepgemm_fp8_run(experts: SwiGLUExpertsFP8, batch: ExpertBatch) -> ExpertBatch:
    """DeepGEMM's FP8 m-grouped GEMMs with Triton glue (kernels/fp8_glue.py): contiguous and gathered rows
    are quantised once and permuted into the padded layout (a gathered batch through its index), masked
    batches are packed to an aligned capacity; output in batch.x's dtype (bfloat16 for FP8 rows)."""
    from nanomoe_kernels import deepgemm_fp8 as dg8

    ws, scale = _fp8_weights(experts, "deepgemm_fp8"), batch.x_scale
    if batch.layout == "masked":
        return batch.with_x(dg8.deepgemm_fp8_moe_masked(batch.x, batch.counts, *ws, rows_scale=scale))
    if batch.layout == "gathered":
        return batch.with_x(dg8.deepgemm_fp8_moe_gathered(batch.x, batch.index, batch.counts, *ws,
                                                          rows_scale=scale))
    return batch.with_x(dg8.deepgemm_fp8_moe_contiguous(batch.x, batch.counts, *ws, rows_scale=scale))


def triton_w8a16_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """W8A16 Triton kernels (kernels/fused_moe_w8a16.py): triton_fp8's conditions; rows bf16/fp16."""
    return triton_fp8_supports(cfg, device)


@opaque_to_compile  # Triton kernels: opaque to torch.compile
def triton_w8a16_run(experts: SwiGLUExpertsFP8, batch: ExpertBatch) -> ExpertBatch:
    """FP8 weights dequantised tile by tile into bf16/fp16 GEMMs (kernels/fused_moe_w8a16.py): no activation
    quantisation, so only bf16 rounding separates it from the FFN on the dequantised weights."""
    from nanomoe_kernels import fused_moe_w8a16 as w8

    if batch.x_scale is not None:
        raise TypeError("expert backend 'triton_w8a16' runs bf16/fp16 rows; this batch holds FP8 rows (an FP8 "
                        "dispatch): use triton_fp8 or deepgemm_fp8, or dispatch in bf16")
    ws = _fp8_weights(experts, "triton_w8a16")
    if batch.layout == "masked":
        return batch.with_x(w8.fused_moe_w8a16_masked(batch.x, batch.counts, *ws))
    if batch.layout == "gathered":
        return batch.with_x(w8.fused_moe_w8a16_gathered(batch.x, batch.index, batch.counts, *ws))
    return batch.with_x(w8.fused_moe_w8a16_contiguous(batch.x, batch.counts, *ws))
