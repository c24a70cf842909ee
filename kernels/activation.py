"""SwiGLU activation in torch, shared by the torch expert backends, shared experts and the DeepGEMM
adapter (its GEMMs leave the activation to the caller). Pure torch: importing it needs no Triton.

Dimension legend: I expert intermediate; h [.., 2I] holds gate columns then up columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_act(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up over the last dim [.., 2I] -> [.., I], in float32, rounded to `dtype`.

    One float32 [.., I] temporary, updated in place (widening all of h first would write [.., 2I]
    float32 and two more [.., I] results: ~25% more bytes at prefill sizes, same values).
    """
    gate, up = h.chunk(2, dim=-1)
    # in place only on a fresh widened copy: a float32 gate is a view of h
    act = F.silu(gate.float(), inplace=gate.dtype != torch.float32)
    return act.mul_(up).to(dtype)
