"""kernels/launch.py on a GPU: the compiled kernel called directly gives what Triton's own launch gives,
for arguments that change the specialization between calls (alignment, ints 1 / multiples of 16)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def test_launcher_matches_triton_launch_across_specializations():
    import triton
    import triton.language as tl
    from nanomoe_kernels.launch import Launcher

    @triton.jit
    def _scaled_copy(x_ptr, out_ptr, n, stride, a, B: tl.constexpr):
        offs = tl.program_id(0) * B + tl.arange(0, B)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs * stride, mask=m) * a, mask=m)

    launch = Launcher(_scaled_copy)
    base = torch.randn(4096, device="cuda")
    for _ in range(3):  # first calls compile, later ones reuse the cached kernels
        for off in (0, 1, 4, 3):
            for n, stride in ((1, 1), (16, 1), (17, 2), (300, 3), (1024, 1)):
                x = base[off:]
                out = torch.full((n,), float("nan"), device="cuda")
                want = torch.full_like(out, float("nan"))
                launch((triton.cdiv(n, 64),), x, out, n, stride, 1.5, B=64)
                _scaled_copy[(triton.cdiv(n, 64),)](x, want, n, stride, 1.5, B=64)
                torch.cuda.synchronize()
                assert torch.equal(out, want), (off, n, stride)
                assert torch.equal(out, x[: n * stride: stride][:n] * 1.5)
    assert len(launch._compiled) >= 4  # several specializations were cached and reused
