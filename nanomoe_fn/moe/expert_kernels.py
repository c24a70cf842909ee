"""`triton` and `deepgemm` expert backends: adapters from ExpertBatch to the bf16/fp16/fp32 kernels in kernels/.

Dimension legend: P_local local experts, M rows (contiguous layout), C capacity (masked layout), H hidden,
I intermediate, R token rows of a gathered batch.
Both take the batch's layout as is (contiguous rows + counts, or masked [P_local, C, H] + counts) and
never sync with the host; rows past an expert's count are padding and stay unwritten (combine and
to_contiguous never read them). A gathered batch (x [R, H] + index [M]) gives a contiguous [M, H]:
triton loads the first GEMM's rows through the index, deepgemm's permute kernel reads through it.
Both take bf16/fp16/fp32 records only (refuse_fp8); the FP8 backends (`triton_fp8`, `deepgemm_fp8`) are
in expert_kernels_fp8.py.
"""

from __future__ import annotations

import os

import torch

from nanomoe_fn.batch import ExpertBatch
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.params import Experts, SwiGLUExperts, expert_tensors, refuse_fp8
from nanomoe_fn.opaque import opaque_to_compile


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


def triton_run(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    """Grouped-GEMM Triton kernels (SwiGLU fused into the first GEMM's epilogue). Under torch.compile a
    masked batch goes through the custom op nanomoe::fused_moe_masked (fixed shapes) and a gathered one
    through nanomoe::fused_moe_gathered (its row count may be an unbacked size: OpComm's prefill batches), so
    a layer over an OpComm compiles as one graph; a contiguous batch is a graph break."""
    refuse_fp8(experts, "expert backend 'triton'")
    ws, kind = expert_tensors(experts), _expert_type(experts)
    if batch.layout == "masked" and torch.compiler.is_compiling():
        return batch.with_x(torch.ops.nanomoe.fused_moe_masked(batch.x, batch.counts, list(ws), kind))
    if batch.layout == "gathered" and torch.compiler.is_compiling():
        return batch.with_x(torch.ops.nanomoe.fused_moe_gathered(batch.x, batch.index, batch.counts, list(ws), kind))
    return batch.with_x(_triton_eager(ws, kind, batch))


@opaque_to_compile  # Triton kernels: opaque to torch.compile, which fuses the glue around them
def _triton_eager(ws: tuple[torch.Tensor, ...], kind: str, batch: ExpertBatch) -> torch.Tensor:
    from nanomoe_kernels.fused_moe import fused_moe_contiguous, fused_moe_gathered, fused_moe_masked

    if batch.layout == "masked":
        return fused_moe_masked(batch.x, batch.counts, ws, kind)
    if batch.layout == "gathered":
        return fused_moe_gathered(batch.x, batch.index, batch.counts, ws, kind)
    return fused_moe_contiguous(batch.x, batch.counts, ws, kind)


@torch.library.custom_op("nanomoe::fused_moe_masked", mutates_args=())
def _fused_moe_masked_op(x: torch.Tensor, counts: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    from nanomoe_kernels.fused_moe import fused_moe_masked

    return fused_moe_masked(x, counts, tuple(ws), kind)


@_fused_moe_masked_op.register_fake
def _(x: torch.Tensor, counts: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], ws[-1].shape[1]))  # [P_local, C, H_out]: the last weight is [E, H_out, .]


@torch.library.custom_op("nanomoe::fused_moe_gathered", mutates_args=())
def _fused_moe_gathered_op(x: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, ws: list[torch.Tensor],
                           kind: str) -> torch.Tensor:
    from nanomoe_kernels.fused_moe import fused_moe_gathered

    return fused_moe_gathered(x, index, counts, tuple(ws), kind)


@_fused_moe_gathered_op.register_fake
def _(x: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, ws: list[torch.Tensor], kind: str) -> torch.Tensor:
    return x.new_empty((index.shape[0], ws[-1].shape[1]))  # [M, H_out]: one row per batch row


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


@opaque_to_compile  # DeepGEMM and Triton kernels: opaque to torch.compile
def deepgemm_run(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    """DeepGEMM m-grouped bf16 GEMMs with Triton glue (kernels/moe_permute.py, kernels/moe_silu.py): contiguous
    and gathered rows are permuted into the padded layout (a gathered batch through its index, never materialized),
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

