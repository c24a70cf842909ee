"""Naive float64 oracles for NanoMoE (moe.py, mla.py, fp8.py: block-scaled FP8), plus expert_rows.py:
kernel-level inputs and a float32 per-token check for large sizes. Imports nothing from nanomoe_fn or kernels."""

from nanomoe_reference.fp8 import dequant_blocks_ref, dequant_groups_ref, quant_blocks_ref, quant_groups_ref, round_e4m3
from nanomoe_reference.moe import linear, moe_experts, moe_layer, route, route_scores, swiglu

__all__ = ["dequant_blocks_ref", "dequant_groups_ref", "linear", "moe_experts", "moe_layer", "quant_blocks_ref",
           "quant_groups_ref", "round_e4m3", "route", "route_scores", "swiglu"]
