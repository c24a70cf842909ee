"""bench/bench_eplb_layer.py on 2 gloo ranks at tiny sizes: it runs, checks itself and writes the schema;
and the skewed routing it draws (nanomoe_fn/eplb/skew.py) follows the skew.

The bench runs as a user runs it, in a subprocess (tests never import bench/); its command lines share
one fixture and run side by side.

Dimension legend: T tokens per rank, E experts, R redundant slots, W ranks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanomoe_fn.eplb.skew import draw_routing
from tests.helpers import run_commands

SKEWS = ["zipf1.0", "hot1"]
VARIANTS = ["identity", "eplb_static", "eplb_dynamic", "weight_move"]
BENCH = ["bench/bench_eplb_layer.py", "--backend", "gloo"]
REFUSED = {  # (flags, a part of the one-line message)
    "divide": (["--num-experts", "8", "--redundant", "1"], "divide"),
    "skews": (["--skews", "zipfx"], "skews"),
    "top_k": (["--num-experts", "4", "--top-k", "8"], "top-k"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The gloo run and the refused command lines, side by side."""
    out = tmp_path_factory.mktemp("eplb_layer") / "eplb.json"
    cmds = {key: [*BENCH, *flags] for key, (flags, _) in REFUSED.items()}
    cmds["run"] = [*BENCH, "--world-size", "2", "--hidden-dim", "32", "--intermediate-dim", "16", "--num-experts", "8",
                   "--top-k", "2", "--tokens", "16,0", "--redundant", "2", "--iters", "2", "--warmup", "1",
                   "--move-reps", "2", "--chunk-experts", "1", "--json", str(out)]
    return {"json": out, **run_commands(cmds)}


@pytest.mark.slow
def test_bench_eplb_layer_gloo(runs):
    assert runs["run"].returncode == 0, runs["run"].stderr[-2000:]
    rec = json.loads(runs["json"].read_text())
    assert rec["bench"] == "eplb" and rec["world_size"] == 2 and rec["device"] == "cpu"
    assert rec["ceilings"]["hbm_gbps"] > 0
    cases = {(r["case"]["skew"], r["case"]["tokens"]) for r in rec["rows"]}
    assert cases == {(s, t) for s in SKEWS for t in (16, 0)}, cases
    for skew in SKEWS:
        for T in (16, 0):
            rows = {r["variant"]: r for r in rec["rows"] if (r["case"]["skew"], r["case"]["tokens"]) == (skew, T)}
            assert sorted(rows) == sorted(VARIANTS), (skew, T, sorted(rows))
            for v, row in rows.items():
                assert math.isfinite(row["median_us"]) and row["median_us"] > 0, (skew, T, v, row)
                assert row["case"]["experts"] == 8 and row["case"]["redundant"] == 2
            move = rows["weight_move"]
            assert move["weights_exact"] and move["roundtrip_exact"]
            assert move["gb_moved"] >= 0 and move["rounds"] >= 0 and move["back_median_us"] > 0
            for v in ("eplb_static", "eplb_dynamic"):
                row = rows[v]
                assert row["speedup_vs"]["identity"] > 0
                # the output-unchanged check ran: identity vs EPLB placement on the same tokens, float32
                assert 0 <= row["rel_err_vs_identity"] <= 1e-4
            for v in ("identity", "eplb_static", "eplb_dynamic"):
                row = rows[v]
                assert row["checked_tokens"] == min(2, T)
                assert 0 <= row["rel_err_vs_reference"] <= 1e-4
                assert sum(row["rows_per_rank"]) == 2 * T * 2  # every (token, k) pair of both ranks, once
                assert 0 < row["balancedness"] <= 1 and row["max_over_mean"] >= 1
    # the load is skewed: at 16 tokens the identity placement is unbalanced, and EPLB's dynamic remap is
    # at least as balanced (it deals each expert's pairs evenly over its replicas)
    for skew in SKEWS:
        rows = {r["variant"]: r for r in rec["rows"] if (r["case"]["skew"], r["case"]["tokens"]) == (skew, 16)}
        assert rows["identity"]["balancedness"] < 1.0, rows["identity"]
        assert rows["eplb_dynamic"]["balancedness"] >= rows["identity"]["balancedness"], rows


def test_drawn_routing_follows_the_skew():
    T, E, k = 2000, 16, 4
    cpu = torch.device("cpu")
    hot = draw_routing("hot1", T, E, k, seed=3, rank=0, device=cpu)
    ids = hot.topk_ids
    h = int(ids[0, 0])
    assert bool((ids == h).any(-1).all()), "every token must pick the hot expert"
    assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all()), "experts of a token must be distinct"
    others = torch.bincount(ids[ids != h], minlength=E).double()
    others = torch.cat([others[:h], others[h + 1:]])
    assert float(others.max() / others.mean()) < 1.5, "the other experts must be drawn uniformly"
    assert torch.allclose(hot.topk_weights.sum(-1), torch.ones(T)) and bool((hot.topk_weights > 0).all())
    # the same hot expert on every rank, different tokens' draws
    other_rank = draw_routing("hot1", T, E, k, seed=3, rank=1, device=cpu).topk_ids
    assert bool((other_rank == h).any(-1).all()) and not torch.equal(other_rank, ids)
    zipf = draw_routing("zipf1.0", T, E, k, seed=3, rank=0, device=cpu).topk_ids
    counts = torch.bincount(zipf.flatten(), minlength=E).sort(descending=True).values.double()
    assert float(counts[0] / counts[-1]) > 4, counts  # skewed: popular experts far above unpopular ones
    with pytest.raises(ValueError, match="skew"):
        draw_routing("flat", T, E, k, seed=3, rank=0, device=cpu)


def test_bench_eplb_layer_rejects_bad_flags(runs):
    for key, (_, part) in REFUSED.items():
        proc = runs[key]
        assert proc.returncode == 1 and proc.stdout == "", (key, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and part in proc.stderr, (key, proc.stderr)
