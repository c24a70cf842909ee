"""A layer as data: an ordered tuple of named stages, each declaring the values it reads and writes.

Dimension legend: none here (stages carry their own; values are whatever the stages pass).

A stage is a plain function `fn(params, env, ctx) -> dict` over an environment of named values: it reads
`reads` from env and returns exactly the names in `writes`. `kind` marks communication boundaries:
"send" starts an exchange (its result is in flight until the matching "recv" stage), "recv" finishes one,
"compute" is everything else. Schedules (schedule.py) reorder and interleave stages; they never look
inside them, so every schedule runs the same functions on the same values.

`Program.check()` proves a stage order is runnable: every read is produced earlier (or is an input),
nothing is written twice, and each "recv" follows its "send". `move_after` and `move_first` (as early as
the stage's reads allow) are the reordering primitives (shared-expert overlap uses them); they refuse a
move that would read a value before it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

KINDS = ("compute", "send", "recv")


@dataclass(frozen=True)
class Stage:
    """One step of a layer: fn(params, env, ctx) -> {name: value for name in writes}.

    pair: for "send" / "recv" stages, the name of the exchange (e.g. "dispatch"), the same on both halves.
    stream: for a compute stage off the critical path (the shared experts), the name of its own stream: it
    runs beside the other stages, ordered only by the values it reads and writes (streams.py); "" = the
    caller's stream. Exchanges never name one: their streams follow from the plan.
    """

    name: str
    fn: Callable[[Any, dict, Any], dict]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    kind: str = "compute"
    pair: str = ""
    stream: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Stage {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind != "compute") != bool(self.pair):
            raise ValueError(f"Stage {self.name!r}: 'send' and 'recv' stages name their exchange in `pair` "
                             f"(and compute stages leave it empty), got kind {self.kind!r}, pair {self.pair!r}")
        if self.stream and self.kind != "compute":
            raise ValueError(f"Stage {self.name!r}: only compute stages name a stream (an exchange's follows from "
                             f"the plan), got kind {self.kind!r}, stream {self.stream!r}")


@dataclass(frozen=True)
class Program:
    """stages in the order a sequential schedule runs them; inputs: the names the caller provides;
    output: the name whose value is the layer's result. split(inputs, n) -> n input dicts and
    merge(outputs) -> output make micro-batches (None: the program runs as one batch only)."""

    name: str
    stages: tuple[Stage, ...]
    inputs: tuple[str, ...]
    output: str
    split: Callable[[dict, int], list[dict]] | None = None
    merge: Callable[[list], Any] | None = None

    def stage(self, name: str) -> Stage:
        """The stage called `name` (KeyError naming the known stages otherwise)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"program {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def index(self, name: str) -> int:
        """Position of stage `name` in the sequential order."""
        return self.stages.index(self.stage(name))

    def check(self) -> Program:
        """Raise ValueError if the order cannot run (module docstring); return self."""
        known = set(self.inputs)
        open_pairs: set[str] = set()
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"program {self.name!r}: stage names must be unique, got {names}")
        for s in self.stages:
            missing = [r for r in s.reads if r not in known]
            if missing:
                raise ValueError(f"program {self.name!r}: stage {s.name!r} reads {missing} before any stage "
                                 f"writes them (inputs: {list(self.inputs)})")
            twice = [w for w in s.writes if w in known]
            if twice:
                raise ValueError(f"program {self.name!r}: stage {s.name!r} writes {twice}, already written")
            known.update(s.writes)
            if s.kind == "send":
                open_pairs.add(s.pair)
            elif s.kind == "recv":
                if s.pair not in open_pairs:
                    raise ValueError(f"program {self.name!r}: stage {s.name!r} receives exchange {s.pair!r} "
                                     f"before it is sent")
                open_pairs.discard(s.pair)
        if open_pairs:
            raise ValueError(f"program {self.name!r}: exchanges {sorted(open_pairs)} are sent but never received")
        if self.output not in known:
            raise ValueError(f"program {self.name!r}: no stage writes the output {self.output!r}")
        return self


def move_first(program: Program, stage: str) -> Program:
    """The program with `stage` moved as early as its reads allow: right after the last stage that writes
    one of them (first of all when it reads only inputs)."""
    s = program.stage(stage)
    writers = [i for i, x in enumerate(program.stages) if x.name != s.name and set(x.writes) & set(s.reads)]
    if writers:
        return move_after(program, stage, program.stages[max(writers)].name)
    return replace(program, stages=(s,) + tuple(x for x in program.stages if x.name != s.name)).check()


def move_after(program: Program, stage: str, anchor: str) -> Program:
    """The program with `stage` moved to run right after `anchor` (ValueError if that order cannot run:
    the moved stage would read a value not yet written, or a stage it skips past reads what it writes)."""
    s, a = program.stage(stage), program.stage(anchor)
    rest = [x for x in program.stages if x.name != s.name]
    at = rest.index(a) + 1
    moved = replace(program, stages=tuple(rest[:at] + [s] + rest[at:]))
    try:
        return moved.check()
    except ValueError as err:
        raise ValueError(f"cannot move stage {stage!r} after {anchor!r} in program {program.name!r}: {err}") from None
