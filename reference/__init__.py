"""Naive float64 oracles for NanoMoE. Imports nothing from nanomoe_fn or kernels."""

from reference.moe import linear, moe_experts, moe_layer, route, route_scores, swiglu

__all__ = ["linear", "moe_experts", "moe_layer", "route", "route_scores", "swiglu"]
