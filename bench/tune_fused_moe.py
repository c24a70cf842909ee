"""Tune the Triton fused-MoE block configs for one expert shape on this GPU; writes kernels/tuned/*.json.

    python bench/tune_fused_moe.py --experts 32 --tokens 64 256 1024 4096            # DeepSeek-V3 dims
    python bench/tune_fused_moe.py --expert-type linear --experts 256 --hidden 2048 --tokens 128

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, M = T*k rows (the table key).

Each GEMM ("up": gate/up with SwiGLU, "down", or "linear") is timed alone over a small candidate space
(tile, warps, stages, L2 grouping, TMA for weights), on the bench's workload (uniform top-k routing,
rows aligned by kernels.moe_align). For SwiGLU the four fastest of each GEMM are then timed together in
pairs through kernels.fused_moe.fused_moe_aligned (rows aligned to the smaller of the pair's SPLIT_M /
BLOCK_M, as in kernels.fused_moe.stage_configs) and the best pair is kept. `--compile-only` compiles
every candidate in parallel worker processes (Triton's on-disk cache then serves the timing run).
Results merge into the existing table files.
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
from nanomoe_kernels.fused_moe import TUNED_DIR, _device_name, config_name, default_config, fused_moe_aligned  # noqa: E402
from nanomoe_kernels.fused_moe_kernel import check_config, moe_gemm  # noqa: E402
from nanomoe_kernels.moe_align import Alignment, moe_align  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402


def _cfg(bm, bn, bk, warps, stages, group=8, tma=False, split=0, merge=False, a_tma=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages,
                USE_TMA=tma, SPLIT_M=split, MERGE_TAIL=merge, A_TMA=a_tma)


def _space(*groups) -> list[tuple[tuple[int, int], dict]]:
    return [(rng, _cfg(*c)) for rng, cs in groups for c in cs]


def _with_split(cs, split=64):
    return cs + [(*c[:5], c[5] if len(c) > 5 else 8, c[6] if len(c) > 6 else False, split) for c in cs]


def _merged(cs, split=64):
    """The TMA configs again with 64-row tails in the same launch (MERGE_TAIL)."""
    return [(*c[:5], c[5] if len(c) > 5 else 8, True, split, True) for c in cs]


# (rows-per-expert range a config is tried for, config):
# (BM, BN, BK, warps, stages[, GROUP_M, TMA, SPLIT_M, MERGE_TAIL, A_TMA]).
# "up" holds two accumulators (gate, up), so its column tiles are half the others'. The space is the
# neighbourhood of what won on an H200 (bench/results/expert_ffn_notes.md), plus 64-row tail splits.
SMALL, LARGE = (0, 96), (48, 1 << 30)
_UP = _space(
    (SMALL, [(32, 128, 128, 8, 3), (32, 128, 128, 8, 4), (32, 64, 128, 4, 4), (32, 64, 128, 4, 4, 8, True),
             (64, 64, 128, 4, 4, 8, True), (16, 64, 128, 4, 4), (32, 128, 128, 8, 3, 8, True)]),
    (LARGE, _with_split([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3, 8, True),
                         (128, 128, 64, 8, 4, 8, True)]) + [(128, 128, 64, 8, 3, 16)]
     + _merged([(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3, 16)])))
_DOWN = _space(
    (SMALL, [(32, 256, 128, 8, 3), (32, 256, 128, 8, 4), (64, 256, 64, 8, 4, 8, True), (64, 128, 64, 4, 4),
             (32, 128, 128, 4, 4), (32, 128, 128, 4, 4, 8, True), (16, 128, 128, 4, 4, 8, True)]),
    (LARGE, _with_split([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 64, 8, 3, 8, True),
                         (128, 256, 64, 8, 4, 8, True)]) + [(128, 256, 64, 8, 3, 16)]
     + _merged([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4)])
     + [(*c, True) for c in _merged([(128, 256, 64, 8, 3), (128, 256, 64, 8, 4)])]
     + [(128, 256, 64, 8, s, 8, True, 0, False, True) for s in (3, 4)]))
_LINEAR = _space(
    (SMALL, [(16, 128, 128, 4, 4, 8, True), (16, 128, 128, 4, 4), (16, 256, 128, 8, 3, 8, True),
             (16, 64, 128, 4, 4), (16, 128, 256, 4, 3), (32, 128, 128, 4, 4, 8, True)]))
# the warp-specialised Hopper kernel with its staged epilogue (kernels/fused_moe_wgmma.py; elsewhere these run the
# Triton kernel, the same as their non-WGMMA twins): the H200 tables' prefill entries (runs 237-240)
_UP += [(LARGE, {**_cfg(128, 128, 64, 8, 4, 8, True, 64), "WGMMA": True, "STAGE_C": True})]
_DOWN += [(LARGE, {**_cfg(128, 256, 64, 8, 4, 8, True, 64), "WGMMA": True, "STAGE_C": True})]
# and with carried tails (kernels/fused_moe_wgmma_tail.py; the up GEMM unstaged and the down GEMM at 3 stages, so
# the tail ring fits): the tables' entries at 64 x 1024, 128 x 4096 and 256 x 4096 (runs 244-245)
_UP += [(LARGE, {**_cfg(128, 128, 64, 8, 4, 8, True, 64), "WGMMA": True, "TAIL_N": 32})]
_DOWN += [(LARGE, {**_cfg(128, 256, 64, 8, 3, 8, True, 64), "WGMMA": True, "STAGE_C": True, "TAIL_N": 32})]
SPACE = {"up": _UP, "down": _DOWN, "linear": _LINEAR}


def candidates(op: str, per_expert: float | None) -> list[dict]:
    """The op's configs tried at this many rows per expert (all of them when None), no duplicates."""
    out = []
    for (lo, hi), c in SPACE[op]:
        if (per_expert is None or lo <= per_expert <= hi) and c not in out:
            out.append(c)
    return out


class Case:
    """Inputs of one (E, T) and, per BLOCK_M, its alignment and the buffers each GEMM writes."""

    def __init__(self, E: int, T: int, k: int, H: int, I: int, expert_type: str,
                 weights: tuple[torch.Tensor, ...]) -> None:
        self.E, self.T, self.k, self.H, self.I, self.type, self.w = E, T, k, H, I, expert_type, weights
        dev = weights[0].device
        self.x = torch.randn(T, H, device=dev, dtype=weights[0].dtype)
        self.ids, tw = make_routing(T, E, k, str(dev), seed=T)
        self.row_w = tw.reshape(-1).contiguous()
        self.aligns = {}

    def align(self, bm: int) -> tuple[Alignment, torch.Tensor, torch.Tensor]:
        """Alignment to bm-row blocks, with the down GEMM's input and the output buffers for it."""
        if bm not in self.aligns:
            al = moe_align(self.ids, self.E, bm)
            # the down GEMM's input: [R, I] in aligned order, random (as the up GEMM would leave it)
            inter = torch.randn(al.sorted_ids.numel(), max(self.I, 1), device=self.x.device).to(self.x.dtype)
            out = self.x.new_empty((self.T * self.k, self.w[-1].shape[1]))
            self.aligns[bm] = (al, inter, out)
        return self.aligns[bm]

    def stage(self, op: str, cfg: dict) -> Callable[[], torch.Tensor]:
        """Zero-argument call of one GEMM ("up", "down" or "linear") with cfg on this case's buffers."""
        al, inter, out = self.align(cfg["SPLIT_M"] or cfg["BLOCK_M"])
        meta = (al, cfg)
        if op == "up":
            return lambda: moe_gemm(self.x, self.w[0], inter, *meta, gather_a=True, scatter_c=False,
                                    a_div=self.k, swiglu=True)
        if op == "down":
            return lambda: moe_gemm(inter, self.w[1], out, *meta, gather_a=False, scatter_c=True,
                                    row_weights=self.row_w)
        return lambda: moe_gemm(self.x, self.w[0], out, *meta, gather_a=True, scatter_c=True, a_div=self.k,
                                row_weights=self.row_w)

    def whole(self, first: dict, down: dict | None) -> Callable[[], torch.Tensor]:
        """The whole FFN with these configs (aligned to the smaller SPLIT_M / BLOCK_M) -> [T*k, H_out], pair order."""
        first, down = check_config(first), down if down is None else check_config(down)  # every key present
        tm = min(c["SPLIT_M"] or c["BLOCK_M"] for c in (first, down) if c is not None)
        al = moe_align(self.ids, self.E, tm)
        return lambda: fused_moe_aligned(self.x, al, self.w, self.type, first, down, a_div=self.k,
                                         row_weights=self.row_w)


def _compile_worker(args) -> list[tuple[str, dict, str]]:
    """Compile (by running once on a small case) each (op, config); returns the failures."""
    H, I, k, expert_type, dtype, device, jobs = args
    E = max(k, 8)
    case = Case(E, 16, k, H, I, expert_type, make_weights(E, H, I, expert_type, dtype, device))
    failed = []
    for op, cfg in jobs:
        try:
            case.stage(op, cfg)()
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception as err:  # out of shared memory, a lowering the installed Triton lacks, ...
            failed.append((op, cfg, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
    return failed


def compile_all(ops: list[str], E: int, tokens: list[int], H: int, I: int, k: int, expert_type: str,
                dtype: torch.dtype, device: str, workers: int) -> list[tuple[str, dict, str]]:
    """Compile the candidates the timing run will try, spread over `workers` processes."""
    jobs = []
    for op in ops:
        for T in tokens:
            jobs += [(op, c) for c in candidates(op, T * k / E) if (op, c) not in jobs]
    chunks = [jobs[i::workers] for i in range(workers)]
    ctx = mp.get_context("spawn")
    failed = []
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        tasks = [(H, I, k, expert_type, dtype, device, ch) for ch in chunks if ch]
        for f in pool.map(_compile_worker, tasks):
            failed += f
    print(f"compiled {len(jobs)} candidates, {len(failed)} failed")
    for op, cfg, why in failed:
        print(f"  {op} {cfg}: {why}")
    return failed


def time_us(fn: Callable[[], object]) -> float:
    """Median microseconds of fn (do_bench; short runs: enough to rank candidates)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def write_tables(best: dict, E: int, H: int, I: int, H_out: int, dtype: torch.dtype, device_name: str,
                 meta: dict) -> list[str]:
    """Merge {op: {M: cfg}} into kernels/tuned; returns the paths written."""
    dims = {"up": (I, H), "down": (H, I), "linear": (H_out, H), "up_w8a16": (I, H), "down_w8a16": (H, I),
            **{op + sfx: (I, H) if op == "up" else (H, I) for op in ("up", "down")
               for sfx in ("_hilo", "_tiles", "_hilo_tiles")}}
    TUNED_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for op, table in best.items():
        n, kdim = dims[op]
        path = TUNED_DIR / config_name(op, E, n, kdim, dtype, device_name)
        old = json.loads(path.read_text()) if path.exists() else {}
        entries = {m: c for m, c in old.items() if not m.startswith("_")}
        entries.update({str(m): c for m, c in table.items()})
        ordered = {"_meta": meta, **{m: entries[m] for m in sorted(entries, key=int)}}
        path.write_text(json.dumps(ordered, indent=1) + "\n")
        paths.append(str(path))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Tune each token count's configs and merge the winners into kernels/tuned (or only compile them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expert-type", default="swiglu", choices=["swiglu", "linear"])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--log", default=None, help="write every timing here (JSON)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run under TRITON_INTERPRET")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    E, k, H, I = args.experts, args.top_k, args.hidden, args.intermediate
    ops = ["up", "down"] if args.expert_type == "swiglu" else ["linear"]
    if args.compile_only:
        compile_all(ops, E, args.tokens, H, I, k, args.expert_type, dtype, args.device, args.jobs)
        return
    dev = torch.device(args.device)
    weights = make_weights(E, H, I, args.expert_type, dtype, args.device)
    log, best, paths = [], {op: {} for op in ops}, []
    meta = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": __import__("triton").__version__, "top_k": k,
            "key": "M = tokens * top_k rows"}
    for T in args.tokens:
        case = Case(E, T, k, H, I, args.expert_type, weights)
        ranked = {op: rank_op(case, op, log) for op in ops}
        combos = [(u, d) for _, u in ranked["up"][:4] for _, d in ranked["down"][:4]] if "up" in ops else \
            [(c, None) for _, c in ranked["linear"][:5]]
        defaults = [check_config(default_config(op, T * k, E)) for op in ops]
        safe = case.whole(defaults[0], defaults[1] if len(defaults) > 1 else None)()
        timed = []
        for first, down in combos:
            fn = case.whole(first, down)
            err = float((fn().float() - safe.float()).norm() / safe.float().norm())
            if not err < 1e-2:  # a config that computes something else never wins
                print(f"T={T:5d} REJECTED {first} {down}: differs from the default config by {err:.2e}")
                log.append({"tokens": T, "op": "whole", "config": [first, down], "rejected_err": err})
                continue
            us = time_us(fn)
            timed.append((us, first, down))
            log.append({"tokens": T, "op": "whole", "config": [first, down], "us": round(us, 1)})
        if not timed:
            print(f"T={T:5d} no candidate verified; keeping the defaults")
            continue
        us, first, down = min(timed, key=lambda t: t[0])
        best[ops[0]][T * k] = first
        if down is not None:
            best["down"][T * k] = down
        print(f"T={T:5d} whole  best {us:8.1f} us  up/linear {first}  down {down}")
        paths = write_tables(best, E, H, I, weights[-1].shape[1], dtype, _device_name(dev), meta)
        if args.log:
            with open(args.log, "w") as f:
                json.dump(log, f, indent=1)
    print("wrote", *paths, sep="\n  ")


def rank_op(case: Case, op: str, log: list) -> list[tuple[float, dict]]:
    """(us, config) for each candidate of one GEMM at this case's rows per expert, fastest first."""
    times = []
    for cfg in candidates(op, case.T * case.k / case.E):
        try:
            us = time_us(case.stage(op, cfg))
        except Exception as err:  # out of resources at launch, an unsupported lowering, ...
            why = str(err).splitlines()[0][:120] if str(err) else ""
            print(f"  T={case.T} {op} {cfg} failed: {type(err).__name__}: {why}")
            continue
        times.append((us, cfg))
        log.append({"tokens": case.T, "op": op, "config": cfg, "us": round(us, 1)})
    times.sort(key=lambda t: t[0])
    if times:
        print(f"T={case.T:5d} {op:6s} best {times[0][0]:8.1f} us {times[0][1]}  (of {len(times)})")
    return times


if __name__ == "__main__":
    main()
