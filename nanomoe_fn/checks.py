"""Argument checks shared by the stages: clear errors that name the argument and what was expected.

Value checks on tensor contents (NaN logits, expert ids out of range) need the data: on the CPU
they raise ValueError at once; on an accelerator they become asynchronous device asserts, so the
decode path never waits on the host (the error then surfaces at the next synchronisation).
`check_values` is defined once, in kernels/checks.py (kernels/ import nothing from nanomoe_fn), and
re-exported here: every stage and kernel wrapper uses that one.
"""

from __future__ import annotations

import math
import numbers

import torch
from nanomoe_kernels.checks import check_values  # the one definition, shared with kernels/ (which sit below nanomoe_fn)


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


def check_expert_ids(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Every id in `ids` must lie in [0, num_experts)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)  # one reduction (one kernel on GPUs) for both ends
    check_values((lo >= 0) & (hi < num_experts),
                 f"{name} holds expert ids outside [0, {num_experts})")


# ---- config fields: strict types (bool is not an int), finite floats, named ranges -------------------------

def check_int_field(owner: str, name: str, v: object, minimum: int = 1) -> int:
    """An int config field (bool and float refused) >= minimum; returns it as a plain int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{owner}.{name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{owner}.{name} must be {what}, got {v!r}")
    return int(v)


def check_float_field(owner: str, name: str, v: object, gt: float | None = None, ge: float | None = None) -> float:
    """A finite real config field (bool and str refused), > gt and >= ge when given; returns it as a float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{owner}.{name} must be a float, got {type(v).__name__} {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{owner}.{name} must be finite, got {v!r}")
    if gt is not None and not f > gt:
        raise ValueError(f"{owner}.{name} must be > {gt:g}, got {v!r}")
    if ge is not None and not f >= ge:
        raise ValueError(f"{owner}.{name} must be >= {ge:g}, got {v!r}")
    return f


def check_bool_field(owner: str, name: str, v: object) -> bool:
    """A bool config field (0/1 and strings refused)."""
    if not isinstance(v, bool):
        raise TypeError(f"{owner}.{name} must be a bool, got {type(v).__name__} {v!r}")
    return v


def check_choice_field(owner: str, name: str, v: object, choices: tuple[str, ...]) -> str:
    """A str config field that must be one of `choices`."""
    if not isinstance(v, str):
        raise TypeError(f"{owner}.{name} must be a str, one of {choices}, got {type(v).__name__} {v!r}")
    if v not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {v!r}")
    return v


def pick_backend(kind: str, registry: dict, name: str, cfg: object, device: torch.device | str) -> object:
    """registry[name] after its supports(cfg, device); else ValueError naming the `kind` of backend, the
    name and why (an unknown name lists the known ones)."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} backend must be a str, one of {sorted(registry)}, got {type(name).__name__} {name!r}")
    if name not in registry:
        raise ValueError(f"{kind} backend must be one of {sorted(registry)}, got {name!r}")
    backend = registry[name]
    ok, reason = backend.supports(cfg, torch.device(device))
    if not ok:
        raise ValueError(f"{kind} backend {name!r} cannot run here: {reason}")
    return backend
