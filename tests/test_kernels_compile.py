"""The nvlink comm's and other Triton kernels compile for Hopper (sm_90) on a CPU-only machine.

The interpreter runs the data kernels' logic on the CPU (tests/test_nvlink_kernels.py) but checks no
types, and the synchronising kernels (atomics with memory scopes, %globaltimer) cannot run there at all.
Compiling each kernel to sm_90 machine code here (Triton's front end, its GPU passes and ptxas, all in
the triton wheel) catches what only the GPU compiler would see: loop-carried variables changing type,
unsupported atomics, inline assembly. Every kernel is compiled for each pointer dtype it is called with.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import triton


def _compile(fn, types: dict, consts: dict) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))


def _cases() -> list:
    from nanomoe_kernels import ep_nvlink as k
    from nanomoe_kernels import ep_nvlink_sync as sy

    put = dict(x_ptr="*bf16", w_ptr="*fp32", has_ptr="*i32", ctr_ptr="*i32", epoch_ptr="*i64", err_addr="i64",
               tok_ptr="*bf16", tok_delta="*i64", meta_ptr="*i32", meta_delta="*i64", wb_ptr="*fp32", wb_delta="*i64")
    cases = [(f"put_tokens[phys {ids}, own {own}]", k._put_kernel, {**put, "phys_ptr": ids},
              dict(K=8, KP=8, OWN_ROWS=own, BLOCK=1024)) for ids in ("*i32", "*i64") for own in (False, True)]
    expand = dict(x_ptr="*bf16", tok_ptr="*bf16", meta_ptr="*i32", cnt_ptr="*i64", base_ptr="*i64", rows_ptr="*i32",
                  counts_ptr="*i64", out_ptr="*bf16")
    cases += [("expand[masked]", k._expand_kernel, expand, dict(K=8, KP=8, MASKED=True, PLB=128, BLOCK=1024)),
              ("expand[gathered]", k._expand_kernel, {**expand, "out_ptr": "*i32"},
               dict(K=8, KP=8, MASKED=False, PLB=128, BLOCK=1024))]
    cases += [
        ("combine", k._combine_kernel, dict(y_ptr="*bf16", rows_ptr="*i32", wb_ptr="*fp32", cnt_ptr="*i64",
                                            comb_ptr="*bf16", comb_delta="*i64"), dict(K=8, KP=8, BLOCK=1024)),
        ("sum_partials", k._sum_partials_kernel, dict(comb_ptr="*fp16", has_ptr="*i32", out_ptr="*fp16"),
         dict(BLOCK=1024)),
    ]
    sig = dict(flag_ptr="*i64", flag_delta="*i64", epoch_ptr="*i64", err_addr="i64", ctr_ptr="*i32", cnt_ptr="*i64",
               cnt_delta="*i64", timeout_ns="i64")
    cases += [(f"signal_wait[counts {c}]", sy._signal_wait_kernel, sig, dict(STAGE=2, COUNTS=c, PLB=128))
              for c in (True, False)]
    cases += [("count_layout", sy._layout_kernel, dict(cnt_ptr="*i64", counts_ptr="*i64", base_ptr="*i64",
                                                       m_addr="i64"), dict(WB=2, PLB=128, STORE_M=True))]
    from nanomoe_kernels import router_gemm as rg

    cases += [("bf16_parts", rg._bf16_parts_kernel, dict(w_ptr="*fp32", out_ptr="*i16"), dict(BLOCK=1024))]
    return cases + _rows_cases() + _fused_moe_cases() + _fp8_cases() + _mla_cases()


def _rows_cases() -> list:
    """The `torch` comm's token-row kernels (kernels/ep_rows.py)."""
    from nanomoe_kernels import ep_rows as r

    pack = dict(x_ptr="*bf16", phys_ptr="*i32", w_ptr="*fp32", tab_ptr="*i64", pos_ptr="*i64", rows_ptr="*bf16")
    unpack = dict(recv_ptr="*bf16", tab_ptr="*i64", counts_ptr="*i64", index_ptr="*i32", xe_ptr="*bf16",
                  prow_ptr="*i32", pw_ptr="*fp32", err_addr="i64")
    return [("rows.pack", r._pack_kernel, pack, dict(K=8, KP=8, BLOCK=1024)),
            ("rows.pack[blocks]", r._pack_kernel, pack, dict(R0=1, K=8, KP=8, BLOCK=1024)),
            *[(f"rows.unpack[fixed {fixed}]", r._unpack_kernel, unpack,
               dict(R0=int(fixed), K=8, KP=8, WB=2, PLB=128, FIXED=fixed, BLOCK=1024)) for fixed in (False, True)],
            ("rows.partial", r._partial_kernel, dict(y_ptr="*bf16", prow_ptr="*i32", pw_ptr="*fp32", out_ptr="*bf16"),
             dict(K=8, KP=8, BLOCK=1024)),
            *[(f"rows.sum_home[fixed {fixed}]", r._sum_home_kernel, dict(home_ptr="*bf16", tab_ptr="*i64",
                                                                         pos_ptr="*i64", out_ptr="*bf16"),
               dict(R0=int(fixed), FIXED=fixed, BLOCK=1024)) for fixed in (False, True)]]


def _fused_moe_cases() -> list:
    """The grouped GEMM's A_INDEX variants (a gathered batch's first GEMM: SwiGLU up, and linear)."""
    from nanomoe_kernels import fused_moe_kernel as f

    types = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", sorted_ids_ptr="*i32", block_rows_ptr="*i32",
                 block_experts_ptr="*i32", used_ptr="*i32", expert_first_ptr="*i32", expert_blocks_ptr="*i32")
    common = dict(b_desc=None, a_desc=None, a_tail_desc=None, w_ptr=None, A_DIV=1, GATHER_A=True, A_INDEX=True,
                  USE_TMA=False, A_TMA=False, EVEN_K=True, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    # MERGED: 128-row main tiles and 64-row tail tiles in one kernel (two dot shapes behind a branch), with program
    # groups of one expert (EXPERT_GROUP > 0) or GROUP_M blocks (0), and tail programs of two column tiles (PAIR_TAILS)
    return [(f"moe_gemm[{name}, a_index {ids}]", f._moe_gemm_kernel, {**types, "a_index_ptr": ids},
             {**common, "SCATTER_C": not swiglu, "SWIGLU": swiglu, "MUL_WEIGHT": False, "BLOCK_TABLE": table,
              "MERGED": merged, "TAIL_M": 64, "BLOCK_M": 128 if merged else 64, "EXPERT_GROUP": group,
              "PAIR_TAILS": pair})
            for name, swiglu, table, merged, group, pair in (
                ("up", True, True, False, 0, False), ("linear", False, False, False, 0, False),
                ("up merged", True, True, True, 13, False), ("up merged, groups off", True, True, True, 0, False),
                ("up merged, paired tails", True, True, True, 13, True),
                ("linear merged, paired tails", False, True, True, 0, True))
            for ids in ("*i32", "*i64")]


def _fp8_cases() -> list:
    """The FP8 grouped GEMM: the up GEMM (gathered A, SwiGLU, quantised output) and the down GEMM (weighted,
    scattered), with weights by pointer and through TMA (with two-term A, the swapped MMA and block-layout
    weights), merged tails."""
    from nanomoe_kernels import fused_moe_fp8_kernel as f

    types = dict(a_ptr="*fp8e4nv", as_ptr="*fp32", b_ptr="*fp8e4nv", bs_ptr="*fp32", c_ptr="*fp8e4nv",
                 cs_ptr="*fp32", w_ptr="*fp32", sorted_ids_ptr="*i32", block_rows_ptr="*i32",
                 block_experts_ptr="*i32", used_ptr="*i32", a_index_ptr="*i32")
    out = []
    for tma in (False, True):
        desc = {"b_desc": "tensordesc<fp8e4nv[128, 128]>"} if tma else {}
        common = dict(USE_TMA=tma, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, TAIL_M=16, A_INDEX=False, A_DIV=8,
                      K_STEPS=2 if tma else 1, A_FP8=True, A_TERMS=2 if tma else 1, SWAP_AB=tma,
                      W_TILES=tma)
        if not tma:
            common["b_desc"] = None
        out += [(f"moe_gemm_fp8[up, tma {tma}]", f._moe_gemm_fp8_kernel, {**types, **desc},
                 {**common, "GATHER_A": True, "SCATTER_C": False, "SWIGLU": True, "MUL_WEIGHT": False,
                  "QUANT_OUT": True, "BLOCK_TABLE": True, "MERGED": True, "BLOCK_M": 64}),
                (f"moe_gemm_fp8[down, tma {tma}]", f._moe_gemm_fp8_kernel, {**types, **desc, "c_ptr": "*bf16"},
                 {**common, "GATHER_A": False, "SCATTER_C": True, "SWIGLU": False, "MUL_WEIGHT": True,
                  "QUANT_OUT": False, "BLOCK_TABLE": False, "MERGED": False, "BLOCK_M": 16})]
    # W8A16: bf16 A, each fp8 weight tile dequantised to bf16 (BLOCK_N 128: a scalar scale, 256: per column)
    for bn in (128, 256):
        out.append((f"moe_gemm_fp8[w8a16 up, BN {bn}]", f._moe_gemm_fp8_kernel,
                    {**types, "a_ptr": "*bf16", "c_ptr": "*bf16", "b_desc": f"tensordesc<fp8e4nv[{bn}, 128]>"},
                    dict(USE_TMA=True, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, TAIL_M=16, A_INDEX=False, A_DIV=8,
                         K_STEPS=2, A_FP8=False, A_TERMS=1, SWAP_AB=False, W_TILES=False, GATHER_A=True,
                         SCATTER_C=False, SWIGLU=True, MUL_WEIGHT=False, QUANT_OUT=False, BLOCK_TABLE=True,
                         MERGED=True, BLOCK_M=64)))
    return out


def _mla_cases() -> list:
    """The key-major MLA decode stage 1: TMA tiles of a paged cache (V3 dims) and plain loads."""
    from nanomoe_kernels import mla_decode_keymajor as m

    types = dict(q_ptr="*bf16", kv_ptr="*bf16", bt_ptr="*i32", len_ptr="*i32", o_ptr="*fp32", lse_ptr="*fp32",
                 scale_log2="fp32", lat_desc="tensordesc<bf16[64, 256]>", pe_desc="tensordesc<bf16[64, 64]>")
    dims = dict(C=512, DR=64, PAGE=64, PAGED=True, PAGE_TILE=True, FINAL=False, BLOCK_N=64, BLOCK_V=256, BLOCK_R=64)
    plain = {k: v for k, v in types.items() if not k.endswith("_desc")}
    return [("mla_decode_km[tma]", m._mla_decode_partial_km, types, dict(dims, TMA=True, BLOCK_H=32)),
            ("mla_decode_km[plain]", m._mla_decode_partial_km, plain,
             dict(dims, TMA=False, BLOCK_H=16, lat_desc=None, pe_desc=None))]


def _gluon_mla_cases() -> list:
    """The Gluon MLA decode stage 1 (kernels/mla_decode_wgmma*.py) at V3 dims: plain and warp-specialised, paged
    and contiguous; signatures taken from real host descriptors over CPU tensors."""
    import torch
    from nanomoe_kernels import mla_decode_wgmma as wg
    from nanomoe_kernels import mla_decode_wgmma_ws as ws

    if wg.gluon is None or not ws.supported_triton():   # no Gluon here: nothing of these kernels can build
        return []
    q, kv = torch.zeros(2, 128, 576, dtype=torch.bfloat16), torch.zeros(64, 64, 576, dtype=torch.bfloat16)
    bt, lens, part = torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), torch.zeros(1)
    descs = list(wg.descriptors(q, kv, 512))
    tail = [1] * 6 + [1, 128, 4, 4096, 0.5]
    out = []
    for paged in (True, False):
        page = dict(PAGE=64 if paged else 1, PAGED=paged, FINAL=False)
        out += [(f"mla_decode_wgmma[paged {paged}]", wg._mla_decode_partial_wgmma,
                 descs + [kv, bt, lens, part, part] + [1] * 2 + tail, dict(page, C=512, DR=64, num_warps=8), {}),
                (f"mla_decode_wgmma_ws[paged {paged}]", ws._mla_decode_partial_ws,
                 descs + [bt, lens, part, part] + tail + [part, part, 3],   # order 3: both prologue waits
                 dict(page, num_warps=4, TRIGGER=not paged),
                 {"maxnreg": 168})]   # TRIGGER: the PDL trigger's inline asm
    trace = torch.zeros(64, dtype=torch.int64)   # an int64 trace: the %globaltimer / %clock64 / %smid stamps
    out.append(("mla_decode_wgmma_ws[trace]", ws._mla_decode_partial_ws,
                descs + [bt, lens, part, part] + tail + [trace, part, 0],
                dict(PAGE=64, PAGED=True, FINAL=False, num_warps=4, TRIGGER=False),
                {"maxnreg": 168}))
    for dtype, el in ((torch.float32, wg.gl.float32), (torch.bfloat16, wg.gl.bfloat16)):   # partials by TMA store
        flat = torch.zeros(256, 4 * 512, dtype=dtype)
        po = wg.GluonDescriptor(flat, list(flat.shape), [flat.stride(0), 1], [64, 256],
                                wg.gl.NVMMASharedLayout.get_default_for([64, 256], el))
        out.append((f"mla_decode_wgmma_ws[store_tma {dtype}]", ws._mla_decode_partial_ws,
                    descs + [bt, lens, flat, part] + tail + [part, po, 1],
                    dict(PAGE=64, PAGED=True, FINAL=False, num_warps=4, TRIGGER=False),
                    {"maxnreg": 168}))
    return out


def _gluon_moe_cases() -> list:
    """The Gluon wgmma expert GEMM (kernels/fused_moe_wgmma.py) at V3 dims: the up GEMM (SwiGLU) on gathered rows
    (cp.async) and on aligned rows (TMA, staged epilogue), and the down GEMM (top-k weights, scattered rows) with
    both epilogues; then carried tails (TAIL_N, kernels/fused_moe_wgmma_tail.py) on each load path and B tile
    width; pointers and strides 16-byte divisible, as the launcher specialises them."""
    import torch
    from nanomoe_kernels import fused_moe_wgmma as m

    if not m.supported_triton():
        return []
    out = []
    for swiglu, gather, K, NW, stage, tail, rows, stages in (
            (True, True, 7168, 4096, False, 0, 128, 4), (True, False, 7168, 4096, True, 0, 128, 4),
            (False, False, 2048, 7168, False, 0, 256, 4), (False, False, 2048, 7168, True, 0, 256, 4),
            (True, True, 7168, 4096, False, 32, 128, 4), (True, True, 7168, 4096, False, 16, 128, 4),
            (True, False, 7168, 4096, False, 16, 128, 4),
            (False, False, 2048, 7168, True, 32, 256, 3), (False, False, 2048, 7168, False, 16, 128, 4)):
        a, w = torch.zeros(256, K, dtype=torch.bfloat16), torch.zeros(2 * NW, K, dtype=torch.bfloat16)
        descs = [m.GluonDescriptor(a, [256, K], [K, 1], [m.BH, m.BK], m._smem_layout(m.BH, a.dtype)),
                 m.GluonDescriptor(w, [2 * NW, K], [K, 1], [rows, m.BK], m._smem_layout(rows, a.dtype)),
                 m.GluonDescriptor(a, [256, K], [K, 1], [tail, m.BK], m._smem_layout(tail, a.dtype)) if tail else None]
        i32, f32 = torch.zeros(4, dtype=torch.int32), torch.zeros(4)
        args = descs + [a, None, a, None if swiglu else f32, i32, i32, i32, i32, i32, i32, i32,
                        5, NW // 2 if swiglu else NW, K, NW, 5, K, 64]
        consts = dict(GATHER_A=gather, A_DIV=8 if gather else 1, A_INDEX=False, SWIGLU=swiglu, MUL_WEIGHT=not swiglu,
                      SCATTER_C=not swiglu, GROUP_M=8, EXPERT_GROUP=13 if swiglu else 0, STAGE_C=stage, CS_N=128,
                      CS_LAYOUT=m._smem_layout(m.BH, a.dtype, 128), TAIL_N=tail, STAGES=stages, num_warps=4)
        aligned = ("a_ptr", "c_ptr", "N", "K", "NW", "stride_am", "stride_cm")
        out.append((f"fused_moe_wgmma[swiglu {swiglu}, gather {gather}, staged {stage}, tail {tail}, BN {rows}]",
                    m._moe_gemm_ws, args, consts, {"maxnreg": 168}, aligned))
    return out


def _compile_gluon(fn, args: list, consts: dict, options: dict, aligned: tuple = ()) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    names = fn.arg_names
    signature = {n: mangle_type(a) for n, a in zip(names, args)} | {k: "constexpr" for k in consts}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()}, attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": consts["num_warps"], **options})


def compile_all() -> list[str]:
    """Compile every case; the failures as 'name: error' lines. Needs the real compiler (no interpreter)."""
    failures = []
    for name, fn, types, consts in _cases():
        try:
            _compile(fn, types, consts)
        except Exception as err:  # noqa: BLE001 - every failing kernel is reported, not just the first
            failures.append(f"{name}: {type(err).__name__}: {err}")
    for name, fn, args, consts, options, *aligned in _gluon_mla_cases() + _gluon_moe_cases():
        try:
            _compile_gluon(fn, args, consts, options, *aligned)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{name}: {type(err).__name__}: {err}")
    return failures


def test_nvlink_kernels_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton build has no CUDA backend: {err}")
    # the conftest turns on the interpreter, which replaces @triton.jit functions: compile in a fresh process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.test_kernels_compile"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "compiled" in proc.stdout, proc.stdout


if __name__ == "__main__":
    bad = compile_all()
    n = len(_cases()) + len(_gluon_mla_cases()) + len(_gluon_moe_cases())
    print("\n".join(bad) if bad else f"compiled {n} kernels for sm_90")
    sys.exit(1 if bad else 0)
