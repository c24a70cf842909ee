"""Pure parts of the `deepep` comm: option checks, its records (handle, pending halves) and the per-token
<-> per-expert row conversion.

Dimension legend: T tokens on this rank, k experts per token, H hidden, W ranks, P slots (all ranks),
P_local = P // W slots per rank, R tokens this rank received in DeepEP's normal dispatch (one row per
(token, destination rank)), M = (received token, local expert) pairs = rows of the expert batch.

Nothing here imports deep_ep or needs CUDA, so everything is tested on the CPU
(tests/test_deepep_comm.py). The limits below are read from DeepEP v1.2.1's sources (csrc/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nanomoe_fn.comm.plan import REDUCE_CHUNK_BYTES, weighted_rows
from nanomoe_fn.comm.token_rows import KERNEL_DTYPES

MODES = ("normal", "low_latency")
# csrc/kernels/launch.cuh SWITCH_HIDDEN: the hidden sizes the low-latency kernels are compiled for
LL_HIDDEN_SIZES = (2048, 2560, 4096, 5120, 6144, 7168, 8192)
LL_MAX_TOP_K = 11  # internode_ll.cu: kNumMaxTopK = 11 (dispatch and combine)
NORMAL_WORLD_SIZES = (2, 4, 8)  # intranode kernels: SWITCH_RANKS(2, 4, 8) on one NVLink host
NORMAL_MAX_LOCAL_SLOTS = 128  # intranode.cu notify_dispatch: num_experts / num_ranks <= kNumThreads (128)
NORMAL_MAX_TOP_K = 32  # intranode.cu: EP_DEVICE_ASSERT(num_topk <= 32)
FP8 = torch.float8_e4m3fn  # low-latency FP8 dispatch: fp8 rows + float32 scales per 128 channels
HOW_TO_GET = ("build DeepEP v1.2.1 from its public source (github.com/deepseek-ai/DeepEP, tag v1.2.1) on the "
              "GPU machine with `python setup.py build_ext --inplace` (NVSHMEM is needed for low-latency mode) "
              "and put that folder on PYTHONPATH")


@dataclass(frozen=True, eq=False)
class DeepEPHandle:
    """Everything combine needs. topk_idx [T', k] int64 physical slots and topk_weights [T', k] float32
    as given to DeepEP (T' = max(T, 1): one padding token when T == 0); num_tokens = T.
    normal mode: recv_weights [R, k] float32 (0 for experts elsewhere), pair_rows [R * k] (batch row of
    each received pair, num_rows where its expert is elsewhere), num_rows = M. refused_tokens: low-latency
    mode given T > max_tokens (none sent, num_tokens = 0): T, which its combine then raises about."""

    mode: str
    owner: int
    deep_handle: Any
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    num_tokens: int
    recv_weights: torch.Tensor | None = None
    pair_rows: torch.Tensor | None = None
    num_rows: int = 0
    refused_tokens: int = 0


@dataclass
class _Dispatching:
    handle: DeepEPHandle
    recv_x: Any  # normal: [R, H]; low_latency: [P_local, C, H], FP8: (fp8 rows, scales)
    recv_meta: torch.Tensor  # normal: recv_topk_idx [R, k] (local ids, -1 elsewhere); low_latency: counts [P_local]
    finish: Any  # normal: DeepEP's EventOverlap; low_latency: the receive hook


@dataclass
class _Combining:
    out: torch.Tensor  # [T', H]
    finish: Any
    num_tokens: int
    refused_tokens: int = 0


def _positive_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def check_options(mode: str | None = None, hidden: int | None = None, num_slots: int | None = None,
                  max_tokens: int | None = None, top_k: int | None = None, dtype: torch.dtype | None = None,
                  timeout_s: float | None = None, dispatch_dtype: torch.dtype | None = None) -> None:
    """Raise ValueError/TypeError naming the first bad option (None = not given, not checked).
    dispatch_dtype: None / bfloat16 (rows move in bf16) or float8_e4m3fn (low-latency mode only: DeepEP's
    kernels quantise per 128 channels on the way, hidden a multiple of 512)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, v in (("hidden", hidden), ("num_slots", num_slots), ("max_tokens", max_tokens), ("top_k", top_k)):
        if v is not None:
            _positive_int(name, v)
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if dtype != torch.bfloat16:
            raise ValueError(f"dtype must be torch.bfloat16 (DeepEP's combine kernels reduce bfloat16 only), "
                             f"got {dtype}")
    if timeout_s is not None and (not isinstance(timeout_s, (int, float)) or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if hidden is not None and hidden % 8:
        raise ValueError(f"hidden must be a multiple of 8 (DeepEP moves rows in 16-byte units), got {hidden}")
    if top_k is not None and num_slots is not None and top_k > num_slots:
        raise ValueError(f"top_k ({top_k}) must be <= num_slots ({num_slots})")
    if mode == "low_latency":
        if hidden is not None and hidden not in LL_HIDDEN_SIZES:
            raise ValueError(f"hidden={hidden} is not among the sizes DeepEP's low-latency kernels are compiled "
                             f"for {LL_HIDDEN_SIZES}; use mode='normal' or another comm")
        if top_k is not None and top_k > LL_MAX_TOP_K:
            raise ValueError(f"top_k={top_k} exceeds DeepEP's low-latency limit of {LL_MAX_TOP_K}")
    if mode == "normal" and top_k is not None and top_k > NORMAL_MAX_TOP_K:
        raise ValueError(f"top_k={top_k} exceeds DeepEP's normal-mode limit of {NORMAL_MAX_TOP_K}")
    if dispatch_dtype not in (None, torch.bfloat16, FP8):
        raise ValueError(f"dispatch_dtype must be None, torch.bfloat16 or {FP8}, got {dispatch_dtype}")
    if dispatch_dtype == FP8 and mode != "low_latency":
        raise ValueError(f"FP8 dispatch (dispatch_dtype={FP8}) is implemented for mode='low_latency' only (DeepEP's "
                         f"low-latency kernels quantise on the way), got mode={mode!r}")
    if dispatch_dtype == FP8 and hidden is not None and hidden % 512:
        raise ValueError(f"DeepEP's FP8 low-latency dispatch needs hidden to be a multiple of 512, got {hidden}")


def world_reason(mode: str, world_size: int, num_slots: int | None = None, max_tokens: int | None = None) -> str:
    """Why DeepEP cannot run `mode` over `world_size` ranks with these sizes ("" when it can)."""
    if mode == "normal" and world_size not in NORMAL_WORLD_SIZES:
        return (f"DeepEP's intranode normal mode runs on {NORMAL_WORLD_SIZES} ranks of one NVLink host, "
                f"the process group has {world_size}")
    if mode == "low_latency" and world_size < 2:
        return f"DeepEP needs at least 2 ranks, the process group has {world_size} (use the local comm)"
    if num_slots is not None:
        if num_slots % world_size:
            return f"num_slots ({num_slots}) must be divisible by the world size ({world_size})"
        if mode == "normal" and num_slots // world_size > NORMAL_MAX_LOCAL_SLOTS:
            return (f"DeepEP's normal mode takes at most {NORMAL_MAX_LOCAL_SLOTS} slots per rank, got "
                    f"{num_slots // world_size} ({num_slots} slots over {world_size} ranks)")
    if mode == "low_latency" and max_tokens is not None and (world_size * max_tokens) % 4:
        return (f"low-latency mode needs world_size * max_tokens to be a multiple of 4 (DeepEP's TMA layout), "
                f"got {world_size} * {max_tokens}")
    return ""


def environment_reason(deep_ep_error: str | None, cuda_available: bool, dist_initialized: bool,
                       backend: str | None) -> str:
    """Why this process cannot use DeepEP ("" when it can): the library, CUDA, the process group."""
    if deep_ep_error is not None:
        return f"deep_ep is not importable ({deep_ep_error}); {HOW_TO_GET}"
    if not cuda_available:
        return "DeepEP needs CUDA GPUs; torch.cuda.is_available() is False"
    if not dist_initialized:
        return "torch.distributed is not initialised; call init_process_group('nccl', ...) first"
    if backend is None or "nccl" not in backend:
        return f"DeepEP runs over an NCCL process group, this one's backend is {backend!r}"
    return ""


def pad_empty(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T == 0: one zero token that selects no expert (ids -1, weights 0), so DeepEP never sees an empty
    tensor; it is sent nowhere and the caller drops its combined row. T > 0: the inputs as they are."""
    if x.shape[0]:
        return x, topk_idx, topk_weights
    k = topk_idx.shape[1]
    return (x.new_zeros((1, x.shape[1])), topk_idx.new_full((1, k), -1),
            topk_weights.new_zeros((1, k)))


def expert_order(local_idx: torch.Tensor, num_local: int, num_rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the (received token, j) pairs by local expert.

    local_idx [R, k] int: local expert of each pair, -1 where the expert lives on another rank
    (DeepEP's recv_topk_idx). num_rows: M, the number of pairs with an expert here, when the caller
    knows it on the host (DeepEP's per-expert list); None counts it (a host read on GPUs).
    Returns (order [M] int64: flat pair index r * k + j of each batch row, rows sorted by expert and
    stably by pair; counts [P_local] int64; pair_rows [R * k] int64: batch row of each pair, M where
    the pair has no expert here).
    """
    flat = local_idx.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_local))  # other ranks' pairs sort last
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=flat.device)
    counts.index_add_(0, key, torch.ones_like(key))  # index_add_, not bincount: no data-sized output
    M = int(counts[:num_local].sum()) if num_rows is None else num_rows
    order = torch.argsort(key, stable=True)[:M]
    pair_rows = torch.full_like(flat, M)
    pair_rows[order] = torch.arange(M, dtype=torch.int64, device=flat.device)
    return order, counts[:num_local], pair_rows


def gather_expert_rows(recv_x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """The contiguous expert batch [M, H]: the received token row of each pair, in `order`."""
    return recv_x.index_select(0, order // top_k)


def token_weighted_sum(y: torch.Tensor, pair_rows: torch.Tensor, weights: torch.Tensor,
                       chunk_bytes: int = REDUCE_CHUNK_BYTES) -> torch.Tensor:
    """Per received token, the weighted sum of its local experts' output rows -> [R, H] in y's dtype.

    y [M, H] expert outputs (batch rows); pair_rows [R * k] from expert_order (M = no expert here);
    weights [R, k] float32 (DeepEP's recv_topk_weights). Pairs without a row add exactly 0 (masked,
    never multiplied, so a non-finite row cannot leak into other tokens). Float32 sums: on GPUs with
    bf16/fp16/fp32 rows one Triton kernel that reads each row once (kernels/ep_rows.py, the `torch` comm's
    partial sums); elsewhere plan.weighted_rows over token chunks (temporaries under chunk_bytes).
    """
    R, k = weights.shape
    M, H = y.shape
    if R == 0 or M == 0:  # no local pair at all (then R == 0 for real DeepEP output; kept total for safety)
        return y.new_zeros((R, H))
    idx = pair_rows.view(R, k)
    have = idx < M
    if y.is_cuda and y.dtype in KERNEL_DTYPES:
        from nanomoe_kernels import ep_rows  # Triton: imported only on GPUs

        out = y.new_empty((R, H))
        ep_rows.partial_rows(y.contiguous(), torch.where(have, idx, -1).to(torch.int32),
                             weights.to(torch.float32).contiguous(), out)
        return out
    return weighted_rows(y, idx.clamp_max(M - 1), weights, mask=have, chunk_bytes=chunk_bytes)
