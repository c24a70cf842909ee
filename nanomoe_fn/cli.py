"""The `nanomoe` command: generate text with a model, and run the benchmarks of a source checkout.

  nanomoe generate --prompt "Hello"                          # a random tiny model, byte-level tokens
  nanomoe generate --checkpoint DIR --prompt "Hi" --max-new-tokens 64 --temperature 0.7 --top-p 0.9
  nanomoe generate --checkpoint DIR --nproc 2 ...            # expert parallelism over 2 spawned ranks
  torchrun --nproc-per-node 2 -m nanomoe_fn.cli generate ... # or ranks started by torchrun
  nanomoe bench [--multi] [FLAGS]   # bench/bench_ep_moe.py (or bench_ep_moe_multi.py) with FLAGS
  nanomoe layer [FLAGS]             # bench/bench_layer.py
  nanomoe eplb [FLAGS]              # bench/bench_eplb.py

Every error ends the command with one line (`nanomoe: error: ...`, exit status 2); --debug shows the traceback.
`generate` checks its flags against the model's config before it loads weights or spawns ranks, naming the flag.
Under expert parallelism each rank generates for its share of the prompts (prompt i on rank i % W) with the
experts an identity placement gives it; rank 0 prints every output in prompt order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nanomoe_fn.cli_util import (
    ByteTokenizer,
    OneLineParser,
    UsageError,
    backend_names,
    check_generate_args,
    rank_device,
    tokenizer_of,
    use_cuda_graph,
)

BENCHES = {"bench": "bench_ep_moe.py", "bench-multi": "bench_ep_moe_multi.py", "layer": "bench_layer.py",
           "eplb": "bench_eplb.py"}


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="nanomoe", description="NanoMoE: expert-parallel DeepSeek-V3-family inference")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from prompts")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    g.add_argument("--checkpoint", help="a Hugging Face checkpoint folder (config.json, *.safetensors, "
                   "tokenizer.json); default: a random model of --preset")
    g.add_argument("--preset", default="tiny", help="model preset without --checkpoint: tiny (default), "
                   "tiny-fp8 (dims of 128: the FP8 expert backends run it), deepseek-v3-4l")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", type=int, action="append", default=[], help="a stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:i (one rank; default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default bfloat16 on CUDA, float32 on the CPU")
    g.add_argument("--attn-backend", default=None, help="torch or triton (default: triton on CUDA)")
    g.add_argument("--expert-backend", default=None, help="loop, bmm, triton, deepgemm, or FP8 experts: triton_fp8, "
                   "triton_fp8_hilo, deepgemm_fp8, triton_w8a16 (default: triton on CUDA)")
    g.add_argument("--paged", action="store_true", help="paged MLA caches")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps as CUDA graph replays (default: on CUDA with a capturable expert backend, "
                   "e.g. the default triton; --no-cuda-graph: eager steps)")
    g.add_argument("--compile", action="store_true", help="decode steps through torch.compile (compiles first)")
    g.add_argument("--nproc", type=int, default=1, help="expert-parallel ranks to spawn (default 1)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for name in BENCHES:
        if name != "bench-multi":
            b = sub.add_parser(name, help=f"run bench/{BENCHES[name]} of the source checkout", add_help=False)
            if name == "bench":
                b.add_argument("--multi", action="store_true", help="bench_ep_moe_multi.py (several ranks)")
            b.add_argument("flags", nargs=argparse.REMAINDER, help="flags passed to the benchmark")
    return p


def _load(a: argparse.Namespace, device: Any, placement_world: int, rank: int) -> tuple[Any, Any, Any, Any]:
    """(cfg, params, placement, tokenizer) of this rank."""
    import torch

    from nanomoe_fn.eplb.placement import Placement
    from nanomoe_fn.model.config import model_preset
    from nanomoe_fn.model.params import init_model_params
    from nanomoe_fn.moe.experts import EXPERT_BACKENDS

    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    fp8 = a.expert_backend in EXPERT_BACKENDS and EXPERT_BACKENDS[a.expert_backend].fp8  # experts kept in FP8
    if a.checkpoint is None:
        cfg = model_preset(a.preset)
        placement = Placement.identity(cfg.moe.num_experts, placement_world)
        params = init_model_params(cfg, dtype, device, a.seed, placement, rank)
        if fp8:
            from nanomoe_fn.model.params import with_fp8_experts

            params = with_fp8_experts(params)
        return cfg, params, placement, ByteTokenizer()
    from nanomoe_fn.model.checkpoint import load_checkpoint, read_model_config

    cfg = read_model_config(a.checkpoint)  # the placement needs the expert count before the load
    placement = Placement.identity(cfg.moe.num_experts, placement_world)
    cfg, params = load_checkpoint(a.checkpoint, dtype=dtype, device=device, placement=placement, rank=rank,
                                  fp8_experts=fp8)
    return cfg, params, placement, tokenizer_of(a)


def _generate_rank(rank: int, world: int, a: argparse.Namespace) -> dict | None:
    """Generate this rank's prompts; rank 0 returns the whole result (every rank's outputs in prompt order)."""
    import torch
    import torch.distributed as dist

    from nanomoe_fn.model.forward import ModelContext
    from nanomoe_fn.model.generate import generate
    from nanomoe_fn.model.sampling import SamplingConfig

    device = rank_device(a, rank, world)
    cuda = device.type == "cuda"
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    t0 = time.perf_counter()
    cfg, params, placement, tok = _load(a, device, world, rank)
    comm, decode_comm = None, None
    texts = a.prompt or ["Hello"]
    if world > 1:
        from nanomoe_fn.comm.torch_dist import TorchComm

        # prefill: exact splits; decode: one token per sequence, at most ceil(prompts / world) per rank (the
        # same on every rank): the sync-free decode mode, which a CUDA-graph decode step can capture
        comm = TorchComm(timeout_s=300)
        decode_comm = TorchComm(timeout_s=300, max_tokens=max(1, -(-len(texts) // world)))
    kw = dict(comm=comm) if comm is not None else {}
    attn, experts = backend_names(a, cuda)
    ctx = ModelContext(cfg, placement=placement, attn_backend=attn, expert_backend=experts, **kw)
    dctx = None if decode_comm is None else dataclasses.replace(ctx, comm=decode_comm)
    prompts = [tok.encode(t) for t in texts]
    mine = list(range(rank, len(prompts), world))
    s = SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=a.seed, stop_tokens=tuple(a.stop), ignore_eos=a.ignore_eos)
    bar = None
    if rank == 0 and not a.json and sys.stderr.isatty() and a.max_new_tokens >= 64:
        from tqdm import tqdm

        bar = tqdm(total=a.max_new_tokens - 1, desc="decode", unit="tok", file=sys.stderr)
    t1 = time.perf_counter()
    graph = use_cuda_graph(a, cuda)
    outs = generate(params, [prompts[i] for i in mine], ctx, s, paged=a.paged, cuda_graph=graph,
                    progress=(lambda k: bar.update(1)) if bar else None, decode_ctx=dctx, compile=a.compile)
    if bar is not None:
        bar.close()
    t_gen = time.perf_counter() - t1
    pairs = list(zip(mine, outs))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, pairs)
        pairs = sorted(p for part in gathered for p in part)
        for c in (comm, decode_comm):  # before destroy_process_group (TorchComm.close)
            c.close()
        dist.destroy_process_group()
    if rank != 0:
        return None
    new = sum(len(o) for _, o in pairs)
    return {"model": a.checkpoint or f"random {a.preset}", "world_size": world, "device": str(device),
            "cuda_graph": graph, "load_s": round(t1 - t0, 3), "generate_s": round(t_gen, 3), "new_tokens": new,
            "tokens_per_s": round(new / t_gen, 2) if t_gen > 0 else None,
            "outputs": [{"prompt": texts[i], "tokens": o, "text": tok.decode(o)} for i, o in pairs]}


def _spawned(rank: int, world: int, a: argparse.Namespace, out_path: str) -> None:
    result = _generate_rank(rank, world, a)
    if result is not None:
        Path(out_path).write_text(json.dumps(result))


def cmd_generate(a: argparse.Namespace) -> int:
    """`nanomoe generate`: prints the outputs (or one JSON object)."""
    torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if torchrun else (0, 1)
    check_generate_args(a, rank, world)
    if torchrun:
        result = _generate_rank(rank, world, a)
    elif a.nproc > 1:
        import logging
        import tempfile

        from nanomoe_fn.comm.launch import spawn_ranks

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            if not a.debug:  # torch's "Terminating process ..." warnings: the error is one line
                logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
            spawn_ranks(_spawned, a.nproc, None, a, out)
            result = json.loads(Path(out).read_text())
    else:
        result = _generate_rank(0, 1, a)
    if result is None:
        return 0
    if a.json:
        print(json.dumps(result))
    else:
        for o in result["outputs"]:
            print(f"{o['prompt']}{o['text']}")
        print(f"[{result['new_tokens']} tokens in {result['generate_s']:.2f} s, {result['tokens_per_s']} tokens/s, "
              f"{result['model']}, {result['world_size']} rank(s), {result['device']}]", file=sys.stderr)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    """`nanomoe bench|layer|eplb`: the benchmark script of the source checkout, as a subprocess."""
    script = BENCHES["bench-multi" if getattr(a, "multi", False) else a.command]
    path = Path(__file__).resolve().parent.parent / "bench" / script
    if not path.is_file():
        raise ValueError(f"`nanomoe {a.command}` runs bench/{script} of a source checkout, which this install "
                         f"does not have (looked for {path})")
    flags = [f for f in a.flags if f != "--"]
    return subprocess.call([sys.executable, str(path), *flags])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nanomoe` console script."""
    parser = _parser()
    a, unknown = parser.parse_known_args(argv)
    if a.command == "generate" and unknown:
        print(f"nanomoe: error: unrecognized arguments: {' '.join(unknown)} (see nanomoe generate --help)",
              file=sys.stderr)
        return 2
    if a.command != "generate":  # every other flag (--help included) belongs to the benchmark
        a.flags = [*unknown, *a.flags]
    try:
        return cmd_generate(a) if a.command == "generate" else cmd_bench(a)
    except KeyboardInterrupt:
        print("nanomoe: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if a.debug:
            raise
        print(f"nanomoe: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - every error is one line (the traceback with --debug)
        if a.debug:
            raise
        from nanomoe_fn.comm.launch import spawn_error_line

        spawned = getattr(err, "error_index", None) is not None
        msg = spawn_error_line(err) if spawned else " ".join(str(err).split()) or type(err).__name__
        print(f"nanomoe: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
