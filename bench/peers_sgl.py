"""SGLang's Triton kernels as comparison peers: the fused-MoE and MLA-decode kernel files of the sglang
0.5.23 wheel, loaded from a folder git ignores (`.peers/sgl`) with their few package imports stubbed.

Dimension legend: T tokens, k experts per token, E experts, H hidden, I expert intermediate, R sorted rows
(each expert's (token, k) pairs padded to a multiple of BLOCK_SIZE_M, as SGLang's moe-align lays them out).

None of SGLang's code is in this repository: `load_sgl_moe` / `load_sgl_decode` import the files as they
are, after putting minimal stand-ins for the sglang modules they import into sys.modules (answers for an
NVIDIA Hopper GPU: CUDA, not ROCm, no PDL launches, no MoE padding, batch-invariant mode off, environment
knobs at SGLang's defaults). `sgl_fused_moe_call` runs SGLang's whole SwiGLU expert FFN the way its
Triton MoE runner does: up GEMM (invoke_fused_moe_kernel) -> act_and_mul_triton -> down GEMM with the
top-k weights -> moe_sum_reduce_triton; the moe-align step is ours, in torch (`sgl_align`, setup).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

DEFAULT_FOLDER = str(Path(__file__).resolve().parent.parent / ".peers" / "sgl")  # the repository's .peers/sgl
FILES = {"moe": "fused_moe_triton_kernels.py", "decode": "decode_attention.py", "score_mod": "score_mod.py"}
HOW = "put sglang 0.5.23's kernel files in .peers/sgl (" + ", ".join(FILES.values()) + ")"
# sglang.srt.environ knobs the files read, with SGLang's defaults (an environment variable overrides)
ENV_DEFAULTS: dict[str, bool | float] = {
    "SGLANG_USE_AITER": False,
    "SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS": False,
    "SGLANG_MLA_DECODE_TUNE": False,
    "SGLANG_FORCE_LEAN_GRID_CU_MULT": 1.0,
}


class _Knob:
    """One `envs.NAME`: .get() gives the environment's value in the default's type, else the default."""

    def __init__(self, name: str, default: bool | float) -> None:
        self.name, self.default = name, default

    def get(self) -> bool | float:
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default
        if isinstance(self.default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return type(self.default)(raw)


class _Envs:
    def __getattr__(self, name: str) -> _Knob:
        if name not in ENV_DEFAULTS:
            raise AttributeError(f"bench/peers_sgl.py stubs no sglang envs.{name}: add its default to ENV_DEFAULTS")
        return _Knob(name, ENV_DEFAULTS[name])


def _core_count(device_id: int = 0) -> int:
    """SMs of CUDA device `device_id`; 0 without CUDA (decode_attention then sizes no splits by it)."""
    return torch.cuda.get_device_properties(device_id).multi_processor_count if torch.cuda.is_available() else 0


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _quantised(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("bench/peers_sgl.py stubs SGLang's quantisation kernels: the peers run bf16/fp16/fp32")


def _exec_config() -> types.SimpleNamespace:
    """sglang.srt.runtime_context.get_exec(): a server with default settings (not deterministic, no tile size)."""
    return types.SimpleNamespace(deterministic=types.SimpleNamespace(enable_deterministic_inference=False),
                                 kernel=types.SimpleNamespace(triton_attention_split_tile_size=None))


STUBS: dict[str, dict[str, Any]] = {
    "sglang.kernels.jit.utils": {"is_arch_support_pdl": lambda: False},
    "sglang.kernels.ops.quantization.fp8_kernel": dict.fromkeys(
        ("per_token_group_quant_fp8", "scaled_fp8_quant", "sglang_per_token_group_quant_fp8"), _quantised),
    "sglang.kernels.ops.quantization.int8_kernel": dict.fromkeys(
        ("per_token_group_quant_int8", "per_token_quant_int8", "sglang_per_token_group_quant_int8"), _quantised),
    "sglang.srt.batch_invariant_ops": {"is_batch_invariant_mode_enabled": lambda: False},
    "sglang.srt.environ": {"envs": _Envs()},
    "sglang.srt.layers.moe.utils": {"get_moe_padding_size": lambda use_aiter=False: 0},
    "sglang.srt.runtime_context": {"get_exec": _exec_config},
    "sglang.srt.utils": {
        "is_cuda": lambda: True, "is_hip": lambda: False, "is_cpu": lambda: False,
        "cpu_has_amx_support": lambda: False, "is_sm90_supported": _sm90, "get_device_core_count": _core_count,
        "is_gfx95_supported": lambda: False, "is_gfx1250_supported": lambda: False,
    },
}


def _module(dotted: str, package: bool) -> types.ModuleType:
    """sys.modules[dotted], made (a stand-in, as a package when asked) with its parent packages if missing."""
    parent, _, leaf = dotted.rpartition(".")
    if dotted not in sys.modules:
        mod = types.ModuleType(dotted, "stand-in from bench/peers_sgl.py")
        mod.__nanomoe_stub__ = True
        sys.modules[dotted] = mod
        if parent:
            setattr(_module(parent, True), leaf, mod)
    mod = sys.modules[dotted]
    if package and not hasattr(mod, "__path__"):
        mod.__path__ = []  # a package: `import a.b.c` finds its children in sys.modules
    return mod


def install_stubs() -> None:
    """Put the stand-in sglang modules (and their parent packages) into sys.modules, unless a real sglang
    is already imported; idempotent."""
    if "sglang" in sys.modules and not getattr(sys.modules["sglang"], "__nanomoe_stub__", False):
        return
    for name, attrs in STUBS.items():
        mod = _module(name, False)
        for attr, value in attrs.items():
            setattr(mod, attr, value)


def _import_file(path: Path, module_name: str) -> types.ModuleType:
    """Import one of SGLang's files as `module_name`; FileNotFoundError / ImportError saying how to fix it."""
    if not path.is_file():
        raise FileNotFoundError(f"SGLang peer file {path} not found: {HOW}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod  # Triton's JIT and dataclasses look their module up by name
    try:
        spec.loader.exec_module(mod)
    except Exception as err:
        del sys.modules[module_name]
        raise ImportError(f"SGLang peer file {path} did not import through the stubs of bench/peers_sgl.py "
                          f"({type(err).__name__}: {err}); {HOW}") from err
    return mod


@functools.cache
def _load(folder: str, which: str) -> types.ModuleType:
    root = Path(folder).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"SGLang peer folder {root} not found: {HOW}")
    install_stubs()
    name = "sglang.kernels.ops.attention.score_mod"
    if which == "decode" and name not in sys.modules and getattr(sys.modules["sglang"], "__nanomoe_stub__", False):
        # decode_attention imports the real score_mod file (Triton only) through its package name
        _module(name.rpartition(".")[0], True).score_mod = _import_file(root / FILES["score_mod"], name)
    return _import_file(root / FILES[which], f"nanomoe_peer_sgl_{which}")


def load_sgl_moe(folder: str = DEFAULT_FOLDER) -> types.ModuleType:
    """SGLang's fused_moe_triton_kernels.py as a module (invoke_fused_moe_kernel, act_and_mul_triton,
    moe_sum_reduce_triton, ...); loaded once per folder."""
    return _load(str(folder), "moe")


def load_sgl_decode(folder: str = DEFAULT_FOLDER) -> types.ModuleType:
    """SGLang's decode_attention.py (MLA / grouped decode attention) as a module; loaded once per folder."""
    return _load(str(folder), "decode")


def sgl_default_config(tokens: int, E: int) -> dict:
    """The tile SGLang falls back to for unquantised weights without a tuned table (its
    fused_moe_triton_config.get_default_config: a small tile when tokens <= E, else 64x64x32)."""
    if tokens <= E:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}


def sgl_tuned_config(tokens: int, E: int, top_k: int) -> dict:
    """A tile by rows per expert (tokens * top_k / E) in the style of the bf16 H200 tables SGLang ships for
    other shapes (e.g. E=8,N=7168: 16-row tiles when decoding, 128x256x64 with 8 warps from ~128 rows);
    not tuned for these shapes here."""
    rows = tokens * top_k / max(E, 1)
    if rows <= 8:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4,
                "num_stages": 4}
    if rows <= 24:
        return {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 8,
                "num_stages": 4}
    if rows <= 96:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 8,
                "num_stages": 4}
    return {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8,
            "num_stages": 4}


def sgl_align(topk_ids: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGLang's moe-align layout, computed in torch: (sorted_token_ids [R_max] int32: flat (token, k) pair
    ids grouped by expert, each expert padded to a multiple of block_m with T*k (masked by the kernel),
    expert_ids [R_max / block_m] int32 (-1 past the used blocks), num_tokens_post_padded [1] int32).
    R_max is SGLang's buffer bound, T*k + E * (block_m - 1) (at most T*k*block_m)."""
    flat = topk_ids.reshape(-1).long()
    N, dev = flat.numel(), flat.device
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    r_max = N + E * (block_m - 1)
    r_max = -(-min(r_max, max(N, 1) * block_m) // block_m) * block_m
    order = torch.sort(flat, stable=True).indices
    starts = torch.cumsum(padded, 0) - padded
    e_sorted = flat[order]
    rank = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    sorted_ids = torch.full((r_max,), N, dtype=torch.int32, device=dev)
    sorted_ids[starts[e_sorted] + rank] = order.to(torch.int32)
    blocks = torch.repeat_interleave(torch.arange(E, device=dev), padded // block_m)
    expert_ids = torch.full((r_max // block_m,), -1, dtype=torch.int32, device=dev)
    expert_ids[:blocks.numel()] = blocks.to(torch.int32)
    return sorted_ids, expert_ids, padded.sum().reshape(1).to(torch.int32)


def sgl_fused_moe_call(mod: types.ModuleType, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_ids: torch.Tensor, topk_weights: torch.Tensor, config: dict,
                       align: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * SwiGLU expert_{topk_ids[t, j]}(x[t]) for x [T, H] -> [T, H] through SGLang's
    Triton kernels (w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]); `align` = sgl_align(topk_ids, E,
    config["BLOCK_SIZE_M"]), computed here when None. topk_weights: float32 [T, k], contiguous."""
    import triton.language as tl

    T, H = x.shape
    k, E, I2 = topk_ids.shape[1], w13.shape[0], w13.shape[1]
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous():
        raise ValueError(f"topk_weights must be contiguous float32 [T, k], got {topk_weights.dtype}")
    sorted_ids, expert_ids, post = align if align is not None else sgl_align(topk_ids, E, config["BLOCK_SIZE_M"])
    compute = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[x.dtype]
    plain = dict(use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                 per_channel_quant=False, block_shape=None)
    up = x.new_empty((T * k, I2))
    mod.invoke_fused_moe_kernel(x, w13, None, up, None, None, None, topk_weights, topk_ids, sorted_ids, expert_ids,
                                post, False, k, config, compute_type=compute, **plain)
    act = x.new_empty((T * k, I2 // 2))
    mod.act_and_mul_triton(up, act, config)
    down = x.new_empty((T, k, H))
    mod.invoke_fused_moe_kernel(act, w2, None, down, None, None, None, topk_weights, topk_ids, sorted_ids,
                                expert_ids, post, True, 1, config, compute_type=compute, **plain)
    out = x.new_empty((T, H))
    mod.moe_sum_reduce_triton(down, out, 1.0)
    return out
