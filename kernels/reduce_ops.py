"""Combine functions for tl.reduce, shared by the MLA Triton kernels (mla_decode, mla_prefill).

Their reductions go through tl.reduce with triton.language's own combine functions, and zeros through
tl.full: tl.max/sum/min/zeros/cdiv are @jit functions decorated once when triton is imported, so a
test session that imported triton before setting TRITON_INTERPRET could not interpret them. (The
interpreter recognises these combine functions and reduces with numpy.)
"""

import triton
import triton.language as tl


@triton.jit
def _own_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _own_min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _own_add(a, b):
    return a + b


maximum = getattr(tl.standard, "_elementwise_max", _own_max)
minimum = getattr(tl.standard, "_elementwise_min", _own_min)
add = getattr(tl.standard, "_sum_combine", _own_add)
