"""Naive float64 MoE oracle: routing and the MoE layer as loops over tokens and experts.

Imports nothing from nanomoe_fn or kernels. Everything is upcast to float64 on the CPU; outputs are
float64 CPU tensors. Slow on purpose: each line should be checkable by eye against DeepSeek-V3.

Dimension legend: T tokens, H hidden, E experts, k experts per token, I expert intermediate,
G expert groups.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu", torch.float64)


def route_scores(
    x: torch.Tensor, gate_weight: torch.Tensor, score_func: str, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scores [T, E], choice [T, E]) in float64: scores weight the experts, choice picks them."""
    x, w, b = _f64(x), _f64(gate_weight), _f64(bias)
    T, E = x.shape[0], w.shape[0]
    scores = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        logits = (w @ x[t]).tolist()
        if score_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            s = sum(ex)
            scores[t] = torch.tensor([v / s for v in ex], dtype=torch.float64)
        elif score_func == "sigmoid":
            scores[t] = torch.tensor([1.0 / (1.0 + math.exp(-v)) for v in logits], dtype=torch.float64)
        else:
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    choice = scores if b is None else scores + b
    return scores, choice


def route(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    group_score: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """DeepSeek-V3 / V2 routing, one token at a time.

    With n_group > 1 a group is scored from its members' choice scores by group_score: "max" (the best
    one, DeepSeek-V2) or "top2_sum" (the two best added, DeepSeek-V3); None: "top2_sum" when a bias is
    given, else "max".

    Returns (topk_ids [T, k] int64 sorted by descending choice score, topk_weights [T, k] float64,
    margin): margin is the smallest relative gap (gap / magnitude), over tokens, between the last
    chosen and the best unchosen choice score, and between the last kept and the best dropped group
    score. A margin near float32's resolution is a near-tie that an implementation rounding
    differently may legitimately break the other way.
    """
    scores, choice = route_scores(x, gate_weight, score_func, bias)
    T, E = scores.shape
    ids = torch.zeros(T, top_k, dtype=torch.int64)
    weights = torch.zeros(T, top_k, dtype=torch.float64)
    margin = math.inf

    def gap(a: float, b: float) -> float:
        return (a - b) / max(abs(a), abs(b), 1e-300)

    per_group = E // n_group
    rule = group_score if group_score is not None else ("max" if bias is None else "top2_sum")
    if rule not in ("max", "top2_sum"):
        raise ValueError(f"group_score must be 'max', 'top2_sum' or None, got {group_score!r}")
    for t in range(T):
        allowed = list(range(E))
        if n_group > 1:
            gscores = []
            for g in range(n_group):
                members = sorted((float(choice[t, e]) for e in range(g * per_group, (g + 1) * per_group)),
                                 reverse=True)
                gscores.append(members[0] if rule == "max" else sum(members[:2]))
            order = sorted(range(n_group), key=lambda g: -gscores[g])
            if topk_group < n_group:
                margin = min(margin, gap(gscores[order[topk_group - 1]], gscores[order[topk_group]]))
            keep = set(order[:topk_group])
            allowed = [e for e in range(E) if e // per_group in keep]
        ranked = sorted(allowed, key=lambda e: -float(choice[t, e]))
        if len(ranked) > top_k:
            margin = min(margin, gap(float(choice[t, ranked[top_k - 1]]), float(choice[t, ranked[top_k]])))
        chosen = ranked[:top_k]
        w = [float(scores[t, e]) for e in chosen]
        if norm_topk_prob:
            s = sum(w)
            w = [v / s for v in w]
        ids[t] = torch.tensor(chosen)
        weights[t] = torch.tensor([v * routed_scaling_factor for v in w], dtype=torch.float64)
    return ids, weights, margin


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert on rows x [N, H]: w13 [2I, H] is gate then up, w2 [H, I]."""
    x, w13, w2 = _f64(x), _f64(w13), _f64(w2)
    inter = w13.shape[0] // 2
    gate = x @ w13[:inter].T
    up = x @ w13[inter:].T
    return (gate * torch.sigmoid(gate) * up) @ w2.T


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One linear expert (the seed's workload): rows x [N, H] times w [H_out, H] transposed."""
    return _f64(x) @ _f64(w).T


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_weights: tuple[torch.Tensor, ...],
    expert_type: str = "swiglu",
) -> torch.Tensor:
    """Weighted sum of each token's k experts: out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]).

    expert_weights is (w13 [E, 2I, H], w2 [E, H, I]) for swiglu, (w [E, H, H],) for linear.
    """
    x = _f64(x)
    T = x.shape[0]
    H_out = expert_weights[-1].shape[1]
    out = torch.zeros(T, H_out, dtype=torch.float64)
    for t in range(T):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            row = x[t : t + 1]
            if expert_type == "swiglu":
                y = swiglu(row, expert_weights[0][e], expert_weights[1][e])
            else:
                y = linear(row, expert_weights[0][e])
            out[t] += float(topk_weights[t, j]) * y[0]
    return out


def moe_layer(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    expert_weights: tuple[torch.Tensor, ...],
    top_k: int,
    expert_type: str = "swiglu",
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    **route_kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """The whole MoE layer: route, run each token's experts, weight, sum, add the shared expert.

    Returns (out [T, H] float64, routing margin as in `route`).
    """
    ids, weights, margin = route(x, gate_weight, top_k, **route_kwargs)
    out = moe_experts(x, ids, weights, expert_weights, expert_type)
    if shared is not None:
        out = out + swiglu(x, shared[0], shared[1])
    return out, margin
