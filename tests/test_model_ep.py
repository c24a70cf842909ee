"""Generation with expert parallelism over 2 gloo ranks equals single-rank generation, token for token.

Attention is data-parallel (each rank its own prompts), the experts are sharded by a placement (with
replicas), and every rank runs the same number of decode steps (the done check is an all-reduce): a rank
whose sequences stopped early, and a rank with no prompts at all, keep joining the MoE layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext
from nanomoe_fn.model.generate import generate
from nanomoe_fn.model.params import init_model_params
from nanomoe_fn.model.sampling import SamplingConfig
from tests import model_worker
from tests.helpers import spawn_bounded

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
CASES = [
    dict(seed=1, placement_seed=0, redundant=0, backend="bmm", paged=False, check_every=4, prompts=PROMPTS,
         sampling=dict(max_new_tokens=12, ignore_eos=True)),
    # sampled, paged, replicas of experts; stops on token 1 at different steps per sequence
    dict(seed=2, placement_seed=3, redundant=4, backend="loop", paged=True, check_every=2, prompts=PROMPTS[:3],
         sampling=dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=7, stop_tokens=[3, 4, 5])),
    # rank 1 has no prompts at all
    dict(seed=3, placement_seed=1, redundant=2, backend="bmm", paged=False, check_every=3, prompts=PROMPTS[:2],
         all_on_0=True, sampling=dict(max_new_tokens=6)),
]


def with_stops(case: dict, picks: list[tuple[int, int]]) -> dict:
    """The case with stop tokens taken from its own greedy run without stops: (sequence, step) picks, so
    sequences really stop, at different steps."""
    cfg = model_preset("tiny")
    params = init_model_params(cfg, torch.float32, seed=case["seed"])
    free = generate(params, case["prompts"], ModelContext(cfg), SamplingConfig(**case["sampling"]))
    stops = sorted({free[b][t] for b, t in picks})
    return {**case, "sampling": {**case["sampling"], "stop_tokens": stops, "ignore_eos": True}}


def test_ep_generation_equals_single_rank(tmp_path):
    W = 2
    cases = [*CASES, with_stops(CASES[0], [(0, 3), (2, 7)])]
    spawn_bounded(model_worker.run_generate, W, (W, free_port(), cases, str(tmp_path)), 240, "EP generation ranks")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(W)]
    cfg = model_preset("tiny")
    lengths = []
    for i, case in enumerate(cases):
        params = init_model_params(cfg, torch.float32, seed=case["seed"])
        s = SamplingConfig(**{**case["sampling"], "stop_tokens": tuple(case["sampling"].get("stop_tokens", ()))})
        if case.get("all_on_0"):
            want, got = generate(params, case["prompts"], ModelContext(cfg), s, paged=case["paged"]), ranks[0][i]
            assert ranks[1][i] == []
        else:
            got = [None] * len(case["prompts"])
            for r in range(W):
                got[r::W] = ranks[r][i]
            # sampling noise is drawn per rank for its own batch: compare each rank's batch with the same
            # batch generated on one rank
            want = [None] * len(case["prompts"])
            for r in range(W):
                want[r::W] = generate(params, case["prompts"][r::W], ModelContext(cfg), s, paged=case["paged"])
        assert got == want, f"case {i}"
        lengths.append([len(o) for o in got])
    assert lengths[-1][0] == 4 and lengths[-1][2] <= 8 and max(lengths[-1]) == 12  # the stops took effect
