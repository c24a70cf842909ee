"""The one value check on tensor contents, for kernels/ and nanomoe_fn/ alike.

kernels/ sits below nanomoe_fn/ (nothing here imports nanomoe_fn), so the single definition lives here;
nanomoe_fn/checks.py re-exports it beside the package's other argument checks.
"""

from __future__ import annotations

import torch


def check_values(ok: torch.Tensor, message: str) -> None:
    """Assert a boolean scalar tensor: ValueError now on the CPU, an async device assert elsewhere
    and inside torch.compile (a host check there would break the graph)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_routing(topk_ids: object, topk_weights: object, T: int, E: int) -> int:
    """k after checking the routing of T tokens over E experts: topk_ids [T, k] and float topk_weights
    [T, k] with 1 <= k <= E (shapes only; the ids' values are the align step's validate)."""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [{T}, k], got {getattr(topk_ids, 'shape', topk_ids)}")
    k = topk_ids.shape[1]
    if not isinstance(topk_weights, torch.Tensor) or tuple(topk_weights.shape) != (T, k) \
            or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor [{T}, {k}], got "
                         f"{getattr(topk_weights, 'shape', topk_weights)}")
    if not 1 <= k <= E:
        raise ValueError(f"top-k must lie in [1, E={E}], got {k}")
    return k
