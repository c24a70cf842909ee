"""Naive float64 oracles for NanoMoE (moe.py, mla.py), plus expert_rows.py: kernel-level inputs and a
float32 per-token check for large sizes. Imports nothing from nanomoe_fn or kernels."""

from nanomoe_reference.moe import linear, moe_experts, moe_layer, route, route_scores, swiglu

__all__ = ["linear", "moe_experts", "moe_layer", "route", "route_scores", "swiglu"]
