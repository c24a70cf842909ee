"""Tune the block-scaled FP8 fused-MoE configs (kernels/fused_moe_fp8*.py) on this GPU; writes kernels/tuned.

    python bench/tune_fused_moe_fp8.py --experts 32 --tokens 64 256 1024 4096      # DeepSeek-V3 dims

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, M = T*k rows (the table key),
R aligned rows, HG = H / 128, IG = I / 128.

As bench/tune_fused_moe.py for the bf16 kernel: each GEMM ("up": gate/up with SwiGLU and the fp8
output, "down": weighted and scattered) is timed alone over a candidate space around the kernel's
limits (BLOCK_K = 128, the up GEMM's BLOCK_N = 128; fp8 tiles are half the bytes of bf16 ones, and the
up GEMM holds four float32 tiles: two accumulators and two per-step partials), then the four fastest of
each are timed together through kernels.fused_moe_fp8.fp8_ffn_aligned, checked against the default
configs' output, and the best pair is merged into the tables (dtype float8_e4m3fn in the file name).
`--w8a16` tunes the W8A16 kernels (tables *_w8a16), `--hilo` the two-term activations (act_terms=2,
tables *_hilo), `--tiles` (with or without --hilo) the weights in the block layout (tables *_tiles).
`--compile-only` compiles every candidate in parallel worker processes first; `--check cpu` (under
TRITON_INTERPRET=1) runs every candidate on a small case and checks that pairs agree (tests/test_tune_fp8.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from nanomoe_kernels.fp8_quant import quant_fp8_blocks  # noqa: E402
from nanomoe_kernels.fused_moe import _device_name  # noqa: E402
from nanomoe_kernels.fused_moe_fp8 import FP8, default_config_fp8, fp8_ffn_aligned, quant_rows  # noqa: E402
from nanomoe_kernels.fused_moe_fp8_kernel import check_fp8_config, is_tiled, moe_gemm_fp8, tile_weights  # noqa: E402
from nanomoe_kernels.fused_moe_w8a16 import w8a16_ffn_aligned  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.tune_fused_moe import time_us, write_tables  # noqa: E402


def _cfg(bm, bn, warps, stages, group=8, tma=False, split=0, merge=False, steps=1, swap=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=group, num_warps=warps, num_stages=stages,
                USE_TMA=tma, SPLIT_M=split, MERGE_TAIL=merge, K_STEPS=steps, SWAP_AB=swap)


SMALL, LARGE = (0, 96), (48, 1 << 30)
# (rows-per-expert range, (BM, BN, warps, stages[, GROUP_M, TMA, SPLIT_M, MERGE_TAIL]))
_UP = [(SMALL, c) for c in [(16, 128, 4, 4), (16, 128, 4, 5), (16, 128, 4, 4, 8, True), (16, 128, 4, 5, 8, True),
                            (32, 128, 4, 4), (32, 128, 4, 4, 8, True), (32, 128, 8, 4, 8, True),
                            (64, 128, 4, 4, 8, True), (16, 128, 8, 6, 8, True), (16, 128, 4, 6, 8, True),
                            (32, 128, 4, 5), (32, 128, 4, 5, 8, True), (32, 128, 4, 6, 8, True)]] + \
      [(LARGE, c) for c in [(64, 128, 8, 3), (64, 128, 8, 4), (64, 128, 8, 4, 8, True), (64, 128, 8, 3, 16, True),
                            (128, 128, 8, 3, 8, True, 64), (128, 128, 8, 3, 8, True, 64, True),
                            (64, 128, 4, 4, 8, True), (128, 128, 8, 4, 8, True, 64, True)]]
_DOWN = [(SMALL, c) for c in [(16, 128, 4, 4), (16, 128, 4, 4, 8, True), (16, 256, 8, 4, 8, True),
                              (32, 128, 4, 4, 8, True), (32, 256, 8, 4, 8, True), (16, 64, 4, 5, 8, True),
                              (32, 64, 4, 5, 8, True), (64, 128, 4, 4, 8, True), (16, 128, 4, 6, 8, True),
                              (32, 128, 4, 6, 8, True), (64, 128, 4, 5, 8, True), (32, 128, 8, 4, 8, True),
                              (16, 256, 4, 4, 8, True)]] + \
        [(LARGE, c) for c in [(128, 128, 8, 3), (128, 128, 8, 4, 8, True), (128, 128, 8, 3, 16, True),
                              (64, 256, 8, 3, 8, True), (64, 256, 8, 4, 8, True), (128, 256, 8, 3, 8, True),
                              (128, 128, 8, 4, 8, True, 64, True), (128, 128, 4, 4, 8, True)]]
# two scale groups per K iteration (K_STEPS=2): the decode sizes' best tiles again, with fewer stages (each
# stage holds twice the bytes)
_UP += [(SMALL, c) for c in [(16, 128, 4, 3, 8, True, 0, False, 2), (32, 128, 4, 3, 8, True, 0, False, 2),
                             (32, 128, 4, 2, 8, False, 0, False, 2), (16, 128, 4, 2, 8, True, 0, False, 2),
                             (32, 128, 8, 3, 8, True, 0, False, 2)]]
_UP += [(LARGE, (64, 128, 8, 2, 8, True, 0, False, 2))]
_DOWN += [(SMALL, c) for c in [(16, 128, 4, 3, 8, True, 0, False, 2), (32, 128, 4, 3, 8, True, 0, False, 2),
                               (64, 128, 4, 3, 8, True, 0, False, 2), (32, 128, 4, 2, 8, False, 0, False, 2)]]
_DOWN += [(LARGE, (128, 128, 8, 2, 8, True, 0, False, 2))]
# the swapped MMA (SWAP_AB: weight rows on wgmma's M side, token rows on N) for the decode sizes, whose 16-32
# row tiles are below wgmma's 64 rows; and down tiles of 256 columns with two scale groups per iteration
def _tma(bm, bn, warps, stages, steps=1, swap=True):
    return (bm, bn, warps, stages, 8, True, 0, False, steps, swap)


_UP += [(SMALL, _tma(*c)) for c in [(16, 128, 4, 4), (32, 128, 4, 4), (32, 128, 4, 6), (16, 128, 4, 3, 2),
                                    (32, 128, 4, 3, 2), (32, 128, 8, 3, 2), (64, 128, 4, 4), (32, 128, 4, 3),
                                    (16, 128, 4, 3), (32, 128, 4, 2, 2), (16, 128, 4, 2, 2), (32, 128, 8, 4)]]
_DOWN += [(SMALL, _tma(*c)) for c in [(16, 128, 4, 4), (32, 128, 4, 4), (32, 256, 8, 4), (16, 256, 8, 4),
                                      (32, 128, 4, 3, 2), (32, 256, 8, 3, 2), (64, 128, 4, 4),
                                      (32, 256, 8, 3, 2, False), (32, 128, 4, 3), (32, 128, 4, 6), (16, 128, 4, 6),
                                      (32, 128, 4, 2, 2), (32, 64, 4, 6), (32, 128, 8, 6)]]
SPACE = {"up": [(r, _cfg(*c)) for r, c in _UP], "down": [(r, _cfg(*c)) for r, c in _DOWN]}


def candidates(op: str, per_expert: float | None, mode: str = "w8a8", tiles: bool = False) -> list[dict]:
    """The op's configs tried at this many rows per expert (all of them when None), valid, no duplicates
    (W8A16: the same space without SWAP_AB, the up GEMM's output unquantised; tiles: no 256-wide TMA tiles,
    which span two weight blocks)."""
    out = []
    for (lo, hi), c in SPACE[op]:
        if (mode == "w8a16" and c["SWAP_AB"]) or (tiles and c["USE_TMA"] and c["BLOCK_N"] > 128):
            continue
        if (per_expert is None or lo <= per_expert <= hi) and c not in out:
            out.append(check_fp8_config(c, quant_out=op == "up" and mode != "w8a16"))
    return out


def fp8_weights(E: int, H: int, I: int, device: str) -> tuple[torch.Tensor, ...]:
    """(w13_q, w13_scale, w2_q, w2_scale) from the benches' random bf16 experts, block-quantised."""
    w13, w2 = make_weights(E, H, I, "swiglu", torch.bfloat16, device)
    return (*quant_fp8_blocks(w13), *quant_fp8_blocks(w2))


class Case:
    """One (E, T): quantised tokens, routing, and per alignment block the buffers each GEMM writes."""

    def __init__(self, E: int, T: int, k: int, H: int, I: int, w: tuple[torch.Tensor, ...],
                 mode: str = "w8a8") -> None:
        self.E, self.T, self.k, self.H, self.I, self.w, self.mode = E, T, k, H, I, w, mode
        self.w8a16, self.terms = mode == "w8a16", 2 if mode == "hilo" else 1
        dev = w[0].device
        self.x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        self.xq, self.xs = quant_rows(self.x, self.terms)
        self.ids, tw = make_routing(T, E, k, str(dev), seed=T)
        self.row_w = tw.reshape(-1).contiguous()
        self.aligns = {}

    def align(self, bm: int):
        """(alignment, inter fp8 [R, I], inter scales [R, IG], out [T*k, H]) for bm-row blocks."""
        if bm not in self.aligns:
            al = moe_align(self.ids, self.E, bm)
            R = al.sorted_ids.numel()
            inter = torch.randn(R, self.I, device=self.x.device, dtype=self.x.dtype)
            inter, inter_s = (inter, None) if self.w8a16 else quant_rows(inter, self.terms)
            self.aligns[bm] = (al, inter, inter_s, self.x.new_empty((self.T * self.k, self.H)))
        return self.aligns[bm]

    def stage(self, op: str, cfg: dict) -> Callable[[], torch.Tensor]:
        """Zero-argument call of one GEMM with cfg on this case's buffers."""
        al, inter, inter_s, out = self.align(cfg["SPLIT_M"] or cfg["BLOCK_M"])
        if op == "up":
            a, a_s = (self.x, None) if self.w8a16 else (self.xq, self.xs)
            return lambda: moe_gemm_fp8(a, a_s, self.w[0], self.w[1], inter, al, cfg, gather_a=True,
                                        scatter_c=False, a_div=self.k, swiglu=True, out_scale=inter_s,
                                        terms=self.terms)
        return lambda: moe_gemm_fp8(inter, inter_s, self.w[2], self.w[3], out, al, cfg, gather_a=False,
                                    scatter_c=True, row_weights=self.row_w, terms=self.terms)

    def whole(self, up: dict, down: dict) -> Callable[[], torch.Tensor]:
        """Both GEMMs (rows aligned to the smaller SPLIT_M / BLOCK_M) -> [T*k, H] in pair order."""
        al = moe_align(self.ids, self.E, min(c["SPLIT_M"] or c["BLOCK_M"] for c in (up, down)))
        out = self.x.new_empty((self.T * self.k, self.H))
        if self.w8a16:
            return lambda: w8a16_ffn_aligned(self.x, al, *self.w, up, down, out, a_div=self.k, row_weights=self.row_w)
        return lambda: fp8_ffn_aligned(self.xq, self.xs, al, *self.w, up, down, out, a_div=self.k,
                                       row_weights=self.row_w, terms=self.terms)


def _compile_worker(args) -> list[tuple[str, dict, str]]:
    """Compile (by running once on a small case) each (op, config); returns the failures."""
    H, I, k, device, jobs, mode, tiles = args
    E = max(k, 8)
    w = fp8_weights(E, H, I, device)
    case = Case(E, 16, k, H, I, (tile_weights(w[0]), w[1], tile_weights(w[2]), w[3]) if tiles else w, mode)
    failed = []
    for op, cfg in jobs:
        try:
            case.stage(op, cfg)()
            torch.cuda.synchronize()
        except Exception as err:  # out of shared memory, a lowering the installed Triton lacks, ...
            failed.append((op, cfg, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
    return failed


def compile_all(H: int, I: int, k: int, device: str, workers: int, mode: str = "w8a8", tiles: bool = False) -> None:
    """Compile every candidate in `workers` processes (Triton's disk cache serves the timing run)."""
    jobs = [(op, c) for op in ("up", "down") for c in candidates(op, None, mode, tiles)]
    chunks = [jobs[i::workers] for i in range(workers)]
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        failed = [f for fs in pool.map(_compile_worker, [(H, I, k, device, c, mode, tiles) for c in chunks if c])
                  for f in fs]
    print(f"compiled {len(jobs)} FP8 candidates, {len(failed)} failed")
    for op, cfg, why in failed:
        print(f"  {op} {cfg}: {why}")


def check_space(device: str) -> int:
    """Run every candidate of both GEMMs on a small case, in up/down pairs checked against the first pair
    (float32 rows: the CPU interpreter's bf16 is not exact); returns how many runs were checked. A candidate
    that cannot run or a pair that disagrees raises."""
    E, T, k, H, I = 4, 6, 2, 256, 256  # K = 256 both ways: K_STEPS = 2 candidates run too
    case = Case(E, T, k, H, I, fp8_weights(E, H, I, device))
    case.x = case.x.float()
    case.xq, case.xs = quant_rows(case.x)
    case.row_w = case.row_w.float()
    ups, downs = candidates("up", None), candidates("down", None)
    pairs = list(zip(ups[1:], downs[1:]))
    # the pairs below run every candidate but the longer list's tail: those run alone (they must not raise)
    n = len(pairs) + 1
    for op, cs in (("up", ups[n:]), ("down", downs[n:])):
        for c in cs:
            case.stage(op, c)()
    ref = case.whole(ups[0], downs[0])().float()
    for u, d in pairs:
        err = float((case.whole(u, d)().float() - ref).norm() / ref.norm())
        if not err < 1e-5:
            raise AssertionError(f"up {u} / down {d} differ from the first pair by {err:.2e}")
    # W8A16 (float16 rows: the interpreter's float16 is exact): every candidate once, pairs agree
    w16 = Case(E, T, k, H, I, case.w, mode="w8a16")
    w16.x, w16.row_w = case.x.half(), case.row_w
    ups16, downs16 = candidates("up", None, "w8a16"), candidates("down", None, "w8a16")
    for op, cs in (("up", ups16), ("down", downs16)):
        for c in cs:
            w16.stage(op, c)()
    ref16 = w16.whole(ups16[0], downs16[0])().float()
    for u, d in zip(ups16[1:4], downs16[1:4]):
        err = float((w16.whole(u, d)().float() - ref16).norm() / ref16.norm())
        if not err < 2e-3:
            raise AssertionError(f"W8A16 up {u} / down {d} differ from the first pair by {err:.2e}")
    # two-term activations: a few pairs, including the swapped MMA's, agree with the first pair
    hilo = Case(E, T, k, H, I, case.w, mode="hilo")
    hilo.x, hilo.row_w = case.x, case.row_w
    hilo.xq, hilo.xs = quant_rows(hilo.x, 2)
    swapped = [(u, d) for u, d in zip(ups, downs) if u["SWAP_AB"] or d["SWAP_AB"]][:2]
    ref2 = hilo.whole(ups[0], downs[0])().float()
    for u, d in [*pairs[:2], *swapped]:
        err = float((hilo.whole(u, d)().float() - ref2).norm() / ref2.norm())
        if not err < 1e-5:
            raise AssertionError(f"two-term up {u} / down {d} differ from the first pair by {err:.2e}")
    # block-layout weights: the same bytes out as the rows, for a few pairs (one- and two-term)
    for c in (case, hilo):
        rows_w = c.w
        tiled_w = (tile_weights(rows_w[0]), rows_w[1], tile_weights(rows_w[2]), rows_w[3])
        for u, d in [(ups[0], downs[0]), *swapped]:
            want = c.whole(u, d)().float()
            c.w = tiled_w
            got = c.whole(u, d)().float()
            c.w = rows_w
            if not torch.equal(got, want):
                raise AssertionError(f"block-layout weights differ from the rows for up {u} / down {d}")
    return len(ups[n:]) + len(downs[n:]) + 1 + len(pairs) + len(ups16) + len(downs16) + 3 + 2 + 3 * len(swapped) + 2


def rank_op(case: Case, op: str, log: list) -> list[tuple[float, dict]]:
    """(us, config) for each candidate of one GEMM at this case's rows per expert, fastest first."""
    times = []
    for cfg in candidates(op, case.T * case.k / case.E, case.mode, is_tiled(case.w[0])):
        try:
            us = time_us(case.stage(op, cfg))
        except Exception as err:  # out of resources at launch, an unsupported lowering, ...
            print(f"  T={case.T} {op} {cfg} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        times.append((us, cfg))
        log.append({"tokens": case.T, "op": op, "config": cfg, "us": round(us, 1)})
    times.sort(key=lambda t: t[0])
    if times:
        print(f"T={case.T:5d} fp8 {op:5s} best {times[0][0]:8.1f} us {times[0][1]}  (of {len(times)})")
    return times


def main(argv: list[str] | None = None) -> None:
    """Tune each token count's FP8 configs and merge the winners into kernels/tuned."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--log", default=None, help="write every timing here (JSON)")
    p.add_argument("--w8a16", action="store_true", help="tune the W8A16 kernels (bf16 rows, tables *_w8a16)")
    p.add_argument("--hilo", action="store_true", help="tune two-term activations (act_terms=2, tables *_hilo)")
    p.add_argument("--tiles", action="store_true", help="weights in the block layout (tile_weights; tables *_tiles)")
    p.add_argument("--check", default=None, metavar="DEVICE",
                   help="only run every candidate on a small case on DEVICE (cpu: under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.check:
        print(f"checked {check_space(args.check)} FP8 candidate runs")
        return
    E, k, H, I = args.experts, args.top_k, args.hidden, args.intermediate
    if args.w8a16 and args.hilo:
        p.error("--w8a16 and --hilo are different activation schemes: tune one at a time")
    mode = "w8a16" if args.w8a16 else "hilo" if args.hilo else "w8a8"
    if args.tiles and args.w8a16:
        p.error("--tiles runs on the W8A8 kernels (one- or two-term activations), not --w8a16")
    if args.compile_only:
        compile_all(H, I, k, "cuda", args.jobs, mode, args.tiles)
        return
    w = fp8_weights(E, H, I, "cuda")
    if args.tiles:
        w = (tile_weights(w[0]), w[1], tile_weights(w[2]), w[3])
    log, best, paths = [], {}, []
    meta = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "top_k": k,
            "key": "M = tokens * top_k rows"}
    for T in args.tokens:
        case = Case(E, T, k, H, I, w, mode)
        ranked = {op: rank_op(case, op, log) for op in ("up", "down")}
        safe = case.whole(*(check_fp8_config(default_config_fp8(op, T * k, E), op == "up" and not args.w8a16)
                            for op in ("up", "down")))().float()
        timed = []
        for up, down in [(u, d) for _, u in ranked["up"][:4] for _, d in ranked["down"][:4]]:
            fn = case.whole(up, down)
            err = float((fn().float() - safe).norm() / safe.norm())
            if not err < 1e-2:  # a config that computes something else never wins
                print(f"T={T:5d} REJECTED {up} {down}: differs from the default config by {err:.2e}")
                continue
            us = time_us(fn)
            timed.append((us, up, down))
            log.append({"tokens": T, "op": "whole", "config": [up, down], "us": round(us, 1)})
        if not timed:
            print(f"T={T:5d} no candidate verified; keeping the defaults")
            continue
        us, up, down = min(timed, key=lambda t: t[0])
        tag = ("" if mode == "w8a8" else "_" + mode) + ("_tiles" if args.tiles else "")
        best.setdefault("up" + tag, {})[T * k], best.setdefault("down" + tag, {})[T * k] = up, down
        print(f"T={T:5d} fp8{tag} whole best {us:8.1f} us  up {up}  down {down}")
        paths = write_tables(best, E, H, I, H, FP8, _device_name(w[0].device), meta)
        if args.log:
            with open(args.log, "w") as f:
                json.dump(log, f, indent=1)
    print("wrote", *paths, sep="\n  ")


if __name__ == "__main__":
    main()
