"""kernels/launch.py: the specialization key that decides when a cached compiled kernel may be reused,
and the launcher's interpreter path (CPU). The direct call of a compiled kernel runs on GPUs only
(tests/gpu/test_launch_gpu.py, and every nvlink GPU test, whose kernels launch through it)."""

from __future__ import annotations

import os

import pytest
import torch
from nanomoe_kernels.launch import spec_key


def test_spec_key_separates_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.float32)
    aligned, off4 = base[4:], base[1:]  # 16-byte and 4-byte offsets from an aligned allocation
    assert spec_key((aligned,)) == spec_key((base,))
    assert spec_key((off4,)) != spec_key((base,))
    assert spec_key((base.to(torch.float16),)) != spec_key((base,))
    ints = [1, 0, 16, 17, 3, 2**31 - 1, 2**31, 2**31 + 16, -2**31, -2**31 - 1, 2**63 - 16, 2**63]
    keys = {n: spec_key((n,)) for n in ints}
    # 1, multiples of 16 and others apart; 32-bit, 64-bit and unsigned 64-bit apart
    assert keys[1] != keys[17] and keys[16] != keys[17] and keys[0] == keys[16] and keys[3] == keys[17]
    assert keys[2**31] != keys[17] and keys[2**31 + 16] != keys[16] and keys[2**31 + 16] != keys[1]
    assert keys[2**31 - 1] == keys[17] and keys[-2**31] == keys[16] and keys[-2**31 - 1] != keys[16]
    assert keys[2**63] != keys[2**63 - 16]
    assert spec_key((True,)) != spec_key((1,)) and spec_key((1.0,)) != spec_key((1,))
    assert spec_key((None,)) != spec_key((0,))
    assert spec_key(((1, 2),)) is None  # an argument kind the launcher leaves to Triton


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the kernel in the interpreter")
def test_launcher_runs_the_kernel_in_the_interpreter():
    import triton
    import triton.language as tl
    from nanomoe_kernels.launch import Launcher

    @triton.jit
    def _axpb(x_ptr, out_ptr, a, n, B: tl.constexpr):
        offs = tl.program_id(0) * B + tl.arange(0, B)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * a + 1.0, mask=m)

    x = torch.arange(37, dtype=torch.float32)
    out = torch.zeros_like(x)
    launch = Launcher(_axpb)
    for a in (2.0, 3.0):  # a second call with the same key
        launch((triton.cdiv(37, 16),), x, out, a, 37, B=16)
        assert torch.equal(out, x * a + 1)
