"""Expert placement and EPLB: which slot holds which expert, and keeping the slots' load balanced.

placement.py (Placement and the remap of routed pairs to replicas), recorder.py (per-step expert
load), rebalance.py (the host-side rebalancer), move.py (moving expert weights between ranks).
`nanomoe_fn.eplb` re-exports the EPLB API below, so `from nanomoe_fn.eplb import rebalance_experts`
works; none of these modules imports another room's stage.
"""

from nanomoe_fn.eplb.move import (
    MovePlan,
    begin_move,
    finish_move,
    plan_weight_moves,
    replace_expert_weights,
    run_move_round,
)
from nanomoe_fn.eplb.placement import Placement, remap, remap_dynamic, tokens_per_gpu
from nanomoe_fn.eplb.rebalance import (
    POLICIES,
    balancedness,
    gpu_loads,
    identity_placements,
    placement_for_layer,
    rebalance_experts,
)
from nanomoe_fn.eplb.recorder import RecorderState, advance, global_load, init_recorder, record, windowed_load

__all__ = [
    "POLICIES", "MovePlan", "Placement", "RecorderState", "advance", "balancedness", "begin_move", "finish_move",
    "global_load", "gpu_loads", "identity_placements", "init_recorder", "placement_for_layer",
    "plan_weight_moves", "rebalance_experts", "record", "remap", "remap_dynamic", "replace_expert_weights",
    "run_move_round", "tokens_per_gpu", "windowed_load",
]
