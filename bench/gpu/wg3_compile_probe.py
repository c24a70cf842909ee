import sys, subprocess, os, re
sys.path.insert(0, "/tmp/nanomoe_names"); sys.path.insert(0, "/work/main")
import torch, triton
from tests.test_kernels_compile import _compile_gluon
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from nanomoe_kernels import moe_gemm_wg3 as m
from nanomoe_kernels import fused_moe_wgmma as f

def comp(fn, args, consts, options, aligned):
    names = fn.arg_names
    signature = {n: mangle_type(a) for n, a in zip(names, args)} | {k: "constexpr" for k in consts}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": consts["num_warps"], **options})

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
which = sys.argv[1:] or ["wg3"]
for swiglu, gather, K, NW, bn in ((True, True, 7168, 4096, 128), (True, False, 7168, 4096, 128), (False, False, 2048, 7168, 256), (False, False, 2048, 7168, 128)):
    a, w = torch.zeros(256, K, dtype=torch.bfloat16), torch.zeros(2 * NW, K, dtype=torch.bfloat16)
    rows = 2 * bn if swiglu else bn
    descs = [f.GluonDescriptor(a, [256, K], [K, 1], [f.BH, f.BK], f._smem_layout(f.BH, a.dtype)),
             f.GluonDescriptor(w, [2 * NW, K], [K, 1], [bn, f.BK], f._smem_layout(bn, a.dtype))]
    i32, f32 = torch.zeros(4, dtype=torch.int32), torch.zeros(4)
    args = descs + [a, None, a, None if swiglu else f32, i32, i32, i32, i32, i32, i32,
                    5, NW // 2 if swiglu else NW, K, NW, 5, K, 64]
    regs = m.registers(gather) if len(sys.argv) < 3 else tuple(int(x) for x in sys.argv[2].split(","))
    for stages in (4, 3):
        consts = dict(GATHER_A=gather, A_DIV=8 if gather else 1, A_INDEX=False, SWIGLU=swiglu, MUL_WEIGHT=not swiglu,
                      SCATTER_C=not swiglu, GROUP_M=8, EXPERT_GROUP=13, STAGES=stages, LOADER_REGS=regs[1], CONSUMER_REGS=regs[2], num_warps=4)
        aligned = ("a_ptr", "c_ptr", "N", "K", "NW", "stride_am", "stride_cm")
        try:
            k = comp(m._moe_gemm_wg3, args, consts, ({"maxnreg": regs[0]} if regs[0] else {}), aligned)
        except Exception as e:
            print("FAIL", swiglu, gather, bn, stages, str(e)[-800:]); continue
        open("/tmp/wg3.ptx", "w").write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", "/tmp/wg3.ptx", "-o", "/tmp/wg3.cubin"], capture_output=True, text=True)
        info = [l for l in out.stderr.splitlines() if "registers" in l or "spill" in l]
        smem = k.metadata.shared
        print(swiglu, gather, bn, stages, "smem", smem, info, out.returncode, out.stderr[-300:] if out.returncode else "")
