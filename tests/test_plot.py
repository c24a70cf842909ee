"""bench/plot.py, run as its users run it (a subprocess; tests never import bench/): the README figures from the
real bench/results, and, on handcrafted results, the plotted series (its --data sidecar) equal the JSON's values."""

from __future__ import annotations

import importlib.util
import json
import os
import struct

import pytest

from tests.helpers import ROOT, run_commands

pytestmark = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                reason="matplotlib is not installed (pip install -e '.[plot]')")
FIGURES = ("expert_backends", "dispatch", "overlap", "eplb")
MAX_BYTES = 200 * 1024


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; AssertionError if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def check_png(path: str) -> None:
    """A valid PNG of a readable size (at least 800 x 350 px) and commit-ready (under 200 KB)."""
    w, h = png_size(path)
    assert w >= 800 and h >= 350, f"{path}: {w} x {h} px"
    assert 10_000 < os.path.getsize(path) < MAX_BYTES, f"{path}: {os.path.getsize(path)} bytes"


def record(bench: str, rows: list[dict], world_size: int = 1) -> dict:
    return {"bench": bench, "command": "handcrafted", "date": "2026-01-01", "device": "test", "world_size": world_size,
            "versions": {}, "ceilings": {}, "rows": rows}


V3 = {"hidden": 7168, "experts": 256, "top_k": 8, "dtype": "bfloat16", "world_size": 2}


def ffn_row(tokens: int, variant: str, us: float, floor: float) -> dict:
    return {"case": {"tokens": tokens, "experts": 32, "hidden": 7168, "intermediate": 2048, "expert_type": "swiglu"},
            "variant": variant, "median_us": us, "floor_us": floor, "roofline": floor / us}


def dispatch_row(phase: str, tokens: int, variant: str, **fields: float) -> dict:
    return {"case": {**V3, "phase": phase, "tokens": tokens}, "variant": variant, "median_us": fields["dispatch_us"],
            **fields}


def layer_row(comm: str, tokens: int, variant: str, us: float, **extra: float) -> dict:
    return {"case": {"phase": "decode", "tokens": tokens, "comm": comm, **V3}, "variant": variant, "median_us": us,
            **extra}


# one handcrafted file per figure (plus rows each figure must ignore)
INPUTS = {
    "expert_backends": {"expert_ffn_x.json": record("expert_ffn", [
        ffn_row(64, "triton", 700.0, 650.0), ffn_row(64, "bmm", 900.0, 650.0), ffn_row(1024, "triton", 1800.0, 930.0),
        ffn_row(1024, "bmm", 2100.0, 930.0),
        {**ffn_row(128, "triton", 500.0, 480.0), "case": {"tokens": 128, "hidden": 2048, "expert_type": "linear"}}])},
    "dispatch": {"dispatch_x.json": record("dispatch", [
        dispatch_row("decode", 128, "nvlink", dispatch_us=300.0, combine_us=200.0, b2b_dispatch_us=250.0,
                     b2b_combine_us=240.0, graph_dispatch_us=22.0, graph_combine_us=19.0),
        dispatch_row("decode", 128, "torch", dispatch_us=800.0, combine_us=500.0),
        dispatch_row("decode", 128, "nccl_a2a", dispatch_us=70.0, b2b_dispatch_us=52.0, b2b_combine_us=3.0),
        dispatch_row("prefill", 4096, "deepep", dispatch_us=1200.0, combine_us=880.0),
        dispatch_row("decode", 256, "nvlink", dispatch_us=1.0, combine_us=1.0),      # not the headline size
        dispatch_row("decode", 128, "deepep_raw", dispatch_us=1.0, combine_us=1.0),  # not a comm of ours
    ], world_size=2)},
    "overlap": {"layer_x.json": record("layer", [
        layer_row("nvlink", 32, "sequential", 2700.0), layer_row("nvlink", 32, "tbo", 4400.0, ideal_us=4500.0),
        layer_row("nvlink", 32, "shared_overlap", 2900.0), layer_row("nvlink", 32, "sequential+graph", 1500.0),
        layer_row("nvlink", 32, "tbo+graph", 2800.0, ideal_us=4500.0)], world_size=2)},
    "eplb": {"eplb_x.json": record("eplb", [
        {"case": {"skew": "zipf", "gpus": g, "redundant_slots": 0}, "variant": "identity", "balancedness": b}
        for g, b in ((4, 0.9), (8, 0.7))] + [
        {"case": {"skew": "zipf", "gpus": g, "redundant_slots": r, "policy": p}, "variant": "eplb", "balancedness": b}
        for g, r, p, b in ((4, 32, "global", 0.99), (8, 32, "global", 0.98), (8, 0, "global", 0.5),
                           (8, 32, "hierarchical", 0.4))] + [
        {"case": {"skew": "hot1", "tokens": 128, "phase": "decode"}, "variant": v, "median_us": us,
         "rows_per_rank": rows} for v, us, rows in (("identity", 3700.0, [900, 1100]), ("eplb_static", 3600.0,
                                                                                         [1001, 999]))])},
}

# what each figure must plot from INPUTS
EXPECTED = {
    "expert_backends": {"ffn": {"bmm": {"tokens": [64, 1024], "us": [900.0, 2100.0]},
                                "triton": {"tokens": [64, 1024], "us": [700.0, 1800.0]},
                                "floor": {"tokens": [64, 1024], "us": [650.0, 930.0]}}},
    "dispatch": {"decode": {
        "torch": {"source": "dispatch_x.json", "eager": {"dispatch_us": 800.0, "combine_us": 500.0}},
        "nvlink": {"source": "dispatch_x.json", "eager": {"dispatch_us": 300.0, "combine_us": 200.0},
                   "b2b": {"dispatch_us": 250.0, "combine_us": 240.0}, "graph": {"dispatch_us": 22.0,
                                                                                "combine_us": 19.0}},
        "nccl_a2a": {"source": "dispatch_x.json", "eager": {"dispatch_us": 70.0, "combine_us": None},
                     "b2b": {"dispatch_us": 52.0, "combine_us": None}}},
        "prefill": {"deepep": {"source": "dispatch_x.json", "eager": {"dispatch_us": 1200.0, "combine_us": 880.0}}}},
    "overlap": {"panels": [{"source": "layer_x.json", "groups": [
        {"label": "nvlink\ndecode 32", "us": {"sequential": 2700.0, "tbo": 4400.0, "shared_overlap": 2900.0},
         "ideal_us": 4500.0},
        {"label": "nvlink\ndecode 32\nCUDA graph", "us": {"sequential": 1500.0, "tbo": 2800.0}, "ideal_us": 4500.0}]}]},
    "eplb": {"simulated": {"zipf": {"gpus": [4, 8], "identity": [0.9, 0.7], "eplb": [0.99, 0.98]}},
             "eplb_label": "EPLB global, +32 redundant",
             "layer": [{"label": "hot1, decode 128", "rows_per_rank": {"identity": [900, 1100],
                                                                      "eplb_static": [1001, 999]},
                        "us": {"identity": 3700.0, "eplb_static": 3600.0}}]},
}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str]:
    out = tmp_path_factory.mktemp("plot_real")
    res = run_commands({0: ["bench/plot.py", "--out", str(out / "figs"), "--data", str(out / "data")]})[0]
    assert res.returncode == 0, res.stderr
    return res, str(out)


def test_real_results_make_every_figure(real_run):
    res, out = real_run
    for name in FIGURES:
        check_png(os.path.join(out, "figs", f"{name}.png"))
        with open(os.path.join(out, "data", f"{name}.json")) as f:
            side = json.load(f)
        assert side["figure"] == name and side["sources"], side
        for src in side["sources"]:  # every named source is a results file
            assert os.path.isfile(os.path.join(ROOT, "bench", "results", src)), src
        assert f"wrote {os.path.join(out, 'figs', name + '.png')}" in res.stdout


def test_real_results_values(real_run):
    """Spot checks against the files: the newest run per comm, the FFN floor, the layer schedules."""
    _, out = real_run

    def side(name: str) -> dict:
        with open(os.path.join(out, "data", f"{name}.json")) as f:
            return json.load(f)["data"]

    def rows(name: str) -> list[dict]:
        with open(os.path.join(ROOT, "bench", "results", name)) as f:
            return json.load(f)["rows"]

    dispatch = side("dispatch")
    assert set(dispatch["decode"]) == {"torch", "torch_fixed", "nvlink", "deepep", "deepep_ll", "nccl_a2a"}
    assert set(dispatch["prefill"]) == {"torch", "nvlink", "deepep", "nccl_a2a"}  # the decode-only comms refuse it
    for phase, tokens in (("decode", 128), ("prefill", 4096)):
        for comm, got in dispatch[phase].items():  # every bar is its source file's row
            (row,) = [r for r in rows(got["source"]) if r["variant"] == comm and r["case"]["tokens"] == tokens
                      and r["case"]["hidden"] == 7168]
            assert got["eager"]["dispatch_us"] == row["dispatch_us"] and got["eager"]["combine_us"] == (
                None if comm == "nccl_a2a" else row["combine_us"]), (phase, comm)
            assert ("graph" in got) == ("graph_dispatch_us" in row)
    assert dispatch["decode"]["nvlink"]["source"] == "dispatch_torch_decode_run51_h200x2.json"  # run 51, the newest
    assert dispatch["decode"]["torch_fixed"]["source"] == "dispatch_headline_final_nvlink_h200x2.json"  # run 13
    ffn = {(r["case"]["tokens"], r["variant"]): r for r in rows("expert_ffn_h200.json")}
    got = side("expert_backends")
    assert got["ffn"]["triton"]["us"] == [ffn[(t, "triton")]["median_us"] for t in (64, 256, 1024, 4096)]
    assert got["ffn"]["floor"]["us"] == [ffn[(t, "triton")]["floor_us"] for t in (64, 256, 1024, 4096)]
    graph = {r["variant"]: r["median_us"] for r in rows("ep_moe_v3_e32_t64_graph_h200.json")}
    assert {b: got["layer"][b]["us"][0] for b in ("loop", "bmm", "triton", "deepgemm")} == {
        "loop": graph["loop"], "bmm": graph["batched_gemm"], "triton": graph["triton"], "deepgemm": graph["deepgemm"]}
    panel = side("overlap")["panels"][0]  # run 54: nvlink decode 32/128/256 eager and graph, prefill 4096/16384
    assert panel["source"] == "layer_nvlink_run54_h200x2.json" and len(panel["groups"]) == 8
    first = {r["variant"]: r["median_us"] for r in rows("layer_nvlink_run54_h200x2.json")[:6]
             if r["variant"] in ("sequential", "shared_overlap", "shared_stream", "tbo", "tbo+shared")}
    assert panel["groups"][0]["us"] == first and len(first) == 5


def test_committed_figures_are_commit_ready():
    """docs/figures holds every figure, made by bench/plot.py from bench/results."""
    for name in FIGURES:
        check_png(os.path.join(ROOT, "docs", "figures", f"{name}.png"))


def test_handcrafted_results_are_plotted_exactly(tmp_path):
    commands = {}
    for name, files in INPUTS.items():
        for fname, rec in files.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / fname).write_text(json.dumps(rec))
        commands[name] = ["bench/plot.py", "--results", str(tmp_path / name), "--out", str(tmp_path / name / "figs"),
                          "--data", str(tmp_path / name / "data")]
    for name, res in run_commands(commands).items():
        assert res.returncode == 0, res.stderr
        check_png(str(tmp_path / name / "figs" / f"{name}.png"))
        side = json.loads((tmp_path / name / "data" / f"{name}.json").read_text())
        assert side["sources"] == list(INPUTS[name]) and side["data"] == EXPECTED[name], side
        others = [n for n in FIGURES if n != name]  # the other figures have no input: skipped, each with a message
        assert sorted(os.listdir(tmp_path / name / "figs")) == [f"{name}.png"]
        assert all(f"skip {n}: no input in " in res.stdout for n in others), res.stdout


def test_bad_inputs_and_missing_matplotlib(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "layer_broken.json").write_text("{not json")
    (tmp_path / "results" / "eplb_x.json").write_text(json.dumps(INPUTS["eplb"]["eplb_x.json"]))
    (tmp_path / "fake" / "matplotlib").mkdir(parents=True)  # shadows the real one
    (tmp_path / "fake" / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    res = run_commands({key: (["bench/plot.py", "--results", str(tmp_path / results), "--out", str(tmp_path / key),
                                *extra], env) for key, results, extra, env in (
        ("only", "results", ["--only", "eplb"], {}), ("all", "results", [], {}),
        ("none", "results", [], {"PYTHONPATH": str(tmp_path / "fake")}), ("nofolder", "missing", [], {}))})
    assert res["only"].returncode == 0 and res["only"].stdout.count("wrote ") == 1, res["only"]
    assert "skip" not in res["only"].stdout and os.listdir(tmp_path / "only") == ["eplb.png"]
    assert res["all"].returncode == 0 and "skip overlap: no input" in res["all"].stdout
    assert "plot: skipping " in res["all"].stderr and "layer_broken.json" in res["all"].stderr
    assert os.listdir(tmp_path / "all") == ["eplb.png"]
    assert not os.path.exists(tmp_path / "none") and not os.path.exists(tmp_path / "nofolder")
    for key, words in (("none", "matplotlib is not installed"), ("nofolder", "is not a folder")):
        lines = res[key].stderr.strip().splitlines()
        assert res[key].returncode == 1 and len(lines) == 1 and words in lines[0], res[key].stderr
