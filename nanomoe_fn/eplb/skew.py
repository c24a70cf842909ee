"""Skewed routing draws for EPLB experiments: Zipf popularity or one hot expert, exactly, per rank.

Dimension legend: T tokens, E experts, k experts per token.

  zipf<a>  expert popularity ~ 1 / rank^a, a seeded permutation (the same on every rank) says which
           expert holds which rank; k experts per token drawn without replacement (Gumbel top-k).
  hot1     one hot expert h (seeded, the same on every rank) in every token, plus k - 1 others uniform.
Top-k weights are uniform in [0.5, 1.5], normalised per token. bench/bench_eplb_layer.py times the
layer under these loads; tests/test_eplb.py checks the draws follow the skew.
"""

from __future__ import annotations

import torch

from nanomoe_fn.batch import Routing


def draw_routing(skew: str, T: int, E: int, k: int, seed: int, rank: int, device: torch.device) -> Routing:
    """This rank's drawn routing (see the module docstring): topk_ids [T, k] int64, weights [T, k] float32."""
    shared = torch.Generator().manual_seed(seed)  # which experts are hot: the same on every rank
    if skew.startswith("zipf"):
        a = float(skew[4:])
        log_pop = -a * torch.log(torch.arange(1, E + 1, dtype=torch.float32))  # [E] by popularity rank
        logits = log_pop[torch.argsort(torch.randperm(E, generator=shared))]  # [E] by expert id
    elif skew == "hot1":
        logits = torch.zeros(E)
        logits[int(torch.randint(E, (1,), generator=shared))] = 1e4  # beats any Gumbel noise
    else:
        raise ValueError(f"skew must be 'zipf<exponent>' or 'hot1', got {skew!r}")
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + 1 + rank)
    u = torch.rand(T, E, generator=gen, device=device).clamp_(1e-12, 1 - 1e-12)
    ids = (logits.to(device) - torch.log(-torch.log(u))).topk(k, dim=-1).indices  # Gumbel top-k [T, k]
    w = torch.rand(T, k, generator=gen, device=device) + 0.5
    return Routing(ids, w / w.sum(-1, keepdim=True))
