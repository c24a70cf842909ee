"""Figures for the README from the measured JSON files in bench/results/; each names its sources in a footnote.

    python bench/plot.py [--results bench/results] [--out docs/figures] [--only NAME] [--data DIR]

NAME.png: expert_backends (expert_ffn*.json, ep_moe_*.json: the expert backends vs tokens at DeepSeek-V3 dims
with the roofline floor), dispatch (dispatch_*.json: dispatch + combine per comm, decode and prefill),
overlap (layer_*.json: two-batch and shared-expert overlap vs sequential), eplb (eplb*.json: expert load
before and after EPLB). A figure whose inputs are missing is skipped with a message. --data DIR also writes
DIR/NAME.json, the plotted series. Needs matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3 = {"hidden": 7168, "experts": 256, "top_k": 8}
# dispatch files, oldest run first (runs 12, 12, 13, 16, 18, 42, 47, 48, 49, 49, 51, 51 of gpu_tests_h200.md): a
# later run's row for the same comm and phase replaces an earlier one's; files not named here count as newer, by name
DISPATCH_RUNS = ("dispatch_headline_h200x2.json", "dispatch_headline_peers_h200x2.json",
                 "dispatch_headline_final_nvlink_h200x2.json", "dispatch_headline_deepep_h200x2.json",
                 "dispatch_headline_torch_s6_h200x2.json", "dispatch_fp8_h200x2.json",
                 "dispatch_torch_decode_run47_h200x2.json", "dispatch_torch_decode_run48_h200x2.json",
                 "dispatch_torch_decode_run49_h200x2.json", "dispatch_torch_decode_run49b_h200x2.json",
                 "dispatch_torch_decode_distbarrier_run51_h200x2.json", "dispatch_torch_decode_run51_h200x2.json")
COMMS = ("torch", "torch_fixed", "nvlink", "deepep", "deepep_ll", "nccl_a2a")
TIMINGS = {"eager": ("", "eager, barrier before each call"), "b2b": ("b2b_", "back to back"),
           "graph": ("graph_", "CUDA graph replays")}
HEADLINE_TOKENS = {"decode": 128, "prefill": 4096}
SCHEDULES = ("sequential", "shared_overlap", "shared_stream", "tbo", "tbo+shared")
# the layer files the overlap figure draws, one panel each (run 54 of gpu_tests_h200.md: exchange streams)
OVERLAP_RUNS = ("layer_nvlink_run54_h200x2.json", "layer_torch_prefill_run54_h200x2.json")
# legend order, one color each; the peer drawn beside them (the other peer rows of the JSON stay in the JSON)
BACKENDS = ("loop", "bmm", "deepgemm", "triton+align", "triton", "floor", "sglang")
BACKEND_NAMES = {"batched_gemm": "bmm", "fused_moe": "triton"}  # the benches' mode names


def rows(results: str, pattern: str, key: Callable | None = None) -> list[tuple[str, dict, dict, dict]]:
    """(path, record, row, case) of each row in results/pattern files, by name or key(path); bad files skipped."""
    out = []
    for path in sorted(glob.glob(os.path.join(results, pattern)), key=key):
        try:
            rec = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            print(f"plot: skipping {path}: {err}", file=sys.stderr)
            continue
        found = rec.get("rows") if isinstance(rec, dict) else None
        out += [(path, rec, r, r.get("case", {})) for r in found or [] if isinstance(r, dict) and "variant" in r]
    return out


def expert_data(results: str) -> tuple[dict, list[str]]:
    """{"ffn"|"layer": {backend or "floor": {"tokens", "us"}}}, sources. ffn: the expert FFN alone (a later file
    replaces an earlier one's point); layer: the one-GPU MoE layer, floor = median * roofline; where two runs
    hold a point, a run that timed CUDA graphs (rows with a `cuda_graph` field) wins, then the faster one."""
    ffn, best, layer, used = {}, {}, {}, set()
    for path, _, r, c in rows(results, "expert_ffn*.json"):
        if c.get("hidden") == 7168 and c.get("expert_type") == "swiglu" and "floor_us" in r \
                and r["variant"] in BACKENDS:
            ffn.setdefault(r["variant"], {})[c["tokens"]] = r["median_us"]
            ffn.setdefault("floor", {})[c["tokens"]] = r["floor_us"]
            used.add(path)
    for path, rec, r, c in rows(results, "ep_moe_*.json"):
        if rec.get("world_size") == 1 and c.get("hidden") == 7168 and c.get("expert_type") == "swiglu" \
                and r.get("roofline"):
            cand = ("cuda_graph" not in c, r["median_us"], r["median_us"] * r["roofline"], path)
            key = (BACKEND_NAMES.get(r["variant"], r["variant"]), c["tokens"])
            best[key] = min(best.get(key, cand), cand)
    for (backend, tokens), (_, us, floor, path) in sorted(best.items()):
        layer.setdefault(backend, {})[tokens] = us
        layer.setdefault("floor", {}).setdefault(tokens, floor)
        used.add(path)
    order = {b: i for i, b in enumerate(BACKENDS)}
    return {name: {k: {"tokens": sorted(panel[k]), "us": [panel[k][t] for t in sorted(panel[k])]}
                   for k in sorted(panel, key=lambda b: (order.get(b, 3), b))}
            for name, panel in (("ffn", ffn), ("layer", layer)) if panel}, sorted(used)


def dispatch_data(results: str) -> tuple[dict, list[str]]:
    """{phase: {comm: {"source", timing: {"dispatch_us", "combine_us"}}}}, sources: DeepSeek-V3 sizes at the
    headline tokens per rank, the newest run of each comm and phase (DISPATCH_RUNS). nccl_a2a, one
    all_to_all_single of the (token, k) rows, has no combine (None)."""
    rank = {name: i for i, name in enumerate(DISPATCH_RUNS)}
    data: dict[str, dict] = {}
    for path, _, r, c in rows(results, "dispatch_*.json", lambda p: (rank.get(os.path.basename(p), len(rank)), p)):
        if any(c.get(k) != v for k, v in V3.items()) or HEADLINE_TOKENS.get(c.get("phase")) != c.get("tokens") \
                or r["variant"] not in COMMS:
            continue
        data.setdefault(c["phase"], {})[r["variant"]] = {"source": os.path.basename(path)} | {
            t: {"dispatch_us": r[f"{pre}dispatch_us"], "combine_us": None if r["variant"] == "nccl_a2a"
                else r.get(f"{pre}combine_us")} for t, (pre, _) in TIMINGS.items() if f"{pre}dispatch_us" in r}
    data = {ph: {k: data[ph][k] for k in COMMS if k in data[ph]} for ph in HEADLINE_TOKENS if ph in data}
    return data, sorted({os.path.join(results, e["source"]) for ph in data.values() for e in ph.values()})


def overlap_data(results: str) -> tuple[dict, list[str]]:
    """{"panels": [{"source", "groups": [{"label", "us": {schedule: median_us}, "ideal_us"}]}]}, sources: one
    panel per file of OVERLAP_RUNS (every layer_*.json file, by name, where none of those is there), one group
    per (comm, phase, tokens, graph or eager)."""
    found = rows(results, "layer_*.json")
    found = [f for f in found if os.path.basename(f[0]) in OVERLAP_RUNS] or found
    order = {name: i for i, name in enumerate(OVERLAP_RUNS)}
    panels: dict[str, dict] = {}
    for path, _, r, c in sorted(found, key=lambda f: (order.get(os.path.basename(f[0]), len(order)), f[0])):
        name, graph = r["variant"].removesuffix("+graph"), r["variant"].endswith("+graph")
        if name in SCHEDULES:
            label = f"{c.get('comm')}\n{c.get('phase')} {c.get('tokens')}" + ("\nCUDA graph" if graph else "")
            g = panels.setdefault(path, {}).setdefault((c.get("comm"), c.get("phase"), c.get("tokens"), graph),
                                                       {"label": label, "us": {}, "ideal_us": None})
            g["us"][name] = r["median_us"]
            g["ideal_us"] = r.get("ideal_us", g["ideal_us"])
    out = [{"source": os.path.basename(p), "groups": list(g.values())} for p, g in panels.items()]
    return ({"panels": out} if out else {}), list(panels)


def eplb_data(results: str) -> tuple[dict, list[str]]:
    """{"simulated": {skew: {"gpus", "identity", "eplb"}}, "eplb_label", "layer": [{"label", "rows_per_rank":
    {variant: [...]}, "us": {variant: median}}]}, sources. simulated: balancedness (mean / max GPU load) of the
    identity placement and of EPLB's global policy with the most redundant slots; layer: rows each rank got."""
    sim, layer, used, data = {}, {}, set(), {}
    found = rows(results, "eplb*.json")
    most = max((c.get("redundant_slots", 0) for _, _, _, c in found if "gpus" in c), default=0)
    for path, _, r, c in found:
        after = r["variant"] == "eplb" and c.get("policy") == "global" and c.get("redundant_slots") == most
        if "gpus" in c and "balancedness" in r and (r["variant"] == "identity" or after):
            sim.setdefault(c["skew"], {"identity": {}, "eplb": {}})["eplb" if after else "identity"][c["gpus"]] = \
                r["balancedness"]
            used.add(path)
        elif "rows_per_rank" in r:
            g = layer.setdefault((c.get("skew"), c.get("tokens")), {
                "label": f"{c.get('skew')}, {c.get('phase')} {c.get('tokens')}", "rows_per_rank": {}, "us": {}})
            g["rows_per_rank"][r["variant"]] = r["rows_per_rank"]
            g["us"][r["variant"]] = r.get("median_us")
            used.add(path)
    for skew, s in sim.items():
        gpus = sorted(set(s["identity"]) & set(s["eplb"]))
        data.setdefault("simulated", {})[skew] = {"gpus": gpus, **{k: [s[k][g] for g in gpus] for k in s}}
        data["eplb_label"] = f"EPLB global, +{most} redundant"
    return data | ({"layer": list(layer.values())} if layer else {}), sorted(used)


def _footnote(fig: object, sources: list[str], note: str = "") -> float:
    """Source files (relative to the repository when inside it) in small print at the bottom -> its height."""
    names = [os.path.relpath(p, ROOT) if os.path.abspath(p).startswith(ROOT + os.sep) else p for p in sources]
    lines = textwrap.wrap("source: " + ", ".join(names) + (f". {note}" if note else ""), 190)
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=6.5, va="bottom", color="0.25")
    return (len(lines) * 9 / 72 + 0.12) / fig.get_size_inches()[1]


def _style(ax: object, title: str, ylabel: str, ticks: list[str] | None = None, plt: object = None) -> None:
    """Title, y label, category tick labels (with plt: plain-number log-x ticks at these x values), a grid."""
    ax.set(title=title, ylabel=ylabel)
    if plt is not None:
        ax.set(xscale="log", xticks=ticks)
        plain = plt.FuncFormatter(lambda v, _: f"{v:g}")
        for set_format in (ax.xaxis.set_major_formatter, ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            set_format(plain)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    elif ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.margins(y=0.12)
    ax.grid(True, axis="y" if plt is None else "both", alpha=0.3)


def draw_expert_backends(plt: object, data: dict, sources: list[str]) -> tuple[object, float]:
    """Log-log time vs tokens per backend, one panel per source kind, the floor dashed."""
    titles = {"ffn": "expert FFN alone (bench_expert_ffn.py)", "layer": "whole MoE layer, one GPU (bench_ep_moe.py)"}
    colors = dict(zip(BACKENDS, ("tab:green", "tab:red", "tab:orange", "tab:cyan", "tab:blue", "black", "tab:purple")))
    fig, axes = plt.subplots(1, len(data), figsize=(11, 4.6), squeeze=False)
    for ax, (name, panel) in zip(axes[0], data.items()):
        for backend, s in panel.items():
            style = dict(ls="--", lw=1.2, label="roofline floor") if backend == "floor" else dict(marker="o", ms=4)
            ax.plot(s["tokens"], [u / 1e3 for u in s["us"]], color=colors.get(backend), **{"label": backend, **style})
        ax.set(yscale="log", xlabel="tokens")
        _style(ax, titles[name], "median ms", sorted({t for s in panel.values() for t in s["tokens"]}), plt)
        ax.legend(fontsize=8)
    fig.suptitle("Expert backends on one H200, bf16, DeepSeek-V3 experts (H 7168, I 2048), 32 local, top-8")
    return fig, _footnote(fig, sources, "floor = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both "
                          "measured in the run; triton and deepgemm in the layer panel are CUDA-graph replays")


def draw_dispatch(plt: object, data: dict, sources: list[str]) -> tuple[object, float]:
    """Stacked dispatch (solid) + combine (hatched) bars per comm, one bar per timing mode."""
    colors = dict(zip(TIMINGS, ("tab:blue", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(1, len(data), figsize=(12, 4.8), squeeze=False)
    width = 0.8 / len(TIMINGS)
    for ax, (phase, comms) in zip(axes[0], data.items()):
        for x, entry in enumerate(comms.values()):
            for timing in (t for t in TIMINGS if t in entry):
                d, c = entry[timing]["dispatch_us"], entry[timing]["combine_us"] or 0.0
                pos = x - 0.4 + width * (list(TIMINGS).index(timing) + 0.5)
                ax.bar(pos, d, width, color=colors[timing])
                ax.bar(pos, c, width, bottom=d, color=colors[timing], alpha=0.45, hatch="//")
                ax.text(pos, d + c, f"{d + c:.0f}", ha="center", va="bottom", fontsize=6.5, rotation=90)
        _style(ax, f"{phase}, {HEADLINE_TOKENS[phase]} tokens/rank", "dispatch + combine (hatched), median us",
               [k.replace("deepep_ll", "deepep\nlow_latency") for k in comms])
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[t]) for t in TIMINGS]
    axes[0, 0].legend(handles, [label for _, label in TIMINGS.values()], fontsize=8, loc="upper right")
    fig.suptitle("Dispatch + combine per rank on 2 H200s, bf16, DeepSeek-V3 sizes (H 7168, 256 experts, top-8)")
    picked = "; ".join(f"{f}: " + ", ".join(f"{k} {ph}" for ph, cs in data.items() for k, e in cs.items()
                                            if e["source"] == f)
                       for f in dict.fromkeys(e["source"] for cs in data.values() for e in cs.values()))
    return fig, _footnote(fig, sources, f"Newest run per comm and phase ({picked}). nccl_a2a: one "
                          "all_to_all_single of the (token, k) rows, dispatch only; deepep = normal mode")


def draw_overlap(plt: object, data: dict, sources: list[str]) -> tuple[object, float]:
    """Grouped bars of the per-call median per schedule, speed-up vs sequential on top, TBO's ideal as a tick."""
    panels, width = data["panels"], 0.8 / len(SCHEDULES)
    colors = dict(zip(SCHEDULES, ("tab:grey", "tab:cyan", "tab:blue", "tab:red", "tab:purple")))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels) + 0.8), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for x, g in enumerate(panel["groups"]):
            seq = g["us"].get("sequential")
            for i, name in ((i, n) for i, n in enumerate(SCHEDULES) if n in g["us"]):
                pos, ms = x - 0.4 + width * (i + 0.5), g["us"][name] / 1e3
                ax.bar(pos, ms, width, color=colors[name], label=name if x == 0 else None)
                if seq and name != "sequential":
                    ax.text(pos, ms, f"{seq / g['us'][name]:.2f}x", ha="center", va="bottom", fontsize=6, zorder=3,
                            bbox={"fc": "white", "ec": "none", "pad": 0.3, "alpha": 0.8})
                if g["ideal_us"] and name.startswith("tbo"):
                    ax.plot([pos - width / 2, pos + width / 2], [g["ideal_us"] / 1e3] * 2, color="black", lw=1.5,
                            label="tbo ideal (stage model)" if x == 0 and name == "tbo" else None)
        _style(ax, panel["source"], "per-call median ms", [g["label"] for g in panel["groups"]])
        ax.margins(y=0.25)  # room for the legend above the tallest bars
        ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.suptitle("MoE layer schedules on 2 H200s (DeepSeek-V3 MoE, triton experts); labels: speed-up vs sequential")
    return fig, _footnote(fig, sources, "tbo = two-batch overlap, shared_overlap = shared experts in the dispatch "
                          "window, shared_stream = on their own stream from the start; exchanges of overlapped "
                          "schedules on side streams; a barrier before each call, slowest rank; tbo ideal = 2 x "
                          "max(compute, comm) of the half-batch stages (eager: each timed alone; graph: GPU time) "
                          "+ the split")


def _eplb_layer(ax: object, groups: list[dict]) -> None:
    variants = list(dict.fromkeys(v for g in groups for v in g["rows_per_rank"]))
    colors = dict(zip(variants, ("tab:grey", "tab:blue", "tab:green", "tab:orange", "tab:red")))
    width = 0.8 / len(variants)
    for x, g in enumerate(groups):
        for i, v in enumerate(variants):
            rows = g["rows_per_rank"].get(v) or []
            for rk, n in enumerate(rows):
                w = width / len(rows)
                ax.bar(x - 0.4 + width * i + w * (rk + 0.5), n / (sum(rows) / len(rows)), w * 0.9, color=colors[v],
                       edgecolor="black", lw=0.3, label=v if x == 0 and rk == 0 else None)
    ax.axhline(1.0, color="black", lw=0.8)
    _style(ax, "2 H200s, DeepSeek-V3 MoE layer (bench_eplb_layer.py)", "rows a rank received / mean (a bar per rank)",
           [g["label"] for g in groups])
    ax.set_ylim(0.8, None)
    ax.legend(fontsize=8)


def draw_eplb(plt: object, data: dict, sources: list[str]) -> tuple[object, float]:
    """Simulated balancedness vs GPUs per skew; per-rank rows / mean per placement in the 2-GPU layer."""
    names = [k for k in ("simulated", "layer") if k in data]
    fig, axes = plt.subplots(1, len(names), figsize=(12, 4.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        if name == "layer":
            _eplb_layer(ax, data["layer"])
            continue
        for (skew, s), color in zip(data["simulated"].items(), plt.get_cmap("tab10").colors):
            ax.plot(s["gpus"], s["identity"], ls="--", marker="x", color=color, label=f"{skew}: identity")
            ax.plot(s["gpus"], s["eplb"], marker="o", color=color, label=f"{skew}: {data['eplb_label']}")
        _style(ax, "EPLB simulation, 256 experts, top-8 (bench_eplb.py)", "balancedness (mean / max GPU load)",
               sorted({g for s in data["simulated"].values() for g in s["gpus"]}), plt)
        ax.set(xlabel="simulated GPUs", ylim=(0, 1.05))
        ax.legend(fontsize=6.5, ncol=2)
    fig.suptitle("Expert load before (identity placement) and after EPLB")
    return fig, _footnote(fig, sources)


FIGURES: dict[str, tuple[Callable, Callable, str]] = {
    "expert_backends": (expert_data, draw_expert_backends, "expert_ffn*.json or ep_moe_*.json at V3 dims"),
    "dispatch": (dispatch_data, draw_dispatch, "dispatch_*.json rows at V3 sizes, 128 / 4096 tokens per rank"),
    "overlap": (overlap_data, draw_overlap, "layer_*.json"),
    "eplb": (eplb_data, draw_eplb, "eplb*.json"),
}


def main(argv: list[str] | None = None) -> None:
    """Parse flags, draw each figure whose inputs exist, skip the others with a message."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"), help="folder of JSON results")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"), help="folder for the PNGs")
    p.add_argument("--only", choices=sorted(FIGURES), help="draw this figure only")
    p.add_argument("--data", help="also write each figure's plotted series to DIR/NAME.json")
    args = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench/plot.py: error: matplotlib is not installed (pip install -e '.[plot]')")
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"axes.titlesize": 10, "figure.titlesize": 12})
    import matplotlib.pyplot as plt

    if not os.path.isdir(args.results):
        sys.exit(f"bench/plot.py: error: --results {args.results} is not a folder")
    os.makedirs(args.out, exist_ok=True)
    for name, (collect, draw, needs) in FIGURES.items():
        if args.only not in (None, name):
            continue
        data, sources = collect(args.results)
        if not data:
            print(f"skip {name}: no input in {args.results} (needs {needs})")
            continue
        fig, bottom = draw(plt, data, sources)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        path = os.path.join(args.out, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        if args.data:
            os.makedirs(args.data, exist_ok=True)
            Path(args.data, f"{name}.json").write_text(json.dumps(
                {"figure": name, "sources": [os.path.basename(s) for s in sources], "data": data}, indent=1))
        print(f"wrote {path} ({os.path.getsize(path) // 1024} KB) from {len(sources)} file(s)")


if __name__ == "__main__":
    main()
