"""Generation: prefill a batch of prompts of different lengths, then decode step by step.

Dimension legend: B sequences (this rank's), P the longest prompt, N max_new_tokens, V vocabulary.

Prefill runs the prompts right-padded to [B, P] (position -1 on the padding) and scores each sequence's
last prompt token; decode feeds one token per sequence at position prompt_len + step. Generated tokens stay
on the device ([B, N]); the host reads the done flags every `check_every` steps (the only syncs of the decode
loop) and the tokens once at the end. A sequence ends at its first stop token (kept in the output); finished
sequences keep decoding padding-free until every sequence is done, so shapes never change.

Expert parallelism: every rank calls generate with its own prompts (possibly none) and the same
SamplingConfig; the done check is an all-reduce over the comm's process group, so all ranks run the same
number of MoE layers and stop together.

cuda_graph=True (CUDA only) captures one decode step (forward, without value checks) in a CUDA graph over
static token/position buffers and the caches, and replays it every step; sampling runs outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist

from nanomoe_fn.attention.cache import ContiguousCache, MLACache
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward
from nanomoe_fn.model.params import ModelParams
from nanomoe_fn.model.sampling import SamplingConfig, sample

# torch.compile options of compiled decoding: fused kernels round intermediates as eager ops do (generate's doc)
EAGER_ROUNDING = {"emulate_precision_casts": True}


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__} {p!r:.40}")
        p = list(p)
        if not p:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] holds {bad[0]!r}: tokens must be ints in [0, vocab_size={vocab})")
        out.append(p)
    return out


def _empty_caches(ctx: ModelContext, capacity: int, dtype: torch.dtype, device: torch.device) -> tuple:
    # a rank with no sequences still joins every MoE layer: zero-row caches (attention is skipped)
    dc = ctx.cfg.mla.cache_dim
    return tuple(ContiguousCache(kv=torch.zeros(0, capacity, dc, dtype=dtype, device=device),
                                 lens=torch.zeros(0, dtype=torch.int32, device=device))
                 for _ in range(ctx.cfg.num_layers))


def _all_done(done: torch.Tensor, ctx: ModelContext) -> bool:
    """Whether every sequence on every rank is done (one host read; an all-reduce under EP)."""
    flag = done.all().to(torch.int32).reshape(1) if done.numel() else torch.ones(1, dtype=torch.int32,
                                                                                 device=done.device)
    if ctx.comm.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=getattr(ctx.comm, "group", None))
    return bool(flag.item())


class DecodeGraph:
    """One decode step captured as a CUDA graph: static tokens [B, 1] and positions [B, 1] in, logits [B, V]
    out; the caches' lens advance inside the graph, their kv buffers are written in place."""

    def __init__(self, params: ModelParams, caches: tuple[MLACache, ...], ctx: ModelContext,
                 tokens: torch.Tensor, positions: torch.Tensor, forward: Callable = model_forward) -> None:
        self.tokens, self.positions = tokens.clone(), positions.clone()
        ctx = replace(ctx, check=False)

        def step() -> torch.Tensor:  # forward: model_forward, or e.g. torch.compile(model_forward)
            logits, new = forward(params, self.tokens, self.positions, caches, ctx)
            for c, n in zip(caches, new):
                c.lens.copy_(n.lens)
            return logits[:, 0]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: this step's real inputs, so running it is harmless
            step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = step()
        except RuntimeError as err:
            raise ValueError(
                "cuda_graph=True: the decode step cannot be captured in a CUDA graph because a stage reads device "
                f"values on the host (expert backend {ctx.expert_backend!r}, comm {type(ctx.comm).__name__}); use "
                "the 'triton' or 'deepgemm' expert backend and a sync-free comm (local, nvlink, torch_fixed, or torch "
                "with max_tokens: its decode mode), or decode eagerly (cuda_graph=False; nanomoe generate: "
                "--no-cuda-graph). "
                f"Capture failed with: {str(err).splitlines()[0]}") from err

    def release(self) -> None:
        """Free the graph now: NCCL destroys a communicator only after every graph that captured one of its
        collectives is gone, so generate releases its graph before a caller's destroy_process_group."""
        self.graph.reset()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replay on new inputs -> logits [B, V] (a static buffer, overwritten by the next replay)."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


def generate(params: ModelParams, prompts: Sequence[Sequence[int]], ctx: ModelContext,
             sampling: SamplingConfig | None = None, *, paged: bool = False, cuda_graph: bool = False,
             check_every: int = 8, progress: Callable[[int], None] | None = None,
             decode_ctx: ModelContext | None = None, compile: bool = False) -> list[list[int]]:
    """Token ids of each prompt -> the generated token ids of each (the stop token included when one ended
    it). progress(k) is called after each decode step with the steps done. decode_ctx: the context of the
    decode steps when it differs from the prefill's (e.g. a low-latency comm for decode), same config.
    compile: run the decode steps through torch.compile(model_forward) (inductor fuses the elementwise glue
    between the Triton kernels; the first step compiles, which takes a while). Its fused kernels round every
    intermediate to its dtype as eager ops do (inductor's emulate_precision_casts): without that, bf16 glue
    kept in float32 inside a fused kernel changed greedy tokens after a dozen steps."""
    s = sampling if sampling is not None else SamplingConfig()
    for name, v, kind in (("sampling", s, SamplingConfig), ("ctx", ctx, ModelContext),
                          ("decode_ctx", decode_ctx or ctx, ModelContext)):
        if not isinstance(v, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(v).__name__}")
    cfg, dctx = ctx.cfg, decode_ctx or ctx
    if dctx.cfg != cfg:
        raise ValueError("decode_ctx must hold the same ModelConfig as ctx")
    dctx = replace(dctx, check=False)  # sampled tokens and consecutive positions are valid: no per-step syncs
    prompts = _check_prompts(prompts, cfg.vocab_size)
    device, dtype = params.embed.device, params.layers[0].attn.kv_a_proj.dtype
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the parameters on a CUDA device, got {device}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    B, N = len(prompts), s.max_new_tokens
    P = max((len(p) for p in prompts), default=0)
    if P + N > cfg.max_position_embeddings:
        raise ValueError(f"the longest prompt ({P} tokens) plus max_new_tokens ({N}) exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    stop_ids = set(s.stop_tokens) | (set() if s.ignore_eos else set(cfg.eos_token_ids))
    stops = torch.tensor(sorted(stop_ids) or [-1], device=device)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    capacity = P + N
    caches = (init_caches(cfg, B, capacity, dtype, device, paged=paged) if B else
              _empty_caches(ctx, capacity, dtype, device))
    tokens = torch.zeros(B, max(P, 1), dtype=torch.int64)
    positions = torch.full((B, max(P, 1)), -1, dtype=torch.int64)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
        positions[b, :len(p)] = torch.arange(len(p))
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    logits, caches = model_forward(params, tokens.to(device), positions.to(device), caches, ctx,
                                   logits_at=(lens - 1).clamp_min(0))
    out = torch.zeros(B, N, dtype=torch.int64, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    nxt = sample(logits, s, gen)
    fwd = torch.compile(model_forward, dynamic=False, options=EAGER_ROUNDING) if compile else model_forward
    graph = None
    try:
        for t in range(N):
            out[:, t] = nxt
            done |= torch.isin(nxt, stops)
            if t == N - 1 or ((t + 1) % check_every == 0 and _all_done(done, ctx)):
                break
            step_tok, step_pos = nxt[:, None], (lens + t)[:, None]
            if cuda_graph and B:
                graph = graph or DecodeGraph(params, caches, dctx, step_tok, step_pos, fwd)
                logits = graph(step_tok, step_pos)
            else:
                logits, caches = fwd(params, step_tok, step_pos, caches, dctx)
                logits = logits[:, 0]
            nxt = sample(logits, s, gen)
            if progress is not None:
                progress(t + 1)
        return [_cut(row, stop_ids) for row in out.tolist()]
    finally:
        if graph is not None:
            graph.release()


def _cut(row: list[int], stop_ids: set[int]) -> list[int]:
    """The row up to and including its first stop token (a row without one ran all N steps)."""
    for i, tok in enumerate(row):
        if tok in stop_ids:
            return row[: i + 1]
    return row
