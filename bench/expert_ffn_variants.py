"""The variants of bench/bench_expert_ffn.py: zero-argument functions computing the whole routed-expert FFN
of one layer, [T, H] -> [T, H_out], with their untimed setup done when they are built.

Dimension legend: T tokens, k top-k, N = T*k (token, k) pairs, E local experts, H hidden, I intermediate,
H_out output width, R aligned rows (experts padded to an alignment).

Ours: `loop` and `bmm` (nanomoe_fn's expert backends: expert_ffn on an ExpertBatch of the pairs sorted by
expert, then nanomoe_fn's combine arithmetic, weighted_rows: the unpermute gather and the float32 top-k
weighted sum; timed = the backend (argument checks included) + unpermute + weighted sum; untimed = sorting
the pairs, building the batch), `triton` (kernels.fused_moe on pre-aligned rows), `triton+align` (the same
with its align step timed) and `deepgemm` (kernels.deepgemm.deepgemm_fused_moe with a precomputed
alignment when that entry point exists, else the glue below). Peers: `deepgemm_glue` (DeepGEMM's grouped
GEMMs with torch glue written here: padded rows, one gather back, the weighted sum in the input dtype),
`bmm_padded` (a padded [E, C, H] torch.bmm written here), `grouped_mm` (torch._grouped_mm, PyTorch's grouped
GEMM, CUTLASS on the GPU: the pairs' rows sorted by expert, exact group sizes, no padding; the same glue) and
`sglang` (SGLang's Triton fused MoE through bench/peers_sgl.py, its moe-align computed ahead in torch). FP8
(ours): `triton_fp8` (kernels.fused_moe_fp8.fused_moe_fp8) and `deepgemm_fp8`
(kernels.deepgemm_fp8.deepgemm_fp8_fused_moe) on the bench's bf16 weights block-quantised (128 x 128, untimed),
each timing its activation quantisation too, `triton_fp8_hilo` (the same with act_terms=2: two-term
activations), `triton_fp8_tiles` and `triton_fp8_hilo_tiles` (those two with the weights in tile_weights' block
layout) and `triton_w8a16`
(kernels.fused_moe_w8a16.fused_moe_w8a16: the same weights, bf16 rows never quantised).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from nanomoe_kernels import deepgemm
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_aligned, stage_configs
from nanomoe_kernels.moe_align import moe_align
from nanomoe_kernels.moe_sum import sum_pairs

from nanomoe_fn import ExpertBatch, expert_ffn
from nanomoe_fn.comm.plan import weighted_rows
from nanomoe_fn.moe.params import LinearExperts, SwiGLUExperts

# block-scaled FP8 weights: W8A8 (x and the SwiGLU output quantised inside; _hilo: as two-term [hi | lo]
# FP8 pairs, two MMAs per step; _tiles: the weights in the block layout of tile_weights) and W8A16 (bf16 rows)
FP8_TRITON = {"triton_fp8": (1, False), "triton_fp8_tiles": (1, True), "triton_fp8_hilo": (2, False),
              "triton_fp8_hilo_tiles": (2, True)}  # variant: (act_terms, block layout)
FP8_VARIANTS = (*FP8_TRITON, "deepgemm_fp8", "triton_w8a16")
VARIANTS = ("loop", "bmm", "triton", "triton+align", "deepgemm", *FP8_VARIANTS, "deepgemm_glue", "bmm_padded",
            "sglang", "grouped_mm")
PEERS = ("sglang", "deepgemm_glue", "bmm_padded", "grouped_mm", "triton")  # rows carry speedup_vs against these


@dataclass
class Built:
    """build_variants' result: {variant: fn}, {variant: config used}, {variant: why it cannot run}."""

    fns: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def sorted_layout(ids: torch.Tensor, E: int,
                  align_m: int) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor, int]:
    """Setup for the torch-glue peers (host work, untimed): (slot of each (token, k) pair within its
    expert [N], counts [E] host list, padded position of each pair [N], m_indices [R] int32 with
    -1 on padding, R) for experts padded to multiples of align_m."""
    flat = ids.reshape(-1).long().cpu()
    order = torch.sort(flat, stable=True).indices
    counts_t = torch.bincount(flat, minlength=E)
    padded = (counts_t + align_m - 1) // align_m * align_m
    starts = torch.cumsum(padded, 0) - padded
    offsets = torch.cumsum(counts_t, 0) - counts_t
    e_sorted = flat[order]
    rank = torch.arange(flat.numel()) - offsets[e_sorted]
    slot = torch.empty_like(flat)
    slot[order] = rank
    pos = starts[flat] + slot
    R = max(int(padded.sum()), align_m)
    m_idx = torch.full((R,), -1, dtype=torch.int32)
    m_idx[pos] = flat.to(torch.int32)
    dev = ids.device
    return slot.to(dev), counts_t.tolist(), pos.to(dev), m_idx.to(dev), R


def package_variant(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
                    backend: str) -> Callable[[], torch.Tensor]:
    """nanomoe_fn's `backend` on the pairs sorted by expert (contiguous batch, built here), then the
    unpermute + weighted sum of nanomoe_fn's combine (weighted_rows)."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=weights[0].shape[0])
    pair_rows = torch.empty_like(order)
    pair_rows[order] = torch.arange(order.numel(), device=order.device)
    batch = ExpertBatch(x.index_select(0, order // k), counts)
    params = SwiGLUExperts(*weights) if len(weights) == 2 else LinearExperts(*weights)
    tw = tw.float()
    return lambda: weighted_rows(expert_ffn(params, batch, backend).x, pair_rows.view(T, k), tw)


def sgl_config(choice: str, T: int, E: int, k: int) -> dict:
    """SGLang's tile: "tuned" (bench.peers_sgl.sgl_tuned_config), "default" (SGLang's own fallback) or a
    JSON dict with BLOCK_SIZE_M/N/K, GROUP_SIZE_M and optionally num_warps, num_stages."""
    from bench.peers_sgl import sgl_default_config, sgl_tuned_config

    if choice == "tuned":
        return {"source": "tuned-style", **sgl_tuned_config(T, E, k)}
    if choice == "default":
        return {"source": "sglang default", **sgl_default_config(T, E)}
    cfg = json.loads(choice)
    missing = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"} - set(cfg)
    if missing:
        raise ValueError(f"--sgl-config JSON lacks {sorted(missing)}")
    return {"source": "given", **cfg}


def _sglang(out: Built, x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
            choice: str, folder: str | None) -> None:
    from bench.peers_sgl import DEFAULT_FOLDER, load_sgl_moe, sgl_align, sgl_fused_moe_call

    if len(weights) != 2:
        out.skipped["sglang"] = "the SGLang peer runs SwiGLU experts only"
        return
    try:
        mod = load_sgl_moe(folder or DEFAULT_FOLDER)
    except (FileNotFoundError, ImportError) as err:
        out.skipped["sglang"] = str(err)
        return
    T, k = ids.shape
    cfg = sgl_config(choice, T, weights[0].shape[0], k)
    kernel_cfg = {n: v for n, v in cfg.items() if n != "source"}
    align = sgl_align(ids, weights[0].shape[0], kernel_cfg["BLOCK_SIZE_M"])
    tw32 = tw.float().contiguous()
    out.fns["sglang"] = lambda: sgl_fused_moe_call(mod, x, *weights, ids, tw32, kernel_cfg, align)
    out.configs["sglang"] = cfg


def _deepgemm_glue(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor,
                   weights: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    T, k = ids.shape
    _, _, pos, m_idx, R = sorted_layout(ids, weights[0].shape[0], deepgemm.alignment())
    a = x.new_zeros((R, x.shape[1]))
    a[pos] = x.repeat_interleave(k, 0)
    wk = tw.to(x.dtype).reshape(T, k, 1)
    return lambda: (deepgemm.deepgemm_grouped_ffn(a, m_idx, *weights).index_select(0, pos)
                    .view(T, k, -1) * wk).sum(1)


def _bmm_padded(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor,
                weights: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    T, k = ids.shape
    slot, counts, _, _, _ = sorted_layout(ids, weights[0].shape[0], 1)
    cap = max(max(counts), 1)
    flat_e = ids.reshape(-1).long()
    xp = x.new_zeros((weights[0].shape[0], cap, x.shape[1]))
    xp[flat_e, slot] = x.repeat_interleave(k, 0)
    w_t = [w.transpose(1, 2) for w in weights]
    wk = tw.to(x.dtype).reshape(T, k, 1)

    def fn() -> torch.Tensor:
        if len(weights) == 1:
            y = torch.bmm(xp, w_t[0])
        else:
            gate, up = torch.bmm(xp, w_t[0]).float().chunk(2, dim=-1)
            y = torch.bmm((F.silu(gate) * up).to(x.dtype), w_t[1])
        return (y[flat_e, slot].view(T, k, -1) * wk).sum(1)

    return fn


def _grouped_mm(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor,
                weights: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    """torch._grouped_mm on the pairs sorted by expert (setup untimed): up, silu(gate) * up in float32 rounded
    once, down, then the rows back to their pairs and the float32 top-k weighted sum."""
    T, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    offs = torch.cumsum(torch.bincount(flat, minlength=weights[0].shape[0]), 0).to(torch.int32)
    pair_rows = torch.empty_like(order)
    pair_rows[order] = torch.arange(order.numel(), device=order.device)
    a = x.index_select(0, order // k)
    w_t = [w.transpose(1, 2) for w in weights]  # [E, K, N] column-major, as the kernel wants
    wk = tw.float().reshape(T, k, 1)

    def fn() -> torch.Tensor:
        if len(weights) == 1:
            y = torch._grouped_mm(a, w_t[0], offs=offs)
        else:
            gate, up = torch._grouped_mm(a, w_t[0], offs=offs).chunk(2, dim=-1)
            y = torch._grouped_mm((F.silu(gate.float()) * up).to(x.dtype), w_t[1], offs=offs)
        return (y.index_select(0, pair_rows).view(T, k, -1).float() * wk).sum(1).to(x.dtype)

    return fn


def _fp8_variants(out: Built, x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor,
                  weights: tuple[torch.Tensor, ...], names: list[str]) -> None:
    from nanomoe_kernels.fp8_quant import quant_fp8_blocks
    from nanomoe_kernels.fused_moe_fp8 import fp8_configs, fused_moe_fp8
    from nanomoe_kernels.fused_moe_fp8_kernel import tile_weights

    if len(weights) != 2 or any(n % 128 for n in weights[1].shape[1:]):
        for n in FP8_VARIANTS:
            out.skipped[n] = "FP8 experts are SwiGLU with hidden and intermediate multiples of 128"
        return
    w8 = (*quant_fp8_blocks(weights[0]), *quant_fp8_blocks(weights[1]))
    T, k = ids.shape
    for name, (terms, tiles) in FP8_TRITON.items():
        if name in names:
            w = (tile_weights(w8[0]), w8[1], tile_weights(w8[2]), w8[3]) if tiles else w8
            out.fns[name] = functools.partial(fused_moe_fp8, x, ids, tw, *w, act_terms=terms)
            up, down, _ = fp8_configs(None, weights[0].shape[0], x.shape[1], weights[1].shape[2], T * k, x.device,
                                      act_terms=terms, tiles=tiles)
            out.configs[name] = {"up": up, "down": down}
    if "triton_w8a16" in names:
        if x.dtype in (torch.bfloat16, torch.float16):
            from nanomoe_kernels.fused_moe_w8a16 import fused_moe_w8a16

            out.fns["triton_w8a16"] = lambda: fused_moe_w8a16(x, ids, tw, *w8)
        else:
            out.skipped["triton_w8a16"] = f"W8A16 rows are bfloat16/float16, the bench's are {x.dtype}"
    if "deepgemm_fp8" in names:
        try:
            from nanomoe_kernels import deepgemm_fp8 as dg8
        except ImportError as err:
            out.skipped["deepgemm_fp8"] = f"kernels.deepgemm_fp8 is not importable: {err}"
            return
        ok, why = dg8.supports_fp8(x, w8)
        if ok:
            out.fns["deepgemm_fp8"] = lambda: dg8.deepgemm_fp8_fused_moe(x, ids, tw, *w8)
        else:
            out.skipped["deepgemm_fp8"] = why


def _triton(out: Built, x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
            expert_type: str, names: list[str]) -> None:
    # a scope of its own: up to run 184 the triton closure read a name the DeepGEMM setup below rebound in the
    # same function, so with `deepgemm` in the run `triton` ran on DeepGEMM's 128-row alignment (no 64-row tails)
    T, H = x.shape
    k, E = ids.shape[1], weights[0].shape[0]
    first, down, bm = stage_configs(None, expert_type, E, H, weights[0].shape[1] // 2, weights[-1].shape[1], x.dtype,
                                    T * k, x.device)
    align, row_w = moe_align(ids, E, bm), tw.reshape(-1).contiguous()

    def triton_fn() -> torch.Tensor:
        pairs = fused_moe_aligned(x, align, weights, expert_type, first, down, a_div=k, row_weights=row_w)
        return sum_pairs(pairs, k) if k > 1 else pairs

    cfg = {"up" if expert_type == "swiglu" else "linear": first, "down": down, "align_block": align.block_m}
    for name, fn in (("triton", triton_fn), ("triton+align", lambda: fused_moe(x, ids, tw, weights, expert_type))):
        if name in names:
            out.fns[name], out.configs[name] = fn, cfg


def _deepgemm(out: Built, x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
              expert_type: str, names: list[str]) -> None:
    ok, why = deepgemm.supports(x, weights) if expert_type == "swiglu" else (False, "SwiGLU experts only")
    for name in ("deepgemm", "deepgemm_glue"):
        if name in names and not ok:
            out.skipped[name] = why
    if not ok:
        return
    fused = getattr(deepgemm, "deepgemm_fused_moe", None)
    if "deepgemm" in names:
        if fused is not None:
            align = moe_align(ids, weights[0].shape[0], deepgemm.alignment())
            out.fns["deepgemm"] = lambda: fused(x, ids, tw, weights, align=align)
        else:
            out.fns["deepgemm"] = _deepgemm_glue(x, ids, tw, weights)
        out.configs["deepgemm"] = {"entry": "deepgemm_fused_moe" if fused else "glue (no deepgemm_fused_moe)",
                                   "alignment": deepgemm.alignment()}
    if "deepgemm_glue" in names:
        out.fns["deepgemm_glue"] = _deepgemm_glue(x, ids, tw, weights)


def build_variants(x: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, weights: tuple[torch.Tensor, ...],
                   expert_type: str, names: list[str], sgl_choice: str = "tuned",
                   sgl_folder: str | None = None) -> Built:
    """The variants in `names` that can run here (setup done now, untimed); the others in .skipped."""
    out = Built()
    for name in ("loop", "bmm"):
        if name in names:
            out.fns[name] = package_variant(x, ids, tw, weights, name)
    if "triton" in names or "triton+align" in names:
        _triton(out, x, ids, tw, weights, expert_type, names)
    if "deepgemm" in names or "deepgemm_glue" in names:
        _deepgemm(out, x, ids, tw, weights, expert_type, names)
    if any(n in names for n in FP8_VARIANTS):
        _fp8_variants(out, x, ids, tw, weights, names)
    if "bmm_padded" in names:
        out.fns["bmm_padded"] = _bmm_padded(x, ids, tw, weights)
    if "grouped_mm" in names:
        if hasattr(torch, "_grouped_mm") and (x.dtype == torch.bfloat16 or x.device.type == "cpu"):
            out.fns["grouped_mm"] = _grouped_mm(x, ids, tw, weights)
        else:
            out.skipped["grouped_mm"] = "needs torch._grouped_mm (torch >= 2.8) and bfloat16 rows on a GPU"
    if "sglang" in names:
        _sglang(out, x, ids, tw, weights, sgl_choice, sgl_folder)
    out.fns = {n: out.fns[n] for n in VARIANTS if n in out.fns}  # a fixed row order
    return out
