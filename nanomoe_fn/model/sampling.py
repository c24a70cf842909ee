"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

Dimension legend: B sequences, V vocabulary.

Sampling draws by the exponential race (argmax of p / Exp(1) noise, which picks token v with probability
p_v): no host sync and no torch.multinomial, so a decode step stays capturable in a CUDA graph. The noise
comes from a seeded torch.Generator on the logits' device: a seed repeats a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomoe_fn.checks import check_float_field, check_int_field


@dataclass(frozen=True)
class SamplingConfig:
    """max_new_tokens per sequence; temperature 0 = greedy (top_k/top_p unused); top_k 0 = all tokens;
    top_p in (0, 1] (1 = all); seed of the sampling noise; stop_tokens end a sequence (with the model's eos
    ids, unless ignore_eos); the stop token is kept in the output."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        own = "SamplingConfig"
        object.__setattr__(self, "max_new_tokens", check_int_field(own, "max_new_tokens", self.max_new_tokens))
        object.__setattr__(self, "top_k", check_int_field(own, "top_k", self.top_k, 0))
        object.__setattr__(self, "seed", check_int_field(own, "seed", self.seed, 0))
        object.__setattr__(self, "temperature", check_float_field(own, "temperature", self.temperature, ge=0.0))
        p = check_float_field(own, "top_p", self.top_p, gt=0.0)
        if p > 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {p}")
        object.__setattr__(self, "top_p", p)
        stops = tuple(self.stop_tokens)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
            raise ValueError(f"SamplingConfig.stop_tokens must be non-negative ints, got {stops}")
        object.__setattr__(self, "stop_tokens", stops)


def sample(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] int64 (greedy when s.temperature == 0)."""
    if s.temperature == 0.0:
        return logits.argmax(-1)
    z = logits.float() / s.temperature
    if 0 < s.top_k < z.shape[-1]:
        kth = z.topk(s.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = z.softmax(-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p          # mass of the better tokens
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, before >= s.top_p)
        probs = probs.masked_fill(drop, 0.0)             # the best token always stays (before == 0)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)
