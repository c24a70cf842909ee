"""Where a decode step of the model goes (GPU): kernel times of eager steps from torch.profiler, grouped by
kernel name, and the CUDA-graph replay time. Our model only (random weights drawn on the GPU).

  python bench/gpu/model_profile.py --preset deepseek-v3-4l --batch 1 --json /tmp/out/profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward
from nanomoe_fn.model.generate import DecodeGraph
from nanomoe_fn.model.params import init_model_params


def main() -> None:
    """Profile eager decode steps and time graph replays; print and write the top kernels."""
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="deepseek-v3-4l")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--attn-backend", default="triton")
    p.add_argument("--expert-backend", default="triton")
    p.add_argument("--json", default="profile.json")
    a = p.parse_args()
    cfg = model_preset(a.preset)
    dev = torch.device("cuda")
    params = init_model_params(cfg, torch.bfloat16, dev, seed=0, generator_device=dev)
    ctx = ModelContext(cfg, attn_backend=a.attn_backend, expert_backend=a.expert_backend, check=False)
    B, P = a.batch, a.context
    caches = init_caches(cfg, B, P + 64, torch.bfloat16, dev)
    ids = torch.randint(2, cfg.vocab_size, (B, P), device=dev)
    with torch.no_grad():
        _, caches = model_forward(params, ids, torch.arange(P, device=dev).expand(B, P), caches, ctx,
                                  logits_at=torch.full((B,), P - 1, device=dev))
        tok = ids[:, -1:]

        def eager(t: int):
            nonlocal caches
            logits, caches = model_forward(params, tok, torch.full((B, 1), P + t, device=dev), caches, ctx)
            return logits

        for t in range(3):
            eager(t)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for t in range(3, 8):
                eager(t)
            torch.cuda.synchronize()
        kernels: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels.setdefault(e.name[:90], []).append(e.device_time_total)
        total = sum(sum(v) for v in kernels.values()) / 5
        top = sorted(((sum(v) / 5, len(v) / 5, k) for k, v in kernels.items()), reverse=True)
        graph = DecodeGraph(params, caches, ctx, tok, torch.full((B, 1), P + 8, device=dev))
        times = []
        for t in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            graph(tok, torch.full((B, 1), P + 9 + t, device=dev))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out = {"batch": B, "kernel_us_per_step": round(total, 1), "kernels_per_step": sum(c for _, c, _ in top),
           "graph_step_ms": round(statistics.median(times) * 1e3, 3),
           "top": [{"us": round(us, 1), "calls": c, "name": k} for us, c, k in top[:40]]}
    print(json.dumps(out, indent=1))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
