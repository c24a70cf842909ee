"""Schedules: which micro-batch runs which stage when. A plan is data; `run` (run.py) executes it.

Dimension legend: none (plans hold stage names and micro-batch numbers, not tensors).

- `sequential(program)`: one micro-batch, the program's order.
- `shared_expert_overlap(program)`: the shared-expert FFN moved into the dispatch window (right after
  dispatch's send half), so it runs while the tokens are in flight instead of after combine; with
  stream=True on its own stream, launched after `window` (None: from the layer's start), beside the
  exchanges and the experts.
- `two_batch_overlap(program)`: the batch split in two micro-batches; each runs its stages up to and
  including a send half, then yields to the other. One micro-batch's exchange is in flight while the
  other computes (route, experts, shared FFN): the order of SGLang's two-batch overlap, as a plan.
  compute_first=True runs both micro-batches' routing before either dispatch starts.
- `auto_schedule(program, tokens, threshold)`: two-batch overlap at `tokens` >= threshold, else
  sequential (splitting a small decode batch costs more than the overlap saves). Without a threshold it
  takes the measured default for the world size (tbo_thresholds.json: at 2 ranks TBO lost at every size
  measured, so the default there is sequential). Every rank must
  choose the same plan (each micro-batch is one more round of collectives), so `tokens` must be a value
  all ranks share (the step's largest per-rank batch, or a fixed bucket), never this rank's own T alone.

`format_plan(plan)` prints what runs when, one row per step, one column per micro-batch, and which steps
run on a side stream (streams.py: an exchange with work in its window runs beside that work, and so does
a stage that names its own stream).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from importlib import resources

from nanomoe_fn.pipeline.program import Program, Stage, move_after, move_first
from nanomoe_fn.pipeline.streams import StreamPlan, stream_plan


@dataclass(frozen=True)
class Plan:
    """steps: (micro-batch, stage) in execution order; micro_batches: how many the input is split into;
    streams: the lane of each step and the events between lanes (streams.py), derived from the steps."""

    name: str
    program: Program
    micro_batches: int
    steps: tuple[tuple[int, Stage], ...]
    streams: StreamPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", stream_plan(self.steps))


def sequential(program: Program) -> Plan:
    """The program's stages in order, one micro-batch."""
    program.check()
    return Plan("sequential", program, 1, tuple((0, s) for s in program.stages))


def shared_expert_overlap(program: Program, shared: str = "shared", window: str | None = "dispatch_send",
                          stream: bool = False) -> Program:
    """The program with stage `shared` right after `window`, the send half whose exchange it overlaps. With
    stream=True the stage runs on its own stream, launched right after `window` (any stage, or None: as
    early as its inputs allow), beside the exchanges and the experts."""
    if not stream:
        if window is None or program.stage(window).kind != "send":
            kind = None if window is None else program.stage(window).kind
            raise ValueError(f"window must be a send stage (or stream=True), got {window!r} ({kind})")
        return replace(move_after(program, shared, window), name=f"{program.name}+shared_overlap")
    moved = move_first(program, shared) if window is None else move_after(program, shared, window)
    side = replace(moved.stage(shared), stream=shared)
    stages = tuple(side if s.name == shared else s for s in moved.stages)
    where = "start" if window is None else window
    return replace(moved, stages=stages, name=f"{program.name}+shared_stream@{where}").check()


def _phases(program: Program) -> list[list[Stage]]:
    """The stages cut after every send half: each phase ends where an exchange goes into flight."""
    phases: list[list[Stage]] = [[]]
    for s in program.stages:
        phases[-1].append(s)
        if s.kind == "send":
            phases.append([])
    return [p for p in phases if p]


def two_batch_overlap(program: Program, compute_first: bool = False) -> Plan:
    """Two micro-batches, phase by phase: mb0 phase i, mb1 phase i, mb0 phase i + 1, ... (module docstring).
    compute_first: both micro-batches' stages before their first send run before either send (for comms
    that read counts on the host inside the send: the host has queued micro-batch 1's routing by then)."""
    program.check()
    phases = _phases(program)
    steps = [(mb, s) for phase in phases for mb in (0, 1) for s in phase]
    if compute_first:
        lead = [s for s in phases[0] if s.kind == "compute"]
        rest = [s for s in phases[0] if s.kind != "compute"]
        if [s.name for s in phases[0]] != [s.name for s in lead + rest]:
            raise ValueError(f"compute_first needs the first phase of {program.name!r} to be compute stages, then "
                             f"its send; got {[s.name for s in phases[0]]}")
        first = [(0, s) for s in lead] + [(1, s) for s in lead] + [(mb, s) for mb in (0, 1) for s in rest]
        steps = first + steps[2 * len(phases[0]):]
    return Plan("two_batch_overlap" + ("+compute_first" if compute_first else ""), program, 2, tuple(steps))


def default_threshold(world_size: int) -> int | None:
    """Two-batch overlap's measured threshold at this world size (tbo_thresholds.json, package data), or None:
    TBO lost at every size measured there, or the world size was not measured."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return _thresholds().get(str(world_size))


@functools.cache
def _thresholds() -> dict:
    """tbo_thresholds.json's table, read once (auto_schedule may run every step)."""
    return json.loads(resources.files("nanomoe_fn.pipeline").joinpath("tbo_thresholds.json").read_text())["thresholds"]


def auto_schedule(program: Program, tokens: int, threshold: int | None = None, world_size: int | None = None) -> Plan:
    """two_batch_overlap(program) when tokens >= threshold, else sequential(program) (module docstring:
    `tokens` must be the same on every rank). threshold None: the measured default for world_size
    (default_threshold; None there keeps TBO off)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0 (shared by every rank), got {tokens!r}")
    if threshold is None:
        if world_size is None:
            raise ValueError("auto_schedule needs a threshold or the world_size whose measured default it takes")
        threshold = default_threshold(world_size)
        if threshold is None:
            return sequential(program)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    return two_batch_overlap(program) if tokens >= threshold else sequential(program)


def format_plan(plan: Plan) -> str:
    """A table of the plan: step, then per micro-batch the stage it runs (kind marked: > send, < recv; [sN]:
    on side stream N)."""
    mark = {"send": " >", "recv": " <", "compute": ""}
    cells = [[""] * plan.micro_batches for _ in plan.steps]
    lanes = plan.streams.lanes
    for i, (mb, s) in enumerate(plan.steps):
        cells[i][mb] = s.name + mark[s.kind] + (f" [s{lanes[i]}]" if lanes[i] else "")
    heads = ["step"] + [f"micro-batch {mb}" for mb in range(plan.micro_batches)]
    width = [max(len(heads[0]), len(str(len(cells))))] + [
        max([len(heads[c + 1])] + [len(row[c]) for row in cells]) for c in range(plan.micro_batches)]
    lines = [f"{plan.name} of {plan.program.name} (> starts an exchange, < finishes it, [sN] on side stream N)",
             " | ".join(h.ljust(w) for h, w in zip(heads, width))]
    lines.append("-+-".join("-" * w for w in width))
    lines += [" | ".join([str(i).ljust(width[0])] + [c.ljust(w) for c, w in zip(row, width[1:])])
              for i, row in enumerate(cells)]
    return "\n".join(lines)
