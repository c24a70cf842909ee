"""Raw DeepEP `Buffer` timings: the peer rows `deepep_raw` (normal mode) and `deepep_ll_raw` (low latency).

Dimension legend: T tokens per rank, H hidden, E experts, k experts per token, W ranks, P_local = E / W.

Calls DeepEP v1.2.1's public Python API the way its own tests (tests/test_intranode.py,
tests/test_low_latency.py) do, with buffers sized by its size hints:
- normal: get_dispatch_layout(topk_idx, E) -> dispatch(x, num_tokens_per_rank, is_token_in_rank,
  num_tokens_per_expert, topk_idx, topk_weights) -> combine(recv_x, handle, topk_weights=recv_w),
  default configs; each timed dispatch includes the layout kernel and DeepEP's own host read of the
  received counts (what a layer pays). Combine sums rows without weights: checked as x * (number of
  ranks the token went to).
- low latency: low_latency_dispatch(x, topk_idx, T, E, use_fp8=False, async_finish=False,
  return_recv_hook=False) -> masked [P_local, W * T, H] + counts -> low_latency_combine(recv_x,
  topk_idx, topk_weights, handle): sum_k(w) * x.
Used by bench/bench_dispatch.py (`--variants deepep_raw,deepep_ll_raw`); nothing here is DeepEP's
code, only calls into it. Run these variants in their own process: each builds its own Buffer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.distributed as dist

from bench.common import all_ranks_ok, ranks_errors, time_back_to_back, time_pair

VARIANTS = ("deepep_raw", "deepep_ll_raw")
LL_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)  # DeepEP v1.2.1 SWITCH_HIDDEN (csrc/kernels/launch.cuh)
LL_MAX_TOPK = 11  # kNumMaxTopK in csrc/kernels/internode_ll.cu


def supports(variant: str, case: tuple, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """Whether the raw peer can run this case here, and why not."""
    phase, E, k, H, T = case
    if device.type != "cuda":
        return False, "DeepEP needs CUDA GPUs (--backend nccl)"
    if importlib.util.find_spec("deep_ep") is None:
        return False, "deep_ep is not importable (build DeepEP v1.2.1 and put it on PYTHONPATH)"
    if dtype != torch.bfloat16:
        return False, f"DeepEP moves bfloat16 rows here, got {dtype}"
    if E % dist.get_world_size():
        return False, f"experts ({E}) must divide evenly over {dist.get_world_size()} ranks"
    if variant == "deepep_ll_raw":
        if H not in LL_HIDDEN:
            return False, f"low-latency kernels are compiled for hidden in {LL_HIDDEN}, got {H}"
        if k > LL_MAX_TOPK:
            return False, f"low-latency kernels take top-k <= {LL_MAX_TOPK}, got {k}"
    return True, ""


def _normal(run: Any, warmup: int, iters: int) -> tuple[tuple[list, list], str]:
    import deep_ep

    group, W, E = dist.group.WORLD, run.W, run.case[1]
    x, ids = run.x, run.routing.topk_ids.long()
    w = run.routing.topk_weights.float().contiguous()
    hidden_bytes = x.shape[1] * max(x.element_size(), 2)
    nvl_bytes = max(deep_ep.Buffer.get_dispatch_config(W).get_nvl_buffer_size_hint(hidden_bytes, W),
                    deep_ep.Buffer.get_combine_config(W).get_nvl_buffer_size_hint(hidden_bytes, W))
    buf = deep_ep.Buffer(group, nvl_bytes, 0, explicitly_destroy=True)
    state: dict = {}

    def d() -> None:
        n_rank, _, n_expert, in_rank, _ = buf.get_dispatch_layout(ids, E)
        recv_x, _, recv_w, counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
            topk_idx=ids, topk_weights=w)
        state.update(recv_x=recv_x, recv_w=recv_w, counts=counts, handle=handle, in_rank=in_rank)

    def c() -> torch.Tensor:
        return buf.combine(state["recv_x"], state["handle"], topk_weights=state["recv_w"])[0]

    try:
        d()
        out = c()
        why = ""
        if list(state["counts"]) != run.expected_counts.tolist():
            why = (f"rank {run.rank}: per-expert counts {sum(state['counts'])} rows != expected "
                   f"{int(run.expected_counts.sum())}")
        ref = (x.double() * state["in_rank"].sum(1, keepdim=True).double()).to(x.dtype)
        if not why and not torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2):
            why = f"rank {run.rank}: combine(dispatch(x)) != x * ranks per token"
        ok = all_ranks_ok(not why, run.device)  # every rank times, or none does
        times = _time_both(d, c, run, warmup, iters) if ok else ([], [])
        why = "" if ok else ranks_errors(why)
    finally:
        torch.cuda.synchronize()
        dist.barrier()
        buf.destroy()
    return times, why


def _time_both(d: Any, c: Any, run: Any, warmup: int, iters: int) -> tuple[list, list]:
    """(per-call times with a barrier before each, the same back to back) of dispatch d and combine c."""
    return (time_pair(d, c, run.device, warmup, iters, run.barrier),
            time_back_to_back(d, c, run.device, warmup, iters, dist.barrier))


def _low_latency(run: Any, warmup: int, iters: int) -> tuple[tuple[list, list], str]:
    import deep_ep

    group, W, E, T = dist.group.WORLD, run.W, run.case[1], run.case[4]
    x, ids = run.x, run.routing.topk_ids.long().contiguous()
    w = run.routing.topk_weights.float().contiguous()
    rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, x.shape[1], W, E)
    buf = deep_ep.Buffer(group, 0, rdma_bytes, low_latency_mode=True, num_qps_per_rank=E // W,
                         explicitly_destroy=True)
    state: dict = {}

    def d() -> None:
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, ids, T, E, use_fp8=False, async_finish=False,
                                                                     return_recv_hook=False)
        state.update(recv_x=recv_x, recv_count=recv_count, handle=handle)

    def c() -> torch.Tensor:
        return buf.low_latency_combine(state["recv_x"], ids, w, state["handle"])[0]

    try:
        d()
        why = run.check(c(), state["recv_count"])
        ok = all_ranks_ok(not why, run.device)  # every rank times, or none does
        times = _time_both(d, c, run, warmup, iters) if ok else ([], [])
        why = "" if ok else ranks_errors(why)
    finally:
        torch.cuda.synchronize()
        dist.barrier()
        buf.destroy()
    return times, why


def run(variant: str, bench_run: Any, warmup: int, iters: int) -> tuple[tuple[list, list], str]:
    """Check, then time, one raw peer on bench_dispatch's case state (x, routing, expected counts);
    returns (([(dispatch s, combine s)] per iteration with a barrier before each, the same back to back),
    '' or why the check failed)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return (_normal if variant == "deepep_raw" else _low_latency)(bench_run, warmup, iters)
