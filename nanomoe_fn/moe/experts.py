"""`expert_ffn`: run each local expert on its rows. Backends by name in a registry.

Dimension legend: P_local local expert slots, M rows, C capacity (rows per expert, padded), H hidden,
I intermediate. SwiGLU: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T with w13 = [w1; w3] [P, 2I, H];
linear: y = x @ w.T. The activation is computed in float32 and rounded to the weights' dtype before
the down projection, as the fused kernels do.

Dimension legend (gathered batches): R token rows in batch.x, M batch rows (batch.index [M]).
Every backend takes the three layouts of nanomoe_fn.batch; a gathered batch comes back contiguous
[M, H] (`loop`, `bmm` and `deepgemm` materialize it first; `triton` loads its rows through the index).

Backends, slowest first: `loop` (one GEMM pair per expert; the obviously right baseline), `bmm`
(rows scattered into a padded [P_active, C, H] batch, one batched GEMM per projection), `triton`
(grouped-GEMM Triton kernels, SwiGLU fused; kernels/fused_moe.py) and `deepgemm` (DeepGEMM's
m-grouped GEMMs; kernels/deepgemm.py). `supports(cfg, device)` says why one cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from nanomoe_kernels.activation import swiglu_act

from nanomoe_fn.batch import ExpertBatch, row_coords
from nanomoe_fn.checks import INT_DTYPES, check_tensor, check_values, pick_backend
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.expert_kernels import deepgemm_run, deepgemm_supports, triton_run, triton_supports
from nanomoe_fn.moe.params import Experts, LinearExperts, SwiGLUExperts, expert_tensors


def _check(experts: Experts, batch: ExpertBatch) -> None:
    """Argument checks naming `expert_params` / `batch.*`; the counts' and index's values are checked on
    the device (no host sync on GPUs): counts in [0, C] (masked) or summing to M (contiguous, gathered),
    index in [0, R) (gathered)."""
    if not isinstance(experts, (SwiGLUExperts, LinearExperts)):
        raise TypeError(f"expert_params must be SwiGLUExperts or LinearExperts, got {type(experts).__name__}")
    if not isinstance(batch, ExpertBatch):
        raise TypeError(f"batch must be an ExpertBatch (dispatch's output), got {type(batch).__name__}")
    ws = expert_tensors(experts)
    P, H = ws[0].shape[0], ws[0].shape[-1]
    x = check_tensor("batch.x", batch.x, dim=3 if batch.layout == "masked" else 2, dtypes=(ws[0].dtype,),
                     device=ws[0].device)
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
        if P:
            check_values((counts.min() >= 0) & (counts.sum() == M),
                         f"batch.counts must be >= 0 and sum to the {M} rows of batch.index (gathered)")
        elif M:
            raise ValueError(f"batch.index has {M} rows but there are no local experts (batch.counts is empty)")
        if M:
            lo, hi = torch.aminmax(index)
            check_values((lo >= 0) & (hi < R), f"batch.index must lie in [0, R={R}) (the rows of batch.x, gathered)")
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
    per expert, `bmm` vmaps it over the experts (torch.func.vmap: the same function, batched)."""
    return _swiglu_expert if isinstance(experts, SwiGLUExperts) else _linear_expert


def _apply(experts: Experts, e: int, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Expert e on rows [m, H], written into out [m, H]."""
    out.copy_(one_expert(experts)(*(w[e] for w in expert_tensors(experts)), rows))


def _loop(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
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


def _bmm_padded(experts: Experts, xp: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """[P_sel, C, H] -> [P_sel, C, H] for the experts at `slots` (all experts when None)."""
    ws = expert_tensors(experts) if slots is None else tuple(w.index_select(0, slots) for w in
                                                               expert_tensors(experts))
    return torch.func.vmap(one_expert(experts))(*ws, xp)  # batched matmuls over the expert dim


def _bmm(experts: Experts, batch: ExpertBatch) -> ExpertBatch:
    batch = batch.materialize()
    if batch.layout == "masked":
        return batch.with_x(_bmm_padded(experts, batch.x, None))
    H = batch.x.shape[1]
    P = batch.num_experts
    # host copy of the counts: the padded batch's shape depends on them (prefill-style path);
    # experts with no rows are left out so their weights are never read
    counts_host = batch.counts.tolist()
    active = [e for e, c in enumerate(counts_host) if c]
    if not active:
        return batch.with_x(batch.x.new_empty((0, H)))
    cap = max(counts_host)
    dense = len(active) == P
    slots = None if dense else torch.tensor(active, device=batch.x.device)
    # each row's (position of its expert among the active ones, slot within that expert)
    rank_of = torch.cumsum(batch.counts > 0, 0) - 1
    row_expert, row_slot = row_coords(batch)
    row_active = rank_of[row_expert]
    xp = batch.x.new_zeros((len(active), cap, H))
    xp[row_active, row_slot] = batch.x
    y = _bmm_padded(experts, xp, slots)
    return batch.with_x(y[row_active, row_slot])


@dataclass(frozen=True)
class ExpertBackend:
    """A named expert-compute backend: `supports(cfg, device) -> (ok, reason)` and `run(experts, batch)`."""

    name: str
    supports: Callable[[MoEConfig, torch.device], tuple[bool, str]]
    run: Callable[[Experts, ExpertBatch], ExpertBatch]


def _always(cfg: MoEConfig, device: torch.device) -> tuple[bool, str]:
    return True, ""


EXPERT_BACKENDS: dict[str, ExpertBackend] = {
    "loop": ExpertBackend("loop", _always, _loop),
    "bmm": ExpertBackend("bmm", _always, _bmm),
    "triton": ExpertBackend("triton", triton_supports, triton_run),
    "deepgemm": ExpertBackend("deepgemm", deepgemm_supports, deepgemm_run),
}


def get_expert_backend(name: str, cfg: MoEConfig, device: torch.device | str) -> ExpertBackend:
    """The backend called `name`, or ValueError saying why it cannot run this config on `device`."""
    return pick_backend("expert", EXPERT_BACKENDS, name, cfg, device)


def expert_ffn(expert_params: Experts, batch: ExpertBatch, backend: str = "bmm") -> ExpertBatch:
    """Apply each local expert to its rows; the output keeps the batch's layout and counts (a gathered
    batch gives the contiguous batch [M, H], rows in batch row order)."""
    if backend not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend must be one of {sorted(EXPERT_BACKENDS)}, got {backend!r}")
    _check(expert_params, batch)
    return EXPERT_BACKENDS[backend].run(expert_params, batch)
