"""Kernel-level expert inputs and a float32 per-token check, shared by tests/gpu and the kernel benches.

Dimension legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate, S sampled
tokens, H_out output width (H for both expert types here).

Weights are plain tuples as kernels/ take them ((w13 [E, 2I, H], w2 [E, H, I]) for SwiGLU, (w [E, H, H],)
for linear), routing plain tensors: no nanomoe_fn records. `reference_rows` loops over the sampled tokens
in float32 (the activation rounded to x's dtype before the down projection, as the kernels do): the
check at DeepSeek-V3 sizes, where the float64 oracles of reference/moe.py would take minutes.
Imports nothing from nanomoe_fn or kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_weights(E: int, H: int, I: int, expert_type: str, dtype: torch.dtype, device: str,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random experts scaled like a trained layer (outputs of order one); never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    if expert_type == "linear":
        return (torch.randn(E, H, H, generator=g, device=device, dtype=dtype) * H ** -0.5,)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=device, dtype=dtype) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g, device=device, dtype=dtype) * I ** -0.5
    return w13, w2


def make_routing(T: int, E: int, k: int, device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] int32 (k distinct experts, uniform) and topk_weights [T, k] float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(T, E, generator=g, device=device).topk(k, dim=1).indices.to(torch.int32)
    return ids, torch.rand(T, k, generator=g, device=device) + 0.1


def reference_rows(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
                   expert_type: str, tokens: torch.Tensor) -> torch.Tensor:
    """float32 expert FFN for the sampled tokens [S] -> [S, H_out] (loops over their experts)."""
    out = []
    for t in tokens.tolist():
        acc = 0
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            xt = x[t].float()
            if expert_type == "linear":
                y = weights[0][e].float() @ xt
            else:
                gu = weights[0][e].float() @ xt
                gate, up = gu.chunk(2)
                y = weights[1][e].float() @ (F.silu(gate) * up).to(x.dtype).float()
            acc = acc + float(tw[t, j]) * y
        out.append(acc)
    return torch.stack(out)
