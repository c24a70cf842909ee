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
