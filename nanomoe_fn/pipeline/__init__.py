"""The pipeline transform: a layer as an ordered tuple of stages with named communication boundaries
(program.py), schedules that reorder or interleave them (schedule.py: sequential, two-batch overlap,
shared-expert overlap, an automatic threshold, a printable table) and the one executor (run.py).
Layers define their programs next to their stages (the MoE layer: nanomoe_fn/moe/layer.py, MOE_PROGRAM)."""

from nanomoe_fn.pipeline.program import Program, Stage, move_after
from nanomoe_fn.pipeline.run import run, scope
from nanomoe_fn.pipeline.schedule import (
    Plan,
    auto_schedule,
    default_threshold,
    format_plan,
    sequential,
    shared_expert_overlap,
    two_batch_overlap,
)

__all__ = ["Plan", "Program", "Stage", "auto_schedule", "default_threshold", "format_plan", "move_after", "run",
           "scope", "sequential", "shared_expert_overlap", "two_batch_overlap"]
