"""EPLB on synthetic skewed routing: GPU balancedness of the identity placement vs EPLB's.

Dimension legend: L layers, E logical experts, P physical slots, W simulated GPUs, T tokens per step,
k experts per token, window = steps recorded before a rebalance (and steps measured after it).

For each skew, routing is sampled once per layer (top-k distinct experts per token by Gumbel top-k
over the skewed expert distribution), recorded with the load recorder over one window, rebalanced on
the windowed counts, and then measured on the *next* window of tokens (held out; the drifting
skews keep moving), remapped with remap_dynamic (equal share per replica) and with the static
same-rank-first remap (each simulated GPU sends its 1/W of the tokens). Balancedness is mean / max
tokens per GPU (1.0 = perfect), averaged over layers:
  balancedness           held-out window, dynamic remap, tokens summed over the window
  balancedness_step      the same per step, averaged over steps (adds per-step sampling noise)
  balancedness_static    held-out window, static same-rank-first remap
  balancedness_expected  the recorded window's counts split evenly over replicas (what EPLB optimises)
Runs on a 2-core CPU in about 20 s (idle machine):
  python bench/bench_eplb.py --json bench/results/eplb_cpu.json --plot bench/results/eplb_cpu.png
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import write_record  # noqa: E402
from nanomoe_fn.cli_util import OneLineParser, UsageError, run_cli  # noqa: E402
from nanomoe_fn.eplb import (  # noqa: E402
    POLICIES,
    advance,
    balancedness,
    gpu_loads,
    init_recorder,
    placement_for_layer,
    rebalance_experts,
    record,
    remap,
    tokens_per_gpu,
    windowed_load,
)
from nanomoe_fn.eplb.placement import Placement  # noqa: E402

SKEWS = ("zipf", "hot_groups", "drift", "churn")


def expert_logits(skew: str, E: int, G: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Log-probabilities of choosing each expert [steps, E] for one layer."""
    zipf = -torch.log(torch.arange(1, E + 1, dtype=torch.float64))  # Zipf(1.0) by rank
    perm = torch.randperm(E, generator=gen)  # expert holding each rank
    if skew == "zipf":
        return zipf[torch.argsort(perm)].expand(steps, E)
    if skew == "hot_groups":  # two random groups 8x hotter, a milder Zipf(0.5) inside every group
        hot = torch.zeros(G, dtype=torch.float64)
        hot[torch.randperm(G, generator=gen)[:2]] = math.log(8.0)
        return (hot.repeat_interleave(E // G) + 0.5 * zipf[torch.argsort(perm)]).expand(steps, E)
    if skew in ("drift", "churn"):
        # Zipf(1.0) whose hot set moves every step. drift: two neighbouring ranks among the 32 hottest
        # trade places (a slow walk); churn: one of the E/16 hottest trades with a cold expert (after two
        # windows most of the hot set is new, so the recorded window is stale).
        rows = []
        for _ in range(steps):
            if skew == "drift":
                i = int(torch.randint(min(32, E - 1), (1,), generator=gen))
                j = i + 1
            else:  # hot: the first E / 16 ranks; cold: past the first E / 4
                i = int(torch.randint(max(1, E // 16), (1,), generator=gen))
                j = int(torch.randint(E // 4, E, (1,), generator=gen))
            perm[[i, j]] = perm[[j, i]]
            rows.append(zipf[torch.argsort(perm)])
        return torch.stack(rows)
    raise ValueError(f"skew must be one of {SKEWS}, got {skew!r}")


def sample_routing(logits: torch.Tensor, T: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """topk_ids [T, k]: k distinct experts per token, drawn without replacement (Gumbel top-k)."""
    u = torch.rand(T, logits.shape[-1], generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def measure(pl: Placement, steps: list[torch.Tensor]) -> dict[str, float]:
    """Balancedness of one layer's placement on the held-out steps (each [T, k] logical ids)."""
    W = pl.world_size
    total_dyn = torch.zeros(W, dtype=torch.int64)
    total_static = torch.zeros(W, dtype=torch.int64)
    per_step = []
    for s, ids in enumerate(steps):
        dyn = tokens_per_gpu(remap(pl, ids, policy="dynamic", step=s), pl)
        total_dyn += dyn
        per_step.append(float(balancedness(dyn)))
        for r, chunk in enumerate(ids.chunk(W)):  # simulated GPU r routes its share of the tokens
            total_static += tokens_per_gpu(remap(pl, chunk, rank=r, policy="static"), pl)
    return {"balancedness": float(balancedness(total_dyn)),
            "balancedness_step": sum(per_step) / len(per_step),
            "balancedness_static": float(balancedness(total_static)), "per_gpu": total_dyn}


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """All rows, plus the per-GPU loads of one case for the plot."""
    E, G, k, T, win, L = args.experts, args.groups, args.top_k, args.tokens, args.window, args.layers
    rows, plot = [], {}
    for skew in args.skews:
        gen = torch.Generator().manual_seed(args.seed)
        ids = []  # [L][2 * window] topk_ids [T, k]: recorded window, then the held-out window
        for _ in range(L):
            logits = expert_logits(skew, E, G, 2 * win, gen)
            ids.append([sample_routing(logits[s], T, k, gen) for s in range(2 * win)])
        held_out = [layer_ids[win:] for layer_ids in ids]
        state = init_recorder(win, L, E)
        for s in range(win):  # as a server does: every layer records its step, then the step ends
            for layer in range(L):
                state = record(state, ids[layer][s], layer)
            if s < win - 1:  # advancing past the last step would clear the oldest row
                state = advance(state)
        load = windowed_load(state).double()  # [L, E] tokens per expert over the recorded window
        for W in args.gpus:
            N = max(1, W // args.gpus_per_node)
            base = {"skew": skew, "gpus": W, "nodes": N, "experts": E, "top_k": k, "tokens_per_step": T,
                    "window": win, "layers": L}
            variants = [("identity", None, 0)] + [("eplb", pol, red) for red in args.redundant
                                                  for pol in args.policies]
            for variant, policy, red in variants:
                if variant == "identity":
                    phy2log = torch.arange(E).expand(L, E)
                else:
                    phy2log, _, _ = rebalance_experts(load, E + red, G, N, W, policy)
                stats = [measure(placement_for_layer(phy2log, layer, E, W), held_out[layer])
                         for layer in range(L)]
                case = dict(base, redundant_slots=red, **({"policy": policy} if policy else {}))
                row = {"case": case, "variant": variant}
                for key in ("balancedness", "balancedness_step", "balancedness_static"):
                    row[key] = round(sum(s[key] for s in stats) / L, 4)
                expected = balancedness(gpu_loads(load, phy2log, W)).mean()
                row["balancedness_expected"] = round(float(expected), 4)
                rows.append(row)
                print(f"{skew:>10} W={W:>2} N={N} {variant:>8} {policy or '':>12} red={red:>2}  "
                      f"held-out {row['balancedness']:.3f}  per-step {row['balancedness_step']:.3f}  "
                      f"static {row['balancedness_static']:.3f}  expected {row['balancedness_expected']:.3f}",
                      flush=True)
                if (skew, W) == ("zipf", max(args.gpus)) and red in (0, max(args.redundant)):
                    plot[f"{variant} {policy or ''} +{red}".replace("  ", " ")] = stats[0]["per_gpu"]
    return rows, plot


def write_plot(plot: dict, path: str, W: int, title: str) -> None:
    """Per-GPU held-out load (relative to the mean) of the identity and EPLB placements."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping --plot (pip install -e '.[plot]')")
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(plot), 1)
    for i, (name, load) in enumerate(plot.items()):
        rel = (load.double() / load.double().mean()).tolist()
        label = f"{name} (balancedness {float(balancedness(load)):.2f})"
        ax.bar([g + i * width for g in range(W)], rel, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("GPU")
    ax.set_ylabel("tokens / mean tokens per GPU")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _ints(text: str) -> list[int]:
    """'4,8' -> [4, 8] (an argparse type: a bad list is one line naming the flag)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return out


def _names(choices: tuple[str, ...]) -> object:
    """An argparse type: a comma list of names, each one of choices."""
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; expected a comma list of {list(choices)}")
        return names
    return parse


def check_flags(args: argparse.Namespace) -> None:
    """Every flag checked before anything is sampled (UsageError, one line naming the flag)."""
    E, G = args.experts, args.groups
    for flag in ("experts", "groups", "top_k", "tokens", "window", "layers", "gpus_per_node"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if min(args.gpus) < 1:
        raise UsageError(f"--gpus: every GPU count must be >= 1, got {args.gpus}")
    if min(args.redundant) < 0:
        raise UsageError(f"--redundant: every count of redundant slots must be >= 0, got {args.redundant}")
    if args.top_k > E:
        raise UsageError(f"--top-k ({args.top_k}) must be <= --experts ({E}): each token picks distinct experts")
    if "drift" in args.skews and E < 2:
        raise UsageError(f"--skews drift swaps neighbouring experts: it needs --experts >= 2, got {E}")
    if E % G and ("hot_groups" in args.skews or "hierarchical" in args.policies):
        raise UsageError(f"--groups ({G}) must divide --experts ({E}) for --skews hot_groups and --policies "
                         f"hierarchical (leave those out, or pick another --groups)")
    for W in args.gpus:
        if E % W:
            raise UsageError(f"--gpus {W} must divide --experts ({E}): the identity placement gives each GPU "
                             f"E / W experts")
        bad = [r for r in args.redundant if (E + r) % W]
        if bad:
            raise UsageError(f"--redundant {bad[0]}: --experts + --redundant ({E + bad[0]}) must be a multiple of "
                             f"--gpus {W} (every GPU holds the same number of slots)")
        N = max(1, W // args.gpus_per_node)
        if "hierarchical" in args.policies and (W % N or G % N):
            raise UsageError(f"--policies hierarchical with --gpus {W} on {N} nodes (--gpus-per-node "
                             f"{args.gpus_per_node}): the nodes must divide both --gpus and --groups ({G}); "
                             f"use --policies global, or other --gpus / --gpus-per-node / --groups")


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: flags checked first (one line, exit status 2, through run_cli)."""
    ap = OneLineParser(prog="bench_eplb.py", description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=256, help="logical experts E (default 256)")
    ap.add_argument("--groups", type=int, default=8,
                    help="expert groups (must divide --experts for hot_groups and the hierarchical policy)")
    ap.add_argument("--top-k", type=int, default=8, help="distinct experts per token (<= --experts)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (all GPUs together)")
    ap.add_argument("--window", type=int, default=16, help="steps recorded, then steps measured")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--gpus", type=_ints, default=[4, 8, 16, 32],
                    help="comma list of simulated GPU counts W, each dividing --experts and --experts + each "
                         "--redundant (default 4,8,16,32)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="nodes = max(1, W // this)")
    ap.add_argument("--redundant", type=_ints, default=[0, 32], help="comma list of redundant slots (>= 0)")
    ap.add_argument("--skews", type=_names(SKEWS), default=list(SKEWS), help=f"comma list of {list(SKEWS)}")
    ap.add_argument("--policies", type=_names(POLICIES), default=list(POLICIES),
                    help=f"comma list of {list(POLICIES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows to this path, as the record bench/common.py's write_record "
                                   "describes (bench 'eplb')")
    ap.add_argument("--plot", help="write a PNG of per-GPU load before/after (needs matplotlib)")
    args = ap.parse_args(argv)
    check_flags(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, plot = run(args)
    if args.json:
        write_record(args.json, "eplb", torch.device("cpu"), 1, {}, rows)
        print(f"wrote {args.json}")
    if args.plot:
        title = (f"EPLB, Zipf(1.0) over {args.experts} experts, top-{args.top_k}, {max(args.gpus)} GPUs: "
                 f"held-out per-GPU load")
        write_plot(plot, args.plot, max(args.gpus), title)


if __name__ == "__main__":
    run_cli(main, "bench_eplb.py")
