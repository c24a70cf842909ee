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
from nanomoe_fn.eplb import (  # noqa: E402
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


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (all GPUs together)")
    ap.add_argument("--window", type=int, default=16, help="steps recorded, then steps measured")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--gpus", type=_ints, default=[4, 8, 16, 32])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--redundant", type=_ints, default=[0, 32])
    ap.add_argument("--skews", type=lambda s: s.split(","), default=list(SKEWS))
    ap.add_argument("--policies", type=lambda s: s.split(","), default=["hierarchical", "global"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows in the bench/results schema to this path")
    ap.add_argument("--plot", help="write a PNG of per-GPU load before/after (needs matplotlib)")
    args = ap.parse_args(argv)
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
    main()
