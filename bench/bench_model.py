"""Whole-model throughput: prefill and decode tokens/s of a reduced-depth DeepSeek model, ours next to
transformers' own implementation of the same weights in the same run (bench `model`).

Dimension legend: B sequences, P prompt tokens, N decode steps timed, V vocabulary, E experts, k top-k.

One GPU (--world-size 1): transformers' DeepseekV3ForCausalLM is built once on the device (random weights,
bf16, sdpa attention); our parameter records are views of its tensors (nanomoe_fn.model.from_transformers:
74 GB at V3 dims is held once). Per batch size B: transformers' prefill and greedy decode steps over its
DynamicCache; ours eager and with the decode step captured in a CUDA graph (`--graph`). Each row gives the
prefill time, the median decode step, decode tokens/s (B / step), the floor of a step (the bytes it must
read over the HBM bandwidth measured in the same run) and, for our rows, speedup_vs.transformers.
Several GPUs (--world-size W > 1, own spawn or torchrun): our model alone with expert parallelism (each
rank its own B sequences, experts sharded by an identity placement), prefill over the torch comm and decode
over --decode-comm; tokens/s summed over ranks.
--expert-weights bf16,fp8 adds rows whose routed experts are block-scaled FP8 (DeepSeek-V3's checkpoint format,
run by --fp8-expert-backend): the experts are rounded to their FP8 values first, so transformers and every row
of ours run the same weight values; each row names its expert_weights and expert_backend, and its floor counts
its own expert bytes (transformers' row: bf16).

  python bench/bench_model.py --preset deepseek-v3-4l --batch 1 32 --json bench/results/model_h200.json
  python bench/bench_model.py --preset tiny --device cpu --batch 1 2 --prompt-len 8 --steps 4   # a smoke run
  TRITON_INTERPRET=1 python bench/bench_model.py --preset tiny-fp8 --device cpu --batch 1 --prompt-len 8 \
      --steps 4 --expert-weights bf16,fp8                                                   # FP8 experts on a CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_ceilings, pick_device, sig, sync, write_record  # noqa: E402
from model_floor import add_floor, picked_experts  # noqa: E402

from nanomoe_fn.comm.base import make_comm  # noqa: E402
from nanomoe_fn.comm.launch import spawn_ranks  # noqa: E402
from nanomoe_fn.eplb.placement import Placement  # noqa: E402
from nanomoe_fn.model.config import PRESETS, ModelConfig, model_preset  # noqa: E402
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward  # noqa: E402
from nanomoe_fn.model.from_transformers import params_from_hf  # noqa: E402
from nanomoe_fn.model.generate import DecodeGraph  # noqa: E402
from nanomoe_fn.model.hf_config import config_to_hf  # noqa: E402
from nanomoe_fn.model.params import ModelParams, init_model_params, with_fp8_experts  # noqa: E402
from nanomoe_fn.moe.experts import EXPERT_BACKENDS  # noqa: E402


def build_transformers(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """transformers' own model of `cfg` on `device`, random weights (its init), `dtype`, sdpa attention."""
    import transformers

    hf = config_to_hf(cfg)
    cls = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
           "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM)}[hf["model_type"]]
    config = cls[0](**hf)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls[1](config).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # transformers inits the correction bias to 0: give routing a real bias
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.01)
    return model


def expert_formats(params: ModelParams, args: argparse.Namespace) -> list[tuple[str, ModelParams, str]]:
    """(expert weights, params, expert backend) per --expert-weights entry. With fp8 the routed experts are
    block-quantised (DeepSeek-V3's checkpoint format) and `params`' own experts (transformers' tensors too,
    when they are views of them) are overwritten with the FP8 values dequantised, so that every row, bf16
    and transformers' included, runs the same weight values."""
    fp8 = with_fp8_experts(params, write_back=True) if "fp8" in args.expert_weights else None
    return [(fmt, params, args.expert_backend) if fmt == "bf16" else (fmt, fp8, args.fp8_expert_backend)
            for fmt in args.expert_weights]


def median_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1e3, 3)


def time_transformers(model, ids: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Prefill, then `steps` greedy decode steps over a DynamicCache -> times and tokens."""
    from transformers import DynamicCache

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache, out.logits[:, -1].argmax(-1)

    with torch.no_grad():
        prefill()                                                    # warm-up
        sync(device)
        t0 = time.perf_counter()
        cache, nxt = prefill()
        sync(device)
        t_prefill = time.perf_counter() - t0
        tokens, times = [nxt], []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t0)
            tokens.append(nxt)
    return {"prefill_ms": round(t_prefill * 1e3, 3), "step_times": times[1:],
            "tokens": torch.stack(tokens, 1).tolist()}


def time_ours(params: ModelParams, ctx: ModelContext, ids: torch.Tensor, steps: int, graph: bool,
              device: torch.device, decode_ctx: ModelContext | None = None, compiled: bool = False) -> dict:
    """The same as time_transformers through model_forward (eager) or a captured DecodeGraph (of
    torch.compile(model_forward) when compiled)."""
    cfg, (B, P) = ctx.cfg, ids.shape
    dctx = decode_ctx or ctx
    dtype = params.layers[0].attn.kv_a_proj.dtype
    pos = torch.arange(P, device=device).expand(B, P)
    last = torch.full((B,), P - 1, device=device)

    def prefill():
        caches = init_caches(cfg, B, P + steps + 2, dtype, device)  # + the step picked_experts runs
        logits, caches = model_forward(params, ids, pos, caches, ctx, logits_at=last)
        return caches, logits.argmax(-1)

    with torch.no_grad():
        prefill()
        sync(device)
        t0 = time.perf_counter()
        caches, nxt = prefill()
        sync(device)
        t_prefill = time.perf_counter() - t0
        tokens, times, g = [nxt], [], None
        for t in range(steps):
            t0 = time.perf_counter()
            step_pos = torch.full((B, 1), P + t, device=device)
            if graph:
                fwd = torch.compile(model_forward, dynamic=False) if compiled and g is None else model_forward
                g = g or DecodeGraph(params, caches, dctx, nxt[:, None], step_pos, fwd)
                logits = g(nxt[:, None], step_pos)
            else:
                logits, caches = model_forward(params, nxt[:, None], step_pos, caches, dctx)
                logits = logits[:, 0]
            nxt = logits.argmax(-1)
            sync(device)
            times.append(time.perf_counter() - t0)
            tokens.append(nxt)
        picked = picked_experts(params, dctx, nxt[:, None], torch.full((B, 1), P + steps, device=device), caches)
    return {"prefill_ms": round(t_prefill * 1e3, 3), "step_times": times[2:] if graph else times[1:],
            "tokens": torch.stack(tokens, 1).tolist(), "picked": picked}


def row(variant: str, B: int, P: int, graph: bool, r: dict, W: int = 1) -> dict:
    step = statistics.median(r["step_times"])
    return {"variant": variant, "batch": B, "prompt_len": P, "graph": graph, "world_size": W,
            "prefill_ms": r["prefill_ms"], "prefill_tok_s": sig(B * P * W / (r["prefill_ms"] * 1e-3)),
            "decode_step_ms": round(step * 1e3, 3), "decode_tok_s": sig(B * W / step)}


def run_one_device(args: argparse.Namespace, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    ceilings = measure_ceilings(device, dtype)
    model = build_transformers(cfg, dtype, device, args.seed)
    base = params_from_hf(model, cfg)  # views of transformers' tensors
    formats = expert_formats(base, args)
    ctxs = {fmt: ModelContext(cfg, attn_backend=args.attn_backend, expert_backend=backend, check=False)
            for fmt, _, backend in formats}
    rows: list[dict] = []
    for B in args.batch:
        ids = torch.randint(2, cfg.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        ids = ids.to(device)
        hf = time_transformers(model, ids, args.steps, device) if "transformers" in args.variants else None
        hf_row = row("transformers", B, args.prompt_len, False, hf) if hf is not None else None
        rows += [hf_row] if hf_row else []
        modes = [(False, False)] + ([(True, False)] if device.type == "cuda" and args.graph else [])
        modes += [(True, True)] if args.compile and device.type == "cuda" else []
        for fmt, params, backend in formats if "nanomoe" in args.variants else []:
            first, picked = len(rows), None
            for graph, compiled in modes:
                try:
                    r = time_ours(params, ctxs[fmt], ids, args.steps, graph, device, compiled=compiled)
                except Exception as err:  # noqa: BLE001 - the experimental compiled variant reports its failure
                    if not compiled:
                        raise
                    rows.append({"variant": "nanomoe", "batch": B, "graph": True, "compile": True,
                                 "expert_weights": fmt, "failed": f"{type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:300]}"})
                    continue
                rows.append({**row("nanomoe", B, args.prompt_len, graph, r), "compile": compiled,
                             "expert_weights": fmt, "expert_backend": backend})
                picked = picked or r["picked"]
                if hf is not None:
                    rows[-1]["speedup_vs"] = {"transformers": round(rows[-1]["decode_tok_s"] / hf_row["decode_tok_s"],
                                                                    2)}
                    # greedy tokens of sequence 0 that agree with transformers' before the first difference
                    a, b = r["tokens"][0], hf["tokens"][0]
                    rows[-1]["tokens_agree"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            if picked is not None:  # the floor of this format's bytes; transformers reads bf16 experts
                add_floor(rows[first:], cfg, params, B, args.prompt_len + args.steps, picked, ceilings)
                if hf_row is not None and "floor_step_ms" not in hf_row:
                    add_floor([hf_row], cfg, base, B, args.prompt_len + args.steps, picked, ceilings)
        for r in rows:
            if r.get("batch") == B:
                print(r, flush=True)
    write_record(args.json, "model", device, 1, ceilings, rows,
                 {"preset": args.preset, "expert_weights": args.expert_weights})


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One EP rank: our model with this rank's experts, its own B sequences per batch size."""
    cfg = model_preset(args.preset)
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the CPU smoke run: the torch backends (the Triton ones are GPU kernels)
        args.attn_backend, args.expert_backend = "torch", "bmm"
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=W)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceilings = measure_ceilings(device, dtype)
    placement = Placement.identity(cfg.moe.num_experts, W)
    params = init_model_params(cfg, dtype, device, args.seed, placement, rank,
                               generator_device=device if device.type == "cuda" else None)
    formats = expert_formats(params, args)
    prefill_comm = make_comm("torch", timeout_s=120)
    rows = []
    for B in args.batch:
        opts = ({"max_tokens": B, "hidden": cfg.hidden, "top_k": cfg.moe.top_k, "num_slots": placement.num_physical,
                 "dtype": dtype, "timeout_s": 120} if args.decode_comm == "nvlink" else {"timeout_s": 120})
        if args.decode_comm == "torch_decode":
            opts["max_tokens"] = B
        decode_comm = make_comm("torch" if args.decode_comm == "torch_decode" else args.decode_comm, **opts)
        ids = torch.randint(2, cfg.vocab_size, (B, args.prompt_len),
                            generator=torch.Generator().manual_seed(B * W + rank)).to(device)
        modes = [(False, False)] + ([(True, False)] if device.type == "cuda" and args.graph else [])
        for fmt, fparams, backend in formats:
            ctx, dctx = (ModelContext(cfg, c, placement, args.attn_backend, backend, check=False)
                         for c in (prefill_comm, decode_comm))
            first = len(rows)
            for graph, compiled in modes + ([(True, True)] if args.compile and device.type == "cuda" else []):
                dist.barrier()
                r = time_ours(fparams, ctx, ids, args.steps, graph, device, dctx, compiled)
                slow = [torch.tensor([statistics.median(r["step_times"]), r["prefill_ms"]], device=device)]
                dist.all_reduce(slow[0], op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                r = {**r, "step_times": [float(slow[0][0])], "prefill_ms": round(float(slow[0][1]), 3)}
                rows.append({**row("nanomoe", B, args.prompt_len, graph, r, W), "compile": compiled,
                             "decode_comm": args.decode_comm, "expert_weights": fmt, "expert_backend": backend})
            add_floor(rows[first:], cfg, fparams, B, args.prompt_len + args.steps, r["picked"], ceilings)
            if rank == 0:
                for r in rows[first:]:
                    print(r, flush=True)
    if rank == 0:
        write_record(args.json, "model", device, W, ceilings, rows,
                     {"preset": args.preset, "expert_weights": args.expert_weights})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Parse flags; run on one device, or spawn the EP ranks (or be one under torchrun)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3-4l", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="sequences per rank")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=16, help="decode steps timed")
    p.add_argument("--variants", default="nanomoe,transformers", help="comma list of nanomoe, transformers")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also our decode step in a CUDA graph (CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="also the graph of torch.compile(model_forward) (experimental, CUDA only)")
    p.add_argument("--attn-backend", default="triton")
    p.add_argument("--expert-backend", default="triton", help="the backend of the bf16 experts")
    p.add_argument("--expert-weights", default="bf16",
                   help="comma list of bf16, fp8: our rows per format of the routed experts. fp8: block-scaled "
                        "(DeepSeek-V3's checkpoint format); every row, transformers' too, then runs the FP8 values")
    p.add_argument("--fp8-expert-backend", default="triton_fp8",
                   choices=sorted(n for n, b in EXPERT_BACKENDS.items() if b.fp8))
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--decode-comm", default="nvlink", choices=["nvlink", "torch", "torch_decode", "torch_fixed"],
                   help="torch_decode: the torch comm's decode mode (max_tokens = the batch)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_model.json")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in args.variants if v not in ("nanomoe", "transformers")]:
        raise SystemExit(f"bench_model: --variants: unknown {bad}; expected nanomoe, transformers")
    args.expert_weights = list(dict.fromkeys(f for f in args.expert_weights.split(",") if f))  # once each
    if not args.expert_weights or (bad := [f for f in args.expert_weights if f not in ("bf16", "fp8")]):
        raise SystemExit(f"bench_model: --expert-weights: expected a comma list of bf16, fp8, got "
                         f"{args.expert_weights}")
    if any(b < 1 for b in args.batch) or args.prompt_len < 1 or args.steps < 3:
        raise SystemExit("bench_model: --batch and --prompt-len must be >= 1, --steps >= 3")
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    if args.world_size > 1:
        return spawn_ranks(run_rank, args.world_size, None, args)
    device = pick_device(args.device)
    if device.type != "cuda":  # the Triton backends are GPU kernels: the CPU smoke run uses the torch ones
        args.attn_backend, args.expert_backend = "torch", "bmm"
    run_one_device(args, model_preset(args.preset), device, torch.bfloat16 if device.type == "cuda" else torch.float32)


if __name__ == "__main__":
    main()
