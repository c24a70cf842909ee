"""The stream plan of a schedule (nanomoe_fn/pipeline/streams.py): which lane runs each step, which events
order the lanes.

- Sequential plans keep every step on the caller's stream (no events); an exchange with work in its window
  (the shared experts after dispatch's send, two-batch overlap's other micro-batch) runs on its
  micro-batch's exchange stream; a stage that names a stream (the shared experts) runs on its own, from as
  early as its reads allow.
- On drawn programs and schedules, every value a step reads was written before it in the happens-before
  order that the plan's lanes, fork, events and join give (simulated here on the CPU; the GPU runs are
  tests/gpu/test_pipeline_gpu.py), and an event is recorded only where another lane waits for it.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe_fn.decoder import DECODER_MOE_PROGRAM
from nanomoe_fn.moe.layer import MOE_PROGRAM
from nanomoe_fn.pipeline import Program, Stage, sequential, shared_expert_overlap, two_batch_overlap
from nanomoe_fn.pipeline.streams import stream_plan


def _lanes(plan) -> dict:
    return {(mb, s.name): lane for (mb, s), lane in zip(plan.steps, plan.streams.lanes)}


def test_sequential_runs_everything_on_the_callers_stream():
    sp = sequential(MOE_PROGRAM).streams
    assert set(sp.lanes) == {0} and sp.side_lanes == () and not any(sp.records) and not any(sp.waits)


def test_shared_overlap_moves_only_the_dispatch_onto_an_exchange_stream():
    plan = sequential(shared_expert_overlap(MOE_PROGRAM))
    lanes = _lanes(plan)
    assert lanes[(0, "dispatch_send")] == lanes[(0, "dispatch_recv")] == 1
    assert {name for (_, name), lane in lanes.items() if lane == 0} == {
        "route", "shared", "experts", "combine_send", "combine_recv", "add"}
    names = [s.name for _, s in plan.steps]
    waits = {names[i]: [names[w] for w in ws] for i, ws in enumerate(plan.streams.waits) if ws}
    # the send waits for route (its routing); experts waits for the recv; combine_send's handle needs no
    # second wait (its lane already waited for that recv)
    assert waits == {"dispatch_send": ["route"], "experts": ["dispatch_recv"]}


def test_two_batch_overlap_gives_each_micro_batch_its_exchange_stream():
    plan = two_batch_overlap(shared_expert_overlap(MOE_PROGRAM))
    for (mb, name), lane in _lanes(plan).items():
        kind = plan.program.stage(name).kind
        assert lane == (1 + mb if kind != "compute" else 0), (mb, name)
    assert plan.streams.side_lanes == (1, 2)


def test_a_stage_with_its_own_stream_runs_from_its_inputs_and_add_waits_for_it():
    plan = sequential(shared_expert_overlap(MOE_PROGRAM, window=None, stream=True))
    names = [s.name for _, s in plan.steps]
    assert names[0] == "shared" and plan.streams.lanes[0] == 1 and plan.streams.high == (False,)
    assert set(plan.streams.lanes[1:]) == {0}  # the exchanges' windows are empty: they stay on lane 0
    assert [names[w] for w in plan.streams.waits[names.index("add")]] == ["shared"]
    # the decoder's shared experts read "tokens": right after ffn_norm
    decoder = shared_expert_overlap(DECODER_MOE_PROGRAM, window=None, stream=True)
    order = [s.name for s in decoder.stages]
    assert order.index("shared") == order.index("ffn_norm") + 1
    tbo = two_batch_overlap(shared_expert_overlap(MOE_PROGRAM, window=None, stream=True))
    assert tbo.streams.high == (False, True, False, True)  # shared mb0, exchanges mb0, shared mb1, exchanges mb1
    with pytest.raises(ValueError, match="only compute stages name a stream"):
        Stage("s", lambda p, e, c: {}, ("x",), ("y",), "send", "d", stream="side")


def _happens_before(steps, sp) -> list[set]:
    """hb[i]: the steps that finish before step i starts on the GPU (lane order, events, the fork)."""
    hb: list[set] = []
    last: dict[int, int] = {}
    for i in range(len(steps)):
        before = set()
        lane = sp.lanes[i]
        if lane in last:
            before |= {last[lane]} | hb[last[lane]]
        for w in sp.waits[i]:
            assert sp.records[w], f"step {i} waits for step {w}, which records no event"
            before |= {w} | hb[w]
        hb.append(before)
        last[lane] = i
    return hb


@st.composite
def _programs(draw):
    """A random layer: compute stages and exchanges reading earlier values; a random legal interleave."""
    stages, known, n_ex = [], ["x"], 0
    for i in range(draw(st.integers(1, 7))):
        if draw(st.booleans()):
            reads = tuple(draw(st.lists(st.sampled_from(known), min_size=1, max_size=2, unique=True)))
            stream = draw(st.sampled_from(["", "", "side", "other"]))
            stages.append(Stage(f"c{i}", lambda p, e, c: {}, reads, (f"v{i}",), stream=stream))
            known.append(f"v{i}")
        else:
            reads = tuple(draw(st.lists(st.sampled_from(known), min_size=1, max_size=2, unique=True)))
            pair = f"e{n_ex}"
            n_ex += 1
            stages.append(Stage(f"s{i}", lambda p, e, c: {}, reads, (f"p{i}",), "send", pair))
            window = [Stage(f"w{i}", lambda p, e, c: {}, (draw(st.sampled_from(known)),), (f"u{i}",))] \
                if draw(st.booleans()) else []
            known += [f"u{i}"] if window else []
            stages += window + [Stage(f"r{i}", lambda p, e, c: {}, (f"p{i}",), (f"o{i}",), "recv", pair)]
            known.append(f"o{i}")
    return Program("drawn", tuple(stages), ("x",), known[-1], lambda inp, n: [dict(inp)] * n, list).check()


@settings(max_examples=200, deadline=None)
@given(_programs(), st.sampled_from(["sequential", "tbo", "tbo_compute_first"]))
def test_every_read_happens_after_its_write_on_drawn_plans(program, schedule):
    plan = {"sequential": sequential, "tbo": two_batch_overlap,
            "tbo_compute_first": lambda p: two_batch_overlap(p, compute_first=True)}[schedule](program)
    sp, steps = plan.streams, plan.steps
    hb = _happens_before(steps, sp)
    writer: dict = {}
    for i, (mb, s) in enumerate(steps):
        for r in s.reads:
            w = writer.get((mb, r))
            if w is not None:  # inputs are written before the plan starts (the fork orders them)
                assert w in hb[i], (program, i, r)
        for v in s.writes:
            writer[(mb, v)] = i
    readers_elsewhere = {w for i, ws in enumerate(sp.waits) for w in ws}
    assert {i for i, r in enumerate(sp.records) if r} == readers_elsewhere
    for i, (mb, s) in enumerate(steps):  # exchanges leave lane 0 exactly when their window holds a step
        if s.kind == "recv":
            j = next(j for j, (m, t) in enumerate(steps) if m == mb and t.kind == "send" and t.pair == s.pair)
            assert (sp.lanes[i] != 0) == (i - j > 1) and sp.lanes[i] == sp.lanes[j]
        if s.stream:  # a named stream: its own lane, shared with no other name or micro-batch
            assert all(sp.lanes[i] != sp.lanes[k] for k, (m, t) in enumerate(steps)
                       if (m, t.stream) != (mb, s.stream))


def test_stream_plan_is_the_plans_own():
    plan = two_batch_overlap(MOE_PROGRAM)
    assert stream_plan(plan.steps) == plan.streams
