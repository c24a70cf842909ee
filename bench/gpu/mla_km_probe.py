"""Which key-major MLA decode configurations compute the right answer on this GPU, each in its own process
(an illegal address poisons the CUDA context of the process that hit it, so one config cannot spoil another).

    python bench/gpu/mla_km_probe.py --out $OUT/km_probe.json      # driver: every case, 4 processes a GPU
    python bench/gpu/mla_km_probe.py --case JSON                   # one case (what the driver spawns)

A case: heads, tuning fields, paged, tails (row lengths with ragged last tiles and a length-0 row, or whole
tiles only) and a kernel variant: `as_is` (kernels/mla_decode_keymajor.py) or `vt_load` (the same source
with the value operand of register-staged tiles loaded already transposed instead of through tl.trans).
Prints one JSON line: the relative error against float64 torch, or the error message.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

VT_OLD = "        k_pe = tl.load(k_row + C + offs_r[None, :], mask=row_ok & (offs_r[None, :] < DR), other=0.0)\n"
VT_NEW = VT_OLD + """        k_col = kv_ptr + base[None, :]
        v0 = tl.load(k_col + offs_v[:, None], mask=row_ok.reshape(1, BLOCK_N) & (offs_v[:, None] < C), other=0.0)
        v1 = tl.load(k_col + BLOCK_V + offs_v[:, None],
                     mask=row_ok.reshape(1, BLOCK_N) & (BLOCK_V + offs_v[:, None] < C), other=0.0)
"""


def variant_module(name: str):
    """kernels/mla_decode_keymajor.py, or its vt_load rewrite, as a module with its own @triton.jit kernels."""
    import nanomoe_kernels.mla_decode_keymajor as km

    if name == "as_is":
        return km
    src = open(km.__file__).read()
    assert VT_OLD in src
    src = src.replace(VT_OLD, VT_NEW)
    src = src.replace("    if TMA and not MASKED:\n", "    v0 = tl.zeros([BLOCK_V, BLOCK_N], tl.float32)\n"
                      "    v1 = v0\n    if TMA and not MASKED:\n", 1)
    src = src.replace("        k_pe = pe_desc.load([row0, 0])\n", "        k_pe = pe_desc.load([row0, 0])\n"
                      "        v0 = tl.trans(k0)\n        v1 = tl.trans(k1)\n", 1)
    src = src.replace("acc0 = tl.dot(tl.trans(k0), p,", "acc0 = tl.dot(v0.to(k0.dtype), p,")
    src = src.replace("acc1 = tl.dot(tl.trans(k1), p,", "acc1 = tl.dot(v1.to(k1.dtype), p,")
    path = os.path.join(tempfile.mkdtemp(), "km_vt_load.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("km_vt_load", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_case(case: dict) -> dict:
    """Decode B = 4 rows at V3 dims with the case's kernel; the relative error against float64."""
    import nanomoe_kernels.mla_decode as dec
    import torch
    from nanomoe_kernels.mla_decode import DecodeTuning, mla_decode

    dec._mla_decode_partial_km = variant_module(case["variant"])._mla_decode_partial_km
    g = torch.Generator(device="cuda").manual_seed(case["heads"])
    B, L, C, DR = 4, 4096, 512, 64
    kv = torch.randn(B, L, C + DR, device="cuda", generator=g).bfloat16()
    q = torch.randn(B, case["heads"], C + DR, device="cuda", generator=g).bfloat16()
    ctx = torch.tensor([0, 63, 1000, 4096] if case["tails"] else [64, 1024, 4096, 2048], dtype=torch.int32,
                       device="cuda")
    cache, table = kv, None
    if case["paged"]:
        perm = torch.randperm(B * L // 64, device="cuda", generator=g)
        cache = torch.empty(B * L // 64, 64, C + DR, device="cuda", dtype=kv.dtype)
        cache[perm] = kv.reshape(-1, 64, C + DR)
        table = perm.reshape(B, L // 64).int()
    s = torch.einsum("bnd,bld->bnl", q.double(), kv.double()) * 0.1352
    seen = torch.arange(L, device="cuda")[None, None, :] < ctx[:, None, None]
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    want = torch.einsum("bnl,blc->bnc", p, kv[..., :C].double())
    out = {}
    for splits in (1, 7):
        o = mla_decode(q, cache, ctx, C, 0.1352, block_table=table, num_splits=splits,
                       tuning=DecodeTuning(**case["tuning"]))
        torch.cuda.synchronize()
        out[f"rel_err_k{splits}"] = float((o.double() - want).norm() / want.norm())
    return out


CONFIGS = {   # name -> (heads, tuning)
    "bh16_bn64_s2_tma": (16, dict(block_h=16, block_n=64, num_warps=4, num_stages=2, tma=True, key_major=True)),
    "bh16_bn64_s1_tma": (16, dict(block_h=16, block_n=64, num_warps=4, num_stages=1, tma=True, key_major=True)),
    "bh16_bn64_s3_plain": (16, dict(block_h=16, block_n=64, num_warps=4, num_stages=3, key_major=True)),
    "bh16_bn32_s3_plain": (16, dict(block_h=16, block_n=32, num_warps=4, num_stages=3, key_major=True)),
    "bh32_bn64_s2_tma_h16": (16, dict(block_h=32, block_n=64, num_warps=4, num_stages=2, tma=True, key_major=True)),
    "bh32_bn64_s2_tma": (128, dict(block_h=32, block_n=64, num_warps=4, num_stages=2, tma=True, key_major=True)),
    "bh32_bn64_s2_plain": (128, dict(block_h=32, block_n=64, num_warps=4, num_stages=2, key_major=True)),
    "old_default_128": (128, dict(block_h=64, block_n=64, value_splits=2, num_warps=4, num_stages=2, tma=True)),
}


def driver(out: str, timeout: int) -> None:
    """Every config x variant x paged x tails, 4 processes per GPU; results to out as they come."""
    import torch

    gpus = max(1, torch.cuda.device_count())
    cases = [dict(name=n, heads=CONFIGS[n][0], tuning=CONFIGS[n][1], variant=v, paged=pg, tails=t)
             for n, v, pg, t in itertools.product(CONFIGS, ("as_is", "vt_load"), (True, False), (False, True))
             if not (v == "vt_load" and n.startswith("old"))]
    results = []

    def one(i_case):
        i, case = i_case
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i % gpus), CUDA_LAUNCH_BLOCKING="1")
        try:
            p = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], env=env, capture_output=True,
                               text=True, timeout=timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"error": (p.stderr or p.stdout)[-400:]}
        except subprocess.TimeoutExpired:
            res = {"error": f"timeout {timeout} s"}
        res.update(case)
        results.append(res)
        print(json.dumps(res), flush=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=1)

    with ThreadPoolExecutor(4 * gpus) as pool:
        list(pool.map(one, enumerate(cases)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case")
    ap.add_argument("--out", default="km_probe.json")
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args()
    if args.case:
        case = json.loads(args.case)
        try:
            print(json.dumps(run_case(case)))
        except Exception as e:  # noqa: BLE001 (the message is the result)
            print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"}))
    else:
        driver(args.out, args.timeout)


if __name__ == "__main__":
    main()
