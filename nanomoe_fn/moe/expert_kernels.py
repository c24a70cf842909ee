"""`triton`, `deepgemm` and `triton_fp8` expert backends: adapters from ExpertBatch to the kernels in kernels/.

Dimension legend: P_local local experts, M rows (contiguous layout), C capacity (masked layout), H hidden,
I intermediate, R token rows of a gathered batch.
Both take the batch's layout as is (contiguous rows + counts, or masked [P_local, C, H] + counts) and
never sync with the host; rows past an expert's count are padding and stay unwritten (combine and
to_contiguous never read them). A gathered batch (x [R, H] + index [M]) gives a contiguous [M, H]:
triton loads the first GEMM's rows through the index, deepgemm's permute kernel reads through it.
`triton_fp8` runs SwiGLUExpertsFP8 (DeepSeek-V3's 128 x 128 block-scaled float8_e4m3fn weights) through
kernels/fused_moe_fp8.py: rows quantised per token and 128 channels, FP8 GEMMs, output in x's dtype; a
gathered batch's R token rows are quantised once and read through the index. The other backends take
bf16/fp16/fp32 records only (refuse_fp8).
"""

from __future__ import annotations

import os

import torch

from nanomoe_fn.batch import ExpertBatch
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.params import Experts, SwiGLUExperts, SwiGLUExpertsFP8, expert_tensors, refuse_fp8

FP8_BLOCK = 128  # the kernels' scale block (DeepSeek-V3's), both ways


def _expert_type(experts: Experts) -> str:
    return "swiglu" if isinstance(experts, SwiGLUExperts) else "linear"


def triton_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA GPUs, or on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not importable ({err}); pip install triton"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU), got {device}"


@torch.compiler.disable  # Triton kernels: opaque to torch.compile, which fuses the glue around them
def triton_run(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    """Grouped-GEMM Triton kernels (SwiGLU fused into the first GEMM's epilogue)."""
    from nanomoe_kernels.fused_moe import fused_moe_contiguous, fused_moe_gathered, fused_moe_masked

    refuse_fp8(experts, "expert backend 'triton'")
    ws, kind = expert_tensors(experts), _expert_type(experts)
    if batch.layout == "masked":
        return batch.with_x(fused_moe_masked(batch.x, batch.counts, ws, kind))
    if batch.layout == "gathered":
        return batch.with_x(fused_moe_gathered(batch.x, batch.index, batch.counts, ws, kind))
    return batch.with_x(fused_moe_contiguous(batch.x, batch.counts, ws, kind))


def deepgemm_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """DeepGEMM: SwiGLU experts with hidden and intermediate multiples of 64, a Hopper or Blackwell
    GPU and the sgl-deep-gemm package (kernels/deepgemm.py); bf16 tensors are checked when it runs."""
    if cfg.expert_type != "swiglu":
        return False, f"the DeepGEMM adapter implements SwiGLU experts, not {cfg.expert_type!r}"
    if cfg.hidden % 64 or cfg.intermediate % 64:
        return False, (f"DeepGEMM needs hidden ({cfg.hidden}) and intermediate ({cfg.intermediate}) "
                       f"to be multiples of 64")
    from nanomoe_kernels.deepgemm import supports

    if device.type != "cuda":
        return False, f"DeepGEMM needs a CUDA device, got {device}"
    return supports()


@torch.compiler.disable  # DeepGEMM and Triton kernels: opaque to torch.compile
def deepgemm_run(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    """DeepGEMM m-grouped bf16 GEMMs with Triton glue (kernels/moe_permute.py): contiguous and gathered
    rows are permuted into the padded layout (a gathered batch through its index, never materialized),
    masked batches run as they are; SwiGLU's activation is a Triton kernel between the GEMMs."""
    from nanomoe_kernels.deepgemm import deepgemm_moe_contiguous, deepgemm_moe_gathered, deepgemm_moe_masked

    refuse_fp8(experts, "expert backend 'deepgemm'")
    if not isinstance(experts, SwiGLUExperts):
        raise ValueError("the deepgemm backend needs SwiGLU experts")
    ws = expert_tensors(experts)
    if batch.layout == "masked":
        return batch.with_x(deepgemm_moe_masked(batch.x, batch.counts, ws))
    if batch.layout == "gathered":
        return batch.with_x(deepgemm_moe_gathered(batch.x, batch.index, batch.counts, ws))
    return batch.with_x(deepgemm_moe_contiguous(batch.x, batch.counts, ws))


def triton_fp8_supports(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    """FP8 Triton kernels: SwiGLU experts with hidden and intermediate multiples of 128 (the scale block),
    on a CUDA GPU with float8 tensor cores (sm_89+: Ada, Hopper, Blackwell) or the CPU interpreter."""
    if cfg.expert_type != "swiglu":
        return False, f"the FP8 Triton kernels implement SwiGLU experts, not {cfg.expert_type!r}"
    if cfg.hidden % FP8_BLOCK or cfg.intermediate % FP8_BLOCK:
        return False, (f"FP8 block scales need hidden ({cfg.hidden}) and intermediate ({cfg.intermediate}) to be "
                       f"multiples of {FP8_BLOCK}")
    ok, why = triton_supports(cfg, device)
    if ok and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return False, f"FP8 tensor cores need sm_89 or newer (Ada, Hopper, Blackwell), got sm_{major}{minor}"
    return ok, why


@torch.compiler.disable  # Triton kernels: opaque to torch.compile
def triton_fp8_run(experts: SwiGLUExpertsFP8, batch: ExpertBatch) -> ExpertBatch:
    """Block-scaled FP8 grouped GEMMs (kernels/fused_moe_fp8.py) on an FP8 record; output in batch.x's dtype."""
    from nanomoe_kernels import fused_moe_fp8 as f8

    if not isinstance(experts, SwiGLUExpertsFP8):
        raise TypeError(f"expert backend 'triton_fp8' runs SwiGLUExpertsFP8 (block-scaled FP8 weights), got "
                        f"{type(experts).__name__}: quantize with nanomoe_fn.moe.fp8_params.quantize_experts")
    if tuple(experts.block) != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"expert backend 'triton_fp8' needs {FP8_BLOCK} x {FP8_BLOCK} scale blocks, got "
                         f"experts.block={tuple(experts.block)}")
    ws = (experts.w13, experts.w13_scale, experts.w2, experts.w2_scale)
    if batch.layout == "masked":
        return batch.with_x(f8.fused_moe_fp8_masked(batch.x, batch.counts, *ws))
    if batch.layout == "gathered":
        return batch.with_x(f8.fused_moe_fp8_gathered(batch.x, batch.index, batch.counts, *ws))
    return batch.with_x(f8.fused_moe_fp8_contiguous(batch.x, batch.counts, *ws))
