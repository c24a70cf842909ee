"""The layers bench/bench_layer.py times, as one record each: the MoE layer alone, or the whole DeepSeek-V3
decoder layer (RMSNorm, MLA, residual, RMSNorm, MoE with its shared expert, residual).

Dimension legend: T tokens per rank, B sequences per rank, S new tokens per sequence, L context (cache rows a
decode step attends to), H hidden, W ranks.

Decoder inputs per rank (attention is data parallel: every rank holds all heads and its own sequences; the
experts are sharded): decode = B = T sequences of one new token each at position L, over a contiguous cache
of L + 1 rows whose first L rows are random latents; prefill = T / S sequences of S new tokens from position 0
(S = min(T, prefill_len); T must be a multiple). Every call rewrites the same cache rows and returns new
lens, so repeated calls (timing, CUDA-graph replays) see the same inputs. The value checks of mla (host
syncs) are off, as in the model's CUDA-graph decode step.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench.bench_ep_moe_multi import COMMS, GPU_COMMS
from nanomoe_fn.attention.backends import MLA_BACKENDS
from nanomoe_fn.attention.cache import ContiguousCache
from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.attention.params import init_mla_params
from nanomoe_fn.cli_util import UsageError
from nanomoe_fn.comm.launch import check_world_size
from nanomoe_fn.decoder import DECODER_MOE_PROGRAM, DecoderContext, DecoderParams, decoder_layer
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.moe.config import MoEConfig
from nanomoe_fn.moe.experts import EXPERT_BACKENDS
from nanomoe_fn.moe.layer import MOE_PROGRAM, MoEContext, run_moe
from nanomoe_fn.moe.params import MoEParams
from nanomoe_fn.pipeline import Plan, Program, sequential, shared_expert_overlap, two_batch_overlap

LAYERS = ("moe", "decoder")
SCHEDULES = {"sequential": lambda p: sequential(p), "shared_overlap": lambda p: sequential(shared_expert_overlap(p)),
             "shared_stream": lambda p: sequential(shared_expert_overlap(p, window=None, stream=True)),
             "shared_stream_after_route": lambda p: sequential(shared_expert_overlap(p, window="route", stream=True)),
             "shared_stream_after_send": lambda p: sequential(shared_expert_overlap(p, stream=True)),
             "tbo": lambda p: two_batch_overlap(p), "tbo+shared": lambda p: two_batch_overlap(shared_expert_overlap(p)),
             "tbo+shared_stream": lambda p: two_batch_overlap(shared_expert_overlap(p, window=None, stream=True)),
             "tbo_compute_first": lambda p: two_batch_overlap(p, compute_first=True)}


def v3_config(quick: bool) -> MoEConfig:
    """DeepSeek-V3's MoE layer, or the --quick stand-in."""
    if quick:
        return MoEConfig(hidden=64, intermediate=32, num_experts=16, top_k=4, score_func="sigmoid",
                         correction_bias=True, n_group=4, topk_group=2, n_shared_experts=1)
    return MoEConfig(hidden=7168, intermediate=2048, num_experts=256, top_k=8, score_func="sigmoid",
                     correction_bias=True, n_group=8, topk_group=4, norm_topk_prob=True,
                     routed_scaling_factor=2.5, n_shared_experts=1)


@dataclass(frozen=True)
class LayerCase:
    """One layer on this rank. call(plan, inputs) runs the public entry (run_moe / decoder_layer) on inputs
    (the whole batch, or one of program.split's micro-batches) -> the output tensor; stage_params and
    stage_ctx are what the program's stages take (for timing stages one at a time)."""

    layer: str
    program: Program
    inputs: dict
    call: Callable[[Plan, dict], torch.Tensor]
    stage_params: Any
    stage_ctx: Any
    info: dict

    def half(self) -> dict:
        """The first micro-batch two-batch overlap runs (program.split): what the ideal TBO time is built from."""
        return self.program.split(self.inputs, 2)[0]

    def compute_stages(self) -> tuple[str, ...]:
        """The stages that are not an exchange half."""
        return tuple(s.name for s in self.program.stages if s.kind == "compute")


def moe_case(cfg: MoEConfig, local: MoEParams, x: torch.Tensor, comms: Sequence[Any], placement: Placement,
             backend: str) -> LayerCase:
    """The MoE layer on x [T, H] (local: this rank's experts); comms: one, or one per micro-batch."""
    def call(plan: Plan, inputs: dict) -> torch.Tensor:
        return run_moe(plan, local, inputs["x"], cfg, list(comms) if plan.micro_batches == 2 else comms[0],
                       placement, backend)

    return LayerCase("moe", MOE_PROGRAM, {"x": x}, call, local,
                     MoEContext(cfg, comms[0], placement, backend), {})


def decoder_inputs(mla_cfg: MLAConfig, phase: str, T: int, context: int, prefill_len: int,
                   device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """{"x" [B, S, H], "positions" [B, S], "cache", "part"} for T tokens of `phase` (module docstring)."""
    if T < 1:
        raise ValueError(f"the decoder layer needs at least one token per rank, got T={T}")
    if phase == "decode":
        B, S, start, rows = T, 1, context, context + 1
    else:
        S = min(T, prefill_len)
        if T % S:
            raise ValueError(f"prefill tokens per rank ({T}) must be a multiple of --prefill-len ({prefill_len})")
        B, start, rows = T // S, 0, S
    g = torch.Generator(device=device).manual_seed(seed)
    kv = torch.randn(B, rows, mla_cfg.cache_dim, generator=g, device=device, dtype=torch.float32).to(dtype)
    cache = ContiguousCache(kv=kv, lens=torch.full((B,), start, dtype=torch.int32, device=device))
    positions = (start + torch.arange(S, device=device))[None].expand(B, S).contiguous()
    x = torch.randn(B, S, mla_cfg.hidden_size, generator=g, device=device, dtype=torch.float32).to(dtype)
    return {"x": x, "positions": positions, "cache": cache, "part": ("seq", cache)}


def decoder_case(mla_cfg: MLAConfig, cfg: MoEConfig, local: MoEParams, comms: Sequence[Any], placement: Placement,
                 backend: str, attn_backend: str, inputs: dict, seed: int) -> LayerCase:
    """The decoder layer on `inputs` (decoder_inputs), local: this rank's MoE parameters; attention weights
    drawn from `seed` (the same on every rank)."""
    x = inputs["x"]
    g = torch.Generator(device=x.device).manual_seed(seed)
    attn = init_mla_params(mla_cfg, x.dtype, x.device, generator=g)
    norms = [1 + 0.1 * torch.randn(mla_cfg.hidden_size, generator=g, device=x.device) for _ in range(2)]
    params = DecoderParams(norms[0].to(x.dtype), attn, norms[1].to(x.dtype), moe=local)
    ctxs = [DecoderContext(mla_cfg, attn_backend, MoEContext(cfg, c, placement, backend), check=False) for c in comms]

    def call(plan: Plan, inp: dict) -> torch.Tensor:
        ctx = ctxs if plan.micro_batches == 2 else ctxs[0]
        return decoder_layer(params, inp["x"], inp["positions"], inp["cache"], ctx, plan)[0]

    return LayerCase("decoder", DECODER_MOE_PROGRAM, inputs, call, params, ctxs[0],
                     {"sequences": int(x.shape[0]), "new_tokens": int(x.shape[1]),
                      "context": int(inputs["positions"][0, 0]) if x.shape[1] == 1 else 0,
                      "heads": mla_cfg.num_heads})


def _comm_phases(text: str) -> tuple[str, tuple[str, ...]]:
    """'nvlink' -> (nvlink, both phases); 'torch_decode:decode' -> (torch_decode, (decode,))."""
    name, _, phase = text.partition(":")
    if name not in COMMS:
        raise UsageError(f"--comms: unknown {name!r}; choose from {list(COMMS)}")
    if phase not in ("", "decode", "prefill"):
        raise UsageError(f"--comms: {text!r}: the phase after ':' must be decode or prefill")
    return name, (phase,) if phase else ("decode", "prefill")


def check_layer_flags(args: argparse.Namespace) -> None:
    """bench_layer.py's flags, every one checked in the parent before any rank starts or any tensor is drawn
    (UsageError, one line naming the flag); applies --quick's smaller defaults, parses --comms and --schedules
    in place and sets args.mla."""
    args.comms = [_comm_phases(c.strip()) for c in args.comms.split(",") if c.strip()]
    if not args.comms:
        raise UsageError(f"--comms: expected a comma list of {list(COMMS)}")
    args.schedules = ["sequential"] + [s for s in args.schedules.split(",") if s and s != "sequential"]
    unknown = [s for s in args.schedules if s not in SCHEDULES]
    if unknown:
        raise UsageError(f"--schedules: unknown {unknown}; choose from {list(SCHEDULES)}")
    if args.quick:
        args.backend, args.expert_backend = "gloo", ("bmm" if args.expert_backend == "triton" else args.expert_backend)
        if args.decode_tokens == [32, 64, 128, 256]:
            args.decode_tokens = [1, 6]
        if args.prefill_tokens == [4096, 16384]:
            args.prefill_tokens = [24]
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)
        args.attn_backend = "torch" if args.attn_backend == "triton" else args.attn_backend
        args.context, args.prefill_len = min(args.context, 16), min(args.prefill_len, 8)
    for flag, low in (("iters", 1), ("warmup", 0), ("context", 1), ("prefill_len", 1)):
        if getattr(args, flag) < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if not 0 < args.timeout < float("inf"):
        raise UsageError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    try:
        W = check_world_size(args.world_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cfg = v3_config(args.quick)
    if cfg.num_experts % W:
        raise UsageError(f"--world-size ({W}) must divide the layer's {cfg.num_experts} experts")
    gpu = [c for c, _ in args.comms if c in GPU_COMMS]
    if args.backend != "nccl" and (gpu or args.cuda_graph):
        what = f"--comms {gpu[0]}" if gpu else "--cuda-graph"
        raise UsageError(f"{what} needs CUDA GPUs with --backend nccl (this is --backend {args.backend})")
    if args.backend == "nccl" and torch.cuda.device_count() < W:
        raise UsageError(f"--backend nccl needs {W} CUDA device(s), this machine has {torch.cuda.device_count()}; "
                         "on a CPU use --quick (gloo, small sizes)")
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    names = [n for n, b in EXPERT_BACKENDS.items() if not b.fp8]  # the bench draws bf16 / float32 experts
    if args.expert_backend not in names:
        raise UsageError(f"--expert-backend: expected one of {names}, got {args.expert_backend!r}")
    ok, why = EXPERT_BACKENDS[args.expert_backend].supports(cfg, device)
    if not ok:
        raise UsageError(f"--expert-backend {args.expert_backend} cannot run here: {why}")
    if args.attn_backend not in MLA_BACKENDS:
        raise UsageError(f"--attn-backend: expected one of {sorted(MLA_BACKENDS)}, got {args.attn_backend!r}")
    args.mla = MLAConfig.preset("tiny" if args.quick else "deepseek-v3")
    ok, why = MLA_BACKENDS[args.attn_backend].supports(args.mla, device)
    if args.layer == "decoder" and not ok:
        raise UsageError(f"--attn-backend {args.attn_backend} cannot run here: {why}")
    if args.layer == "decoder":
        bad = [T for T in args.prefill_tokens if T % min(T, args.prefill_len)]
        if bad:
            raise UsageError(f"--prefill-tokens {bad[0]}: the decoder's prefill sequences are --prefill-len "
                             f"({args.prefill_len}) tokens, so each count must be a multiple of it (or smaller)")
    sizes = {"decode": args.decode_tokens, "prefill": args.prefill_tokens}
    if not any(sizes[ph] for _, phases in args.comms for ph in phases):
        raise UsageError("nothing to run: no --decode-tokens / --prefill-tokens for the phases of --comms")
    if args.backend == "gloo" and not args.quick:
        need, have = W * cpu_bytes_per_rank(cfg), _host_bytes()
        if have and need > have:
            raise UsageError(f"--backend gloo at DeepSeek-V3 sizes: {W} ranks draw ~{need / 1e9:.0f} GB of float32 "
                             f"weights, this machine has {have / 1e9:.0f} GB; use --quick (or a GPU: --backend nccl)")


def cpu_bytes_per_rank(cfg: MoEConfig) -> int:
    """Bytes of float32 weights one CPU rank holds: every expert (drawn whole, then sharded) plus the shared
    expert and the router (a lower bound: the shard, tokens and caches come on top)."""
    H, I_, E = cfg.hidden, cfg.intermediate, cfg.num_experts
    return 4 * (E * 3 * H * I_ + cfg.n_shared_experts * 3 * H * I_ + E * H)


def _host_bytes() -> int:
    """Physical memory of this host in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
