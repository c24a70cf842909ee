"""Triton kernels and thin adapters to external kernels (DeepGEMM). Nothing here imports nanomoe_fn.

Each module holds one kernel family plus the wrapper that asserts shapes, dtypes and strides.
"""
