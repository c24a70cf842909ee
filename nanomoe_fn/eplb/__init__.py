"""Expert placement and EPLB: which slot holds which expert, and keeping the slots' load balanced.

placement.py (Placement and the remap of routed pairs to replicas), recorder.py (per-step expert
load), rebalance.py (the host-side rebalancer), move.py (moving expert weights between ranks).
`nanomoe_fn.eplb` re-exports the EPLB API below, so `from nanomoe_fn.eplb import rebalance_experts`
works; none of these modules imports another room's stage.
"""

from nanomoe_fn.eplb.rebalance import *  # noqa: F403 - the EPLB API, as nanomoe_fn.eplb was one module
from nanomoe_fn.eplb.rebalance import __all__  # noqa: F401
