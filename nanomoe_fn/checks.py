"""Argument checks shared by the stages: clear errors that name the argument and what was expected.

Value checks on tensor contents (NaN logits, expert ids out of range) need the data: on the CPU
they raise ValueError at once; on an accelerator they become asynchronous device asserts, so the
decode path never waits on the host (the error then surfaces at the next synchronisation).
"""

from __future__ import annotations

import torch


def check_tensor(name: str, t: object, dim: int | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Raise TypeError/ValueError unless `t` is a tensor of the given rank, dtype family and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (where the parameters are), got {t.device}")
    return t


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def check_values(ok: torch.Tensor, message: str) -> None:
    """Assert a boolean scalar tensor: ValueError now on the CPU, an async device assert elsewhere
    and inside torch.compile (a host check there would break the graph)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_expert_ids(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Every id in `ids` must lie in [0, num_experts)."""
    if ids.numel() == 0:
        return
    check_values((ids.min() >= 0) & (ids.max() < num_experts),
                 f"{name} holds expert ids outside [0, {num_experts})")
