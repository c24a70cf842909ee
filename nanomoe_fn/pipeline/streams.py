"""Which stream runs each step of a plan, and which events order the streams: computed once per plan, as data.

Dimension legend: none (lanes and step numbers, not tensors).

Lane 0 is the critical path: the caller's stream (run.py moves it to a stream of its own, forked from the
caller's, when the plan has a compute stage on a side lane, so it can outrank that stage). An exchange whose
two halves have other steps between them (the window a schedule opened for overlap: the shared experts after
dispatch's send, the other micro-batch's stages under two-batch overlap) runs both halves on its micro-batch's
exchange lane, so its kernels and collectives run beside the compute queued in the window instead of behind
it. An exchange with an empty window (sequential) stays on lane 0: a side stream would only add events. A
compute stage that names a stream (Stage.stream: the shared experts off the critical path) gets a lane of its
own per micro-batch. Side lanes are numbered 1, 2, ... in order of first use.

Ordering, from the values the stages declare (Stage.reads / writes, per micro-batch environment):
- fork: every side lane first waits for lane 0 where the plan starts (the inputs and the split's slices
  are there);
- a step that reads a value whose latest writer ran on another lane waits for that writer's event
  (recorded right after it, only where a later step on another lane reads it), unless its lane already
  waited for that step or a later one of the same lane;
- join: lane 0 waits for every side lane where the plan ends (every exchange done before the caller's
  next work, and before a CUDA graph capture closes).
Values stay referenced by their micro-batch's environment until the plan ends, and every side lane forks
after the previous call's work on lane 0, so no memory read on one stream is reused by another before the
join (no record_stream needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StreamPlan:
    """Per step of a plan: lanes[i] (0 = the critical path, >= 1 a side lane: an exchange lane per micro-batch,
    a lane per micro-batch for each named compute stream),
    waits[i] (earlier steps whose events step i waits for), records[i] (record an event after step i).
    side_lanes: the side lanes the plan uses (forked at its start, joined at its end); high[j]: whether
    side_lanes[j] is an exchange lane (a high-priority stream) rather than a compute stage's own stream."""

    lanes: tuple[int, ...]
    waits: tuple[tuple[int, ...], ...]
    records: tuple[bool, ...]
    side_lanes: tuple[int, ...]
    high: tuple[bool, ...]


def stream_plan(steps: Sequence[tuple[int, Any]]) -> StreamPlan:
    """The StreamPlan of steps (micro-batch, Stage) in execution order (module docstring)."""
    keys: list[Any] = [None] * len(steps)  # None: lane 0; else what names the side lane
    send_at: dict[tuple[int, str], int] = {}
    for i, (mb, s) in enumerate(steps):
        if s.stream:
            keys[i] = ("compute", s.stream, mb)
        elif s.kind == "send":
            send_at[(mb, s.pair)] = i
        elif s.kind == "recv":
            j = send_at[(mb, s.pair)]
            if i - j > 1:  # something runs in the window: both halves on the micro-batch's exchange stream
                keys[i] = keys[j] = ("exchange", mb)
    number: dict[Any, int] = {}
    for k in keys:
        if k is not None and k not in number:
            number[k] = len(number) + 1
    lanes = [0 if k is None else number[k] for k in keys]
    writer: dict[tuple[int, str], int] = {}
    waited: dict[tuple[int, int], int] = {}  # (lane, other lane) -> the latest step of the other it waited for
    waits: list[tuple[int, ...]] = []
    records = [False] * len(steps)
    for i, (mb, s) in enumerate(steps):
        lane, latest = lanes[i], {}
        for r in s.reads:  # per other lane, only its latest writer: a stream runs its steps in order
            w = writer.get((mb, r))
            if w is not None and lanes[w] != lane and w > waited.get((lane, lanes[w]), -1):
                latest[lanes[w]] = max(w, latest.get(lanes[w], -1))
        for other, w in latest.items():
            records[w] = True
            waited[(lane, other)] = w
        waits.append(tuple(sorted(latest.values())))
        for w in s.writes:
            writer[(mb, w)] = i
    return StreamPlan(tuple(lanes), tuple(waits), tuple(records), tuple(number.values()),
                      tuple(k[0] == "exchange" for k in number))
