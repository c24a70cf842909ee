"""`expert_ffn`: run each local expert on its rows. Backends by name in a registry.

Dimension legend: P_local local expert slots, P_sel experts a padded batch holds, M rows, C capacity
(rows per expert, padded), H hidden, I intermediate. SwiGLU: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T
with w13 = [w1; w3] [P, 2I, H]; linear: y = x @ w.T. The activation is computed in float32 and rounded to
the weights' dtype before the down projection, as the fused kernels do.

Dimension legend (gathered batches): R token rows in batch.x, M batch rows (batch.index [M]).
Every backend takes the three layouts of nanomoe_fn.batch; a gathered batch comes back contiguous
[M, H] (`loop` materializes it first; `bmm`, `triton` and `deepgemm` load their rows through the index).

Backends, slowest first: `loop` (one GEMM pair per expert; the obviously right baseline), `bmm`
(rows gathered into a padded [P_sel, C, H] batch by one index_select, C the largest count; one batched
GEMM per projection, the activation in bounded float32 chunks; one index_select back), `triton`
(grouped-GEMM Triton kernels, SwiGLU fused; kernels/fused_moe.py) and `deepgemm` (DeepGEMM's
m-grouped GEMMs; kernels/deepgemm.py). `supports(cfg, device)` says why one cannot run.
FP8 backends (moe/expert_kernels_fp8.py): `triton_fp8` (kernels/fused_moe_fp8.py; `triton_fp8_hilo` the same
with two-term activations, about bf16's accuracy), `deepgemm_fp8`
(DeepGEMM's FP8 grouped GEMMs; kernels/deepgemm_fp8.py) and `triton_w8a16` (the FP8 weights with bf16/fp16
rows never quantised; kernels/fused_moe_w8a16.py) take SwiGLUExpertsFP8 (block-scaled FP8 weights)
and only those, with batch rows in bf16/fp16/fp32 (quantised per token and 128 channels inside) or already
FP8 (batch.x float8_e4m3fn + batch.x_scale, from an FP8 dispatch; output bfloat16); every other backend
takes bf16/fp16/fp32 records and rows only (ExpertBackend.fp8 says which, `_check` refuses the other kind
by name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nanomoe_kernels.activation import swiglu_act

from nanomoe_fn.batch import ExpertBatch
from nanomoe_fn.checks import FLOAT_DTYPES, INT_DTYPES, check_tensor, check_values, pick_backend
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.expert_kernels import deepgemm_run, deepgemm_supports, triton_run, triton_supports
from nanomoe_fn.moe.expert_kernels_fp8 import (
    deepgemm_fp8_run,
    deepgemm_fp8_supports,
    triton_fp8_hilo_run,
    triton_fp8_run,
    triton_fp8_supports,
    triton_w8a16_run,
    triton_w8a16_supports,
)
from nanomoe_fn.moe.params import (
    Experts,
    FP8Experts,
    LinearExperts,
    LinearExpertsFP8,
    SwiGLUExperts,
    SwiGLUExpertsFP8,
    expert_tensors,
    refuse_fp8,
)


def _check(experts: Experts | FP8Experts, batch: ExpertBatch, backend: str = "bmm") -> None:
    """Argument checks naming `expert_params` / `batch.*`; the counts' and index's values are checked on
    the device (no host sync on GPUs): counts in [0, C] (masked) or summing to M (contiguous, gathered),
    index in [0, R) (gathered). An FP8 record goes to an FP8 backend only, and the other way round;
    with FP8 weights batch.x is bf16/fp16/fp32."""
    fp8 = EXPERT_BACKENDS[backend].fp8
    if fp8 and not isinstance(experts, SwiGLUExpertsFP8):
        raise TypeError(f"expert backend {backend!r} runs SwiGLUExpertsFP8 (block-scaled FP8 weights), got "
                        f"{type(experts).__name__}: quantize with nanomoe_fn.moe.fp8_params.quantize_experts, "
                        f"or pick a bf16/fp16/fp32 backend")
    if not fp8 and isinstance(experts, (SwiGLUExpertsFP8, LinearExpertsFP8)):
        raise TypeError(f"expert backend {backend!r} runs bf16/fp16/fp32 experts, got {type(experts).__name__} "
                        f"(block-scaled FP8 weights): use backend='triton_fp8', or dequantize first with "
                        f"nanomoe_fn.moe.fp8_params.dequantize_experts")
    if not isinstance(experts, (SwiGLUExperts, LinearExperts, SwiGLUExpertsFP8)):
        raise TypeError(f"expert_params must be SwiGLUExperts or LinearExperts, got {type(experts).__name__}")
    if not isinstance(batch, ExpertBatch):
        raise TypeError(f"batch must be an ExpertBatch (dispatch's output), got {type(batch).__name__}")
    ws = expert_tensors(experts)
    P, H = ws[0].shape[0], experts.hidden if isinstance(experts, SwiGLUExpertsFP8) else ws[0].shape[-1]
    if batch.x_scale is not None and not fp8:
        raise TypeError(f"batch.x holds FP8 rows (float8_e4m3fn with x_scale, from an FP8 dispatch): expert backend "
                        f"{backend!r} runs bf16/fp16/fp32 rows; use an FP8 backend (triton_fp8, deepgemm_fp8) with "
                        f"FP8 weights, or dispatch in bf16")
    x_dtypes = FLOAT_DTYPES[:3] + (torch.float8_e4m3fn,) if fp8 else (ws[0].dtype,)
    x = check_tensor("batch.x", batch.x, dim=3 if batch.layout == "masked" else 2,
                     dtypes=x_dtypes, device=ws[0].device)
    counts = check_tensor("batch.counts", batch.counts, dim=1, dtypes=INT_DTYPES, device=x.device)
    if counts.shape[0] != P:
        raise ValueError(f"batch.counts must have one entry per local expert ({P}), got {counts.shape[0]}")
    if x.shape[-1] != H:
        raise ValueError(f"batch.x must have hidden size {H} (the experts'), got {x.shape[-1]}")
    if batch.layout == "masked":
        if x.shape[0] != P or x.shape[1] < 1:
            raise ValueError(f"masked batch.x must be [{P}, C >= 1, {H}], got {tuple(x.shape)}")
        if P:
            lo, hi = torch.aminmax(counts)
            check_values((lo >= 0) & (hi <= x.shape[1]), f"batch.counts must lie in [0, C={x.shape[1]}] (masked "
                                                         f"batch.x [{P}, C, {H}]): an expert has more rows than C")
    elif batch.layout == "gathered":
        index = check_tensor("batch.index", batch.index, dim=1, dtypes=INT_DTYPES, device=x.device)
        M, R = index.shape[0], x.shape[0]
        compiling = torch.compiler.is_compiling()  # M and R may be unbacked sizes there (OpComm): no branch on them
        M_txt, R_txt = ("M", "R") if compiling else (M, R)
        if P:
            check_values((counts.min() >= 0) & (counts.sum() == M),
                         f"batch.counts must be >= 0 and sum to the {M_txt} rows of batch.index (gathered)")
        elif compiling:
            check_values(index.new_ones(index.shape[0]).sum() == 0,
                         "batch.index has rows but there are no local experts (batch.counts is empty)")
        elif M:
            raise ValueError(f"batch.index has {M} rows but there are no local experts (batch.counts is empty)")
        msg = f"batch.index must lie in [0, R={R_txt}) (the rows of batch.x, gathered)"
        if compiling:
            check_values(((index >= 0) & (index < R)).all(), msg)
        elif M:
            lo, hi = torch.aminmax(index)
            check_values((lo >= 0) & (hi < R), msg)
    elif P:
        check_values((counts.min() >= 0) & (counts.sum() == x.shape[0]),
                     f"batch.counts must be >= 0 and sum to the {x.shape[0]} rows of batch.x (contiguous)")
    elif x.shape[0]:
        raise ValueError(f"batch.x has {x.shape[0]} rows but there are no local experts (batch.counts is empty)")


def _swiglu_expert(w13: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: w13 [2I, H], w2 [H, I], rows [m, H] -> [m, H]."""
    return swiglu_act(rows @ w13.T, rows.dtype) @ w2.T


def _linear_expert(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One linear expert: w [H, H], rows [m, H] -> [m, H]."""
    return rows @ w.T


def one_expert(experts: Experts) -> Callable[..., torch.Tensor]:
    """The math of one expert, f(*weights of that expert, rows [m, H]) -> [m, H]: the `loop` backend calls it
    per expert; `bmm` runs the same math batched over experts (`_bmm_experts`)."""
    return _swiglu_expert if isinstance(experts, SwiGLUExperts) else _linear_expert


def _apply(experts: Experts, e: int, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Expert e on rows [m, H], written into out [m, H]."""
    out.copy_(one_expert(experts)(*(w[e] for w in expert_tensors(experts)), rows))


def _loop(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    refuse_fp8(experts, "expert backend 'loop'")
    batch = batch.materialize()
    # host copy of the counts: a Python loop over experts needs them (the slow baseline; not for decode)
    active = [(e, c) for e, c in enumerate(batch.counts.tolist()) if c]
    if batch.layout == "masked":
        y = torch.zeros_like(batch.x)
        for e, c in active:
            _apply(experts, e, batch.x[e, :c], y[e, :c])
        return batch.with_x(y)
    y = torch.empty_like(batch.x)
    sizes = [c for _, c in active]
    for (e, _), rows, out in zip(active, batch.x.split(sizes), y.split(sizes)):
        _apply(experts, e, rows, out)
    return batch.with_x(y)


# float32 bytes of one activation chunk: the temporary stays this small at any batch size (and on an H200,
# whose L2 holds 50 MB, silu's float32 output is mostly read back from L2 by the multiply)
ACT_CHUNK_BYTES = 32 << 20
# rows per expert where a bf16 GEMM turns compute-bound on an H200 (715 TFLOP/s over 4.2 TB/s); the cost
# model below counts an expert's weights as 1 (read once) and its padded rows as max(1, C / RIDGE_ROWS)
RIDGE_ROWS = 170


def batch_all_experts(P: int, active: int, C: int) -> bool:
    """Whether `bmm` batches all P experts (weights read once; empty experts compute padding) rather than
    only the `active` ones with their weights copied out (read, written, read again): by the cost model
    above, all P unless that costs more."""
    per = max(1.0, C / RIDGE_ROWS)
    return active == P or P * per <= active * (2 + per)


def _swiglu_chunked(h: torch.Tensor) -> torch.Tensor:
    """swiglu_act over the rows of h [P_sel * C, 2I] -> [P_sel * C, I] in h's dtype, in chunks of
    ACT_CHUNK_BYTES of float32: the same float32 math (silu(gate) in float32, times up, rounded once),
    so the same bits as swiglu_act on all of h."""
    rows, I = h.shape[0], h.shape[1] // 2
    out = h.new_empty((rows, I))
    step = max(1, ACT_CHUNK_BYTES // (4 * max(I, 1)))
    for r0 in range(0, rows, step):
        gate, up = h[r0:r0 + step].chunk(2, dim=-1)
        act = F.silu(gate.float(), inplace=gate.dtype != torch.float32)  # a float32 gate is a view of h
        torch.mul(act, up, out=out[r0:r0 + step])  # float32 product, rounded to h's dtype on the store
    return out


def _swiglu_padded(h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """swiglu_act of h [P_sel, C, 2I] -> [P_sel, C, I] for the rows j < counts[e] of each expert; the padding
    rows' values are unspecified. On a GPU one Triton pass (kernels/moe_silu.silu_mul: the same float32
    math, no float32 temporary, padding rows skipped); elsewhere (and under torch.compile) _swiglu_chunked over
    every row."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16, torch.float32) and not torch.compiler.is_compiling():
        from nanomoe_kernels.moe_silu import silu_mul

        return silu_mul(h, masked_m=counts)
    P_sel, C, _ = h.shape
    return _swiglu_chunked(h.view(P_sel * C, -1)).view(P_sel, C, -1)


def _bmm_experts(experts: Experts, xp: torch.Tensor, sel: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """The experts at `sel` (all when None) on their padded rows: xp [P_sel, C, H] -> [P_sel, C, H]; counts
    [P_sel] live rows per expert (rows past them come back unspecified)."""
    ws = expert_tensors(experts)
    if sel is not None:
        ws = tuple(w.index_select(0, sel) for w in ws)
    if isinstance(experts, LinearExperts):
        return torch.bmm(xp, ws[0].transpose(1, 2))
    h = torch.bmm(xp, ws[0].transpose(1, 2))  # [P_sel, C, 2I]
    act = _swiglu_padded(h, counts)
    del h
    return torch.bmm(act, ws[1].transpose(1, 2))


def _bmm(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    refuse_fp8(experts, "expert backend 'bmm'")
    if batch.layout == "masked":  # no host sync: every expert, its C rows
        return batch.with_x(_bmm_experts(experts, batch.x, None, batch.counts))
    H, P, M, dev = batch.x.shape[1], batch.num_experts, batch.num_rows, batch.x.device
    # host copy of the counts: the padded batch's shape depends on them (prefill-style path)
    counts_host = batch.counts.tolist()
    active = [e for e, c in enumerate(counts_host) if c]
    if not active:
        return batch.with_x(batch.x.new_empty((0, H)))
    C = max(counts_host)
    dense = batch_all_experts(P, len(active), C)
    counts = batch.counts.long()
    offsets = torch.cumsum(counts, 0) - counts
    sel = None if dense else torch.tensor(active, device=dev)
    if sel is not None:
        counts, offsets = counts[sel], offsets[sel]
    # source row of each padded slot [P_sel * C]: the expert's rows, then its last row again (any valid row
    # would do: padding rows are computed and dropped, each output row depends on its own row only)
    slot = torch.arange(C, device=dev)
    src = (offsets[:, None] + torch.minimum(slot[None, :], (counts - 1).clamp(min=0)[:, None])).clamp(max=M - 1)
    src = src.flatten() if batch.index is None else batch.index[src.flatten()]
    xp = batch.x.index_select(0, src).view(-1, C, H)
    # padded position of each batch row [M]: row m of expert e sits at rank(e) * C + (m - offsets[e])
    shift = torch.arange(counts.shape[0], device=dev) * C - offsets
    pos = torch.arange(M, device=dev) + torch.repeat_interleave(shift, counts, output_size=M)
    y = _bmm_experts(experts, xp, sel, counts)
    return batch.with_x(y.view(-1, y.shape[-1]).index_select(0, pos))


@dataclass(frozen=True)
class ExpertBackend:
    """A named expert-compute backend: `supports(cfg, device) -> (ok, reason)` and `run(experts, batch)`;
    fp8: it takes FP8 records (SwiGLUExpertsFP8) instead of bf16/fp16/fp32 ones; capturable: it never reads
    device values on the host at decode sizes, so a decode step on it can be captured in a CUDA graph."""

    name: str
    supports: Callable[[MoEConfig, torch.device], tuple[bool, str]]
    run: Callable[[Experts, ExpertBatch], ExpertBatch]
    fp8: bool = False
    capturable: bool = True


def _always(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    return True, ""


EXPERT_BACKENDS: dict[str, ExpertBackend] = {
    "loop": ExpertBackend("loop", _always, _loop, capturable=False),   # per-expert row counts on the host
    "bmm": ExpertBackend("bmm", _always, _bmm, capturable=False),      # its padded size, from the counts
    "triton": ExpertBackend("triton", triton_supports, triton_run),
    "deepgemm": ExpertBackend("deepgemm", deepgemm_supports, deepgemm_run),
    "triton_fp8": ExpertBackend("triton_fp8", triton_fp8_supports, triton_fp8_run, fp8=True),
    "triton_fp8_hilo": ExpertBackend("triton_fp8_hilo", triton_fp8_supports, triton_fp8_hilo_run, fp8=True),
    "deepgemm_fp8": ExpertBackend("deepgemm_fp8", deepgemm_fp8_supports, deepgemm_fp8_run, fp8=True),
    "triton_w8a16": ExpertBackend("triton_w8a16", triton_w8a16_supports, triton_w8a16_run, fp8=True),
}


def capturable_backends() -> list[str]:
    """Names of the expert backends whose decode step can be captured in a CUDA graph (no host reads)."""
    return [name for name, backend in EXPERT_BACKENDS.items() if backend.capturable]


def get_expert_backend(name: str, cfg: MoEConfig, device: torch.device | str) -> ExpertBackend:
    """The backend called `name`, or ValueError saying why it cannot run this config on `device`."""
    return pick_backend("expert", EXPERT_BACKENDS, name, cfg, device)


def expert_ffn(expert_params: Experts | FP8Experts, batch: ExpertBatch, backend: str = "bmm") -> ExpertBatch:
    """Apply each local expert to its rows; the output keeps the batch's layout and counts (a gathered
    batch gives the contiguous batch [M, H], rows in batch row order). FP8 records need an FP8 backend."""
    if not isinstance(backend, str) or backend not in EXPERT_BACKENDS:
        raise (ValueError if isinstance(backend, str) else TypeError)(
            f"expert backend must be one of {sorted(EXPERT_BACKENDS)}, got {backend!r}")
    _check(expert_params, batch, backend)
    return EXPERT_BACKENDS[backend].run(expert_params, batch)
