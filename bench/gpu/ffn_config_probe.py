"""One GPU: the Triton fused MoE's config variants against the tuned configs, per E x T case.

    python bench/gpu/ffn_config_probe.py --json out.json [--rounds 5] [--cases 32x1024,256x4096]
                                         [--variants split32,split0,...]

DeepSeek-V3 expert dims (H 7168, I 2048), top-8. Variants, each a pair of (up, down) configs derived from the tuned
tables' pair for the case:
- `tuned`: the tables as they are; `baseline` (with --baseline DIR): the tables in DIR (an earlier set, timed in
  the same run);
- `split32` / `split16` / `split0`: both GEMMs with SPLIT_M = 32 / 16 / 0 (tails of 32 or 16 rows in the same
  launch, or every expert padded to BLOCK_M). The alignment block is the smaller SPLIT_M of the pair, so these
  also take the up GEMM off the wgmma kernel (it runs 64-row tails only);
- `tiles`: WGMMA off, the tuned tiles and tails otherwise; `tiles_s3`: the same with 3 stages in the up GEMM;
- `pair_up` / `pair_both`: tail programs of two column tiles (PAIR_TAILS; WGMMA off, 3 stages, which their
  shared memory needs) in the up GEMM / in both;
- `up256` / `down256` / `both256` (run 101): 256-row tiles, the up GEMM as 256 x (2 x 64), the down GEMM as
  256 x 128, 64-row tails in the same launch;
- `wg_up`: the up GEMM on the wgmma kernel (128 x (2 x 128), 4 stages); `wg_down`: the down GEMM on it
  (128 x 256, 4 stages); `wg_both`: both GEMMs on it; `wg_up_st` / `wg_down_st` / `wg_both_st`: the same with
  the output tile stored through shared memory (STAGE_C);
- `wg_up_st64`: `wg_up_st` with 64-column up tiles (128 x (2 x 64): twice the programs, a shorter last wave);
- `perm_up`: the tuned pair with PERMUTE_A in the up GEMM (the rows copied into aligned order first, then A by TMA);
- carried tails (TAIL_N, kernels/fused_moe_wgmma_tail.py): `tail_up32` / `tail_up16` the up GEMM on the wgmma kernel
  with TAIL_N = 32 / 16 (unstaged: a tail ring and the staging buffers do not both fit at 4 stages; compare with
  `wg_up`); `tail_down32` the down GEMM on it (128 x 256, TAIL_N = 32, staged at 3 stages; compare with
  `wg_down_st`), `tail_down32_s4` the same unstaged at 4 stages; `tail_both32` = `tail_up32` + `tail_down32`.
Each variant records which kernel its GEMMs ran on (`kernel`: "wgmma", or why not).
Rows are aligned once per alignment block, untimed (the bench's `triton` row); each variant is checked against
`tuned` (bitwise, else relative error), then all are timed in interleaved rounds (bench.common.round_order;
do_bench median, L2 flushed); the bf16 matmul ceiling before and after. A padded-row count per alignment
block says how many rows the MMAs run for the pairs.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import nanomoe_kernels.fused_moe as fm  # noqa: E402
from nanomoe_kernels.fused_moe import fused_moe_aligned, get_config  # noqa: E402
from nanomoe_kernels.fused_moe_kernel import check_config, wgmma_unsupported  # noqa: E402
from nanomoe_kernels.moe_align import moe_align  # noqa: E402
from nanomoe_kernels.moe_sum import sum_pairs  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

from bench.common import measure_ceilings  # noqa: E402
from bench.gpu.probe_cases import add_medians, rounds_us  # noqa: E402

K_TOP, H, I = 8, 7168, 2048
TILE256 = {"BLOCK_M": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "SPLIT_M": 64, "MERGE_TAIL": True,
           "USE_TMA": True, "WGMMA": False}
ALL = ("split32", "split16", "split0", "tiles", "tiles_s3", "pair_up", "pair_both", "up256", "down256", "both256",
       "wg_up", "wg_down", "wg_both", "wg_up_st", "wg_down_st", "wg_both_st", "perm_up",
       "wg_up_st64", "tail_up32", "tail_up16", "tail_down32", "tail_down32_s4", "tail_both32")
WG2 = {"WGMMA": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_M": 64, "num_stages": 4}
WG2_DOWN = {**WG2, "BLOCK_N": 256}
PAIR = {"WGMMA": False, "MERGE_TAIL": True, "PAIR_TAILS": True, "num_stages": 3}


def table_pair(E: int, T: int, dev: torch.device) -> tuple[dict, dict]:
    """The (up, down) configs the loaded tables give this case."""
    return (get_config("up", E, I, H, torch.bfloat16, T * K_TOP, dev),
            get_config("down", E, H, I, torch.bfloat16, T * K_TOP, dev))


def baseline_pair(E: int, T: int, dev: torch.device, directory: str) -> tuple[dict, dict]:
    """The (up, down) configs of the tables in `directory` (the package's tables swapped in for the look-up)."""
    saved = fm.TABLES
    fm.TABLES = fm.load_tables(pathlib.Path(directory))
    try:
        return table_pair(E, T, dev)
    finally:
        fm.TABLES = saved


def variants(E: int, T: int, dev: torch.device, names: list[str], baseline: str | None = None) -> dict[str, dict]:
    """{name: {"up": config, "down": config}} for `tuned`, `baseline` (the tables in that directory) when given,
    and the asked variants."""
    up, down = table_pair(E, T, dev)

    def both(**kv) -> dict:
        return {"up": {**up, **kv}, "down": {**down, **kv}}

    every = {"split32": both(SPLIT_M=32, MERGE_TAIL=True), "split16": both(SPLIT_M=16, MERGE_TAIL=True),
             "split0": both(SPLIT_M=0), "tiles": both(WGMMA=False),
             "tiles_s3": {"up": {**up, "WGMMA": False, "num_stages": 3}, "down": {**down, "WGMMA": False}},
             "pair_up": {"up": {**up, **PAIR}, "down": down}, "pair_both": both(**PAIR),
             "up256": {"up": {**up, **TILE256, "BLOCK_N": 64}, "down": down},
             "down256": {"up": up, "down": {**down, **TILE256, "BLOCK_N": 128}},
             "both256": {"up": {**up, **TILE256, "BLOCK_N": 64}, "down": {**down, **TILE256, "BLOCK_N": 128}},
             "wg_up": {"up": {**up, **WG2}, "down": down}, "wg_down": {"up": up, "down": {**down, **WG2_DOWN}},
             "wg_both": {"up": {**up, **WG2}, "down": {**down, **WG2_DOWN}}}
    every["perm_up"] = {"up": {**up, "PERMUTE_A": True}, "down": down}
    every["wg_up_st64"] = {"up": {**up, **WG2, "BLOCK_N": 64, "STAGE_C": True}, "down": down}
    every |= {f"{n}_st": {op: {**c, "STAGE_C": c.get("WGMMA", False)} for op, c in every[n].items()}
              for n in ("wg_up", "wg_down", "wg_both")}
    t_up = {n: {**up, **WG2, "TAIL_N": n, "STAGE_C": False} for n in (16, 32)}
    t_down = {**down, **WG2_DOWN, "TAIL_N": 32, "STAGE_C": True, "num_stages": 3}
    every |= {"tail_up32": {"up": t_up[32], "down": down}, "tail_up16": {"up": t_up[16], "down": down},
              "tail_down32": {"up": up, "down": t_down},
              "tail_down32_s4": {"up": up, "down": {**t_down, "STAGE_C": False, "num_stages": 4}},
              "tail_both32": {"up": t_up[32], "down": t_down}}
    base = dict(zip(("up", "down"), baseline_pair(E, T, dev, baseline))) if baseline else None
    return {"tuned": {"up": up, "down": down}, **({"baseline": base} if base else {}), **{n: every[n] for n in names}}


def run_case(E: int, T: int, w: tuple[torch.Tensor, ...], names: list[str], rounds: int, rep_ms: int,
             baseline: str | None = None) -> dict:
    """One E x T case: check, then time every variant in interleaved rounds."""
    dev = w[0].device
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, K_TOP, "cuda", seed=T)
    row_w = tw.reshape(-1).contiguous()
    rec: dict = {"case": f"{E}x{T}", "variants": {}, "padded_rows": {}}
    fns, want = {}, None
    for name, cfg in variants(E, T, dev, names, baseline).items():
        cfg = {k: check_config(c) for k, c in cfg.items()}
        tm = min(c["SPLIT_M"] or c["BLOCK_M"] for c in cfg.values())
        al = moe_align(ids, E, tm)
        rec["padded_rows"][tm] = int(al.num_padded.item())  # setup, untimed
        inter = x.new_empty(1, I)
        kernel = {op: wgmma_unsupported(c, a, w[i], al, op == "up") or "wgmma"
                  for (op, c), a, i in zip(cfg.items(), (x, inter), (0, 1))}  # which kernel each GEMM runs on

        def fn(al=al, cfg=cfg) -> torch.Tensor:
            return sum_pairs(fused_moe_aligned(x, al, w, "swiglu", cfg["up"], cfg["down"], a_div=K_TOP,
                                               row_weights=row_w), K_TOP)

        try:
            got = fn()
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - a config Triton cannot compile is a result here
            rec["variants"][name] = {"config": cfg, "error": f"{type(err).__name__}: {str(err)[:400]}"}
            continue
        want = got if want is None else want
        err = float((got.double() - want.double()).norm() / want.double().norm())
        rec["variants"][name] = {"config": cfg, "align_block": tm, "kernel": kernel,
                                 "bitwise": bool(torch.equal(got, want)),
                                 "rel_err": err, "us": []}
        if err < 1e-2:
            fns[name] = fn
    for name, us in rounds_us(fns, rounds, rep_ms).items():
        rec["variants"][name]["us"] = us
    add_medians(rec["variants"], 2 * T * K_TOP * 3 * H * I)
    print(json.dumps({"case": rec["case"], "median_us": {n: v.get("median_us", v.get("error")) for n, v in
                                                         rec["variants"].items()}, "padded_rows": rec["padded_rows"]}),
          flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="ffn_config_probe.json")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rep-ms", type=int, default=150)
    ap.add_argument("--cases", default="32x1024,32x4096")
    ap.add_argument("--variants", default="split32,split0,tiles", help=f"of {','.join(ALL)} (`tuned` always)")
    ap.add_argument("--baseline", default=None, help="a directory of tables: their configs as variant `baseline`")
    a = ap.parse_args()
    names = [n for n in a.variants.split(",") if n]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(ALL)}")
    dev = torch.device("cuda")
    out = {"bench": "ffn_config_probe", "torch": torch.__version__, "triton": triton.__version__,
           "command": "python " + " ".join(sys.argv), "ceilings_before": measure_ceilings(dev, torch.bfloat16),
           "cases": []}
    weights: dict[int, tuple[torch.Tensor, ...]] = {}
    for case in a.cases.split(","):
        E, T = (int(v) for v in case.split("x"))
        if E not in weights:
            weights.clear()  # one expert count's weights at a time (256 experts: 11 GB)
            weights[E] = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda")
        out["cases"].append(run_case(E, T, weights[E], names, a.rounds, a.rep_ms, a.baseline))
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    out["ceilings_after"] = measure_ceilings(dev, torch.bfloat16)
    print(json.dumps({"ceilings_before": out["ceilings_before"], "ceilings_after": out["ceilings_after"]}))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
