"""The Triton MLA kernels as torch custom ops, so a layer with triton attention traces into one graph
(torch.compile(fullgraph=True)): the compiler sees an opaque op with a known output shape, never the kernel.

Dimension legend: R query rows (B * S), B sequences, S new tokens per sequence, N heads, Dc cache row
(C latent + Dr rope), C kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims, L keys per sequence.

Eagerly the kernels are called directly (a custom op's dispatch costs host time per call); the ops are for
torch.compile only (attention/backends.py picks).
"""

from __future__ import annotations

import torch

from nanomoe_fn.opaque import opaque_to_compile


@opaque_to_compile  # Triton kernels: opaque to torch.compile, which fuses the glue around them
def decode_eager(rows: torch.Tensor, kv: torch.Tensor, ctx: torch.Tensor, block_table: torch.Tensor | None,
                 kv_lora_rank: int, scale: float) -> torch.Tensor:
    """kernels/mla_decode.py on rows [R, N, Dc], kv, ctx [R] int32 -> [R, N, C]."""
    from nanomoe_kernels.mla_decode import mla_decode

    return mla_decode(rows, kv, ctx, kv_lora_rank, scale, block_table=block_table)


@opaque_to_compile  # Triton kernels: opaque to torch.compile, which fuses the glue around them
def prefill_eager(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                  v: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """kernels/mla_prefill.py -> [B, S, N, Dv]; positions [B, S] int32."""
    from nanomoe_kernels.mla_prefill import mla_prefill

    return mla_prefill(q_nope, q_pe, k_nope, k_pe, v, positions, scale)


@torch.library.custom_op("nanomoe::mla_decode", mutates_args=())
def _decode_op(rows: torch.Tensor, kv: torch.Tensor, ctx: torch.Tensor, block_table: torch.Tensor | None,
               kv_lora_rank: int, scale: float) -> torch.Tensor:
    from nanomoe_kernels.mla_decode import mla_decode

    return mla_decode(rows, kv, ctx, kv_lora_rank, scale, block_table=block_table)


@_decode_op.register_fake
def _(rows: torch.Tensor, kv: torch.Tensor, ctx: torch.Tensor, block_table: torch.Tensor | None,
      kv_lora_rank: int, scale: float) -> torch.Tensor:
    return rows.new_empty((rows.shape[0], rows.shape[1], kv_lora_rank))


@torch.library.custom_op("nanomoe::mla_prefill", mutates_args=())
def _prefill_op(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                v: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    from nanomoe_kernels.mla_prefill import mla_prefill

    return mla_prefill(q_nope, q_pe, k_nope, k_pe, v, positions, scale)


@_prefill_op.register_fake
def _(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor,
      positions: torch.Tensor, scale: float) -> torch.Tensor:
    return q_nope.new_empty((*q_nope.shape[:3], v.shape[-1]))
