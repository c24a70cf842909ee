"""The router after its GEMM, as one Triton kernel: scores, bias, grouped top-k, top-k, weights.

Dimension legend: T tokens, E experts (EP: E rounded up to a power of two), G expert groups (GP rounded up),
S = E / G experts per group, k experts per token (KP rounded up), BT tokens per program.

Per token, on float32 logits: scores = softmax or sigmoid; choice = scores (+ bias); with groups, each group
scores by its best choice ("max") or its two best summed ("top2_sum"), the best `topk_group` groups stay and
the other experts' choice becomes -inf; the k best choices, best first (equal values: the lower expert id),
weigh their scores, renormalised to sum 1 if `norm`, times `scale`. This is nanomoe_fn/moe/route.py's torch
path (about twenty small kernels) in one launch; the tests hold the two to the float64 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, T, stride_l, scale,
                  E: tl.constexpr, EP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, S: tl.constexpr,
                  TOPK_GROUP: tl.constexpr,
                  K: tl.constexpr, KP: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr,
                  TOP2: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, EP)
    live = cols < E
    m2 = (rows < T)[:, None] & live[None, :]
    neg = float("-inf")
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=m2, other=0.0)
    logits = tl.where(live[None, :], logits, neg)  # rows past T stay finite: no NaN anywhere
    if SOFTMAX:
        p = tl.exp(logits - tl.max(logits, 1)[:, None])
        p = tl.where(live[None, :], p, 0.0)
        scores = p / tl.sum(p, 1)[:, None]
    else:
        scores = tl.where(live[None, :], tl.sigmoid(logits), 0.0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + cols, mask=live, other=0.0)[None, :]
    choice = tl.where(live[None, :], choice, neg)
    if G > 1:
        group = cols // S                                      # [EP]; padded lanes >= G
        gcols = tl.arange(0, GP)
        gscore = tl.full([BT, GP], neg, tl.float32)
        for g in tl.static_range(G):
            v = tl.where((group == g)[None, :], choice, neg)
            best = tl.max(v, 1)
            if TOP2 and S > 1:
                first = tl.min(tl.where(v == best[:, None], cols[None, :], EP), 1)
                best = best + tl.max(tl.where(cols[None, :] == first[:, None], neg, v), 1)
            gscore = tl.where(gcols[None, :] == g, best[:, None], gscore)
        keep = tl.zeros([BT, EP], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gbest = tl.max(gscore, 1)
            gi = tl.min(tl.where(gscore == gbest[:, None], gcols[None, :], GP), 1)
            keep = keep | (group[None, :] == gi[:, None])
            gscore = tl.where(gcols[None, :] == gi[:, None], neg, gscore)
        choice = tl.where(keep, choice, neg)
    kcols = tl.arange(0, KP)
    ids = tl.zeros([BT, KP], tl.int32)
    w = tl.zeros([BT, KP], tl.float32)
    for i in tl.static_range(K):
        best = tl.max(choice, 1)
        pick = tl.min(tl.where(choice == best[:, None], cols[None, :], EP), 1)
        hit = cols[None, :] == pick[:, None]
        ids = tl.where(kcols[None, :] == i, pick[:, None], ids)
        w = tl.where(kcols[None, :] == i, tl.sum(tl.where(hit, scores, 0.0), 1)[:, None], w)
        choice = tl.where(hit, neg, choice)
    if NORM:
        w = w / tl.sum(w, 1)[:, None]
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    mask = (rows < T)[:, None] & (kcols < K)[None, :]
    tl.store(ids_ptr + out, ids, mask=mask)
    tl.store(w_ptr + out, w * scale, mask=mask)


def fused_route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
                score_func: str = "sigmoid", group_rule: str = "max", norm: bool = False,
                scale: float = 1.0, block_tokens: int | None = None,
                num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 (unit stride in E), bias [E] float32 or None -> (topk_ids [T, k] int32,
    topk_weights [T, k] float32) (module docstring). n_group 1 or topk_group == n_group: no group step.
    block_tokens (BT, a power of two) and num_warps: the launch shape; the defaults, ~512 lanes a program on one
    warp (2 tokens at 256 experts), were the fastest of bench/gpu/route_probe.py --sweep on the H200 (run 104:
    10-19 us a call in a CUDA graph at 32-4096 tokens, against 27-30 us for 16 tokens on 4 warps). No host sync."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or (logits.stride(1) != 1 and logits.shape[1] > 1):
        raise ValueError(f"logits must be [T, E] float32 with unit stride in E, got {tuple(logits.shape)} "
                         f"{logits.dtype} strides {logits.stride()}")
    T, E = logits.shape
    if bias is not None and (tuple(bias.shape) != (E,) or bias.dtype != torch.float32 or not bias.is_contiguous()
                             or bias.device != logits.device):
        raise ValueError(f"bias must be a contiguous [{E}] float32 tensor on {logits.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if score_func not in ("softmax", "sigmoid") or group_rule not in ("max", "top2_sum"):
        raise ValueError(f"score_func must be softmax|sigmoid and group_rule max|top2_sum, got {score_func!r}, "
                         f"{group_rule!r}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group ({n_group}) must divide E ({E}) and topk_group ({topk_group}) lie in [1, n_group]")
    groups = n_group if topk_group < n_group else 1
    eligible = (topk_group * (E // n_group)) if groups > 1 else E
    if not 1 <= top_k <= eligible:
        raise ValueError(f"top_k must lie in [1, {eligible}] (the experts of the kept groups), got {top_k}")
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, w
    EP = max(2, triton.next_power_of_2(E))
    BT = block_tokens or max(1, min(16, 512 // EP))  # ~512 lanes a program: 2 tokens at 256 experts
    num_warps = num_warps or (1 if BT * EP <= 1024 else 4)
    if BT & (BT - 1) or num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"block_tokens must be a power of two and num_warps one of 1-16 (powers of two), got "
                         f"{block_tokens}, {num_warps}")
    _route_kernel[(triton.cdiv(T, BT),)](
        logits, bias if bias is not None else logits, ids, w, T, logits.stride(0), float(scale),
        E=E, EP=EP, G=groups, GP=max(2, triton.next_power_of_2(groups)), S=E // groups,
        TOPK_GROUP=topk_group if groups > 1 else 1, K=top_k, KP=max(2, triton.next_power_of_2(top_k)),
        SOFTMAX=score_func == "softmax", HAS_BIAS=bias is not None,
        TOP2=group_rule == "top2_sum", NORM=norm, BT=BT, num_warps=num_warps)
    return ids, w


def runs_interpreted() -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 (it then takes CPU tensors)."""
    return type(_route_kernel).__name__ == "InterpretedFunction"
