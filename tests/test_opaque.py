"""nanomoe_fn.opaque.opaque_to_compile: a graph break that runs its function eagerly under torch.compile,
like torch.compiler.disable, and importing the package does not load torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nanomoe_fn.opaque import opaque_to_compile
from tests.helpers import ROOT

SEEN: list[bool] = []


@opaque_to_compile
def _kernel_like(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Stands for a Triton launch: records whether dynamo traces it (is_compiling is True only then)."""
    SEEN.append(torch.compiler.is_compiling())
    return x * scale


def _layer(x: torch.Tensor) -> torch.Tensor:
    return _kernel_like(torch.sin(x), scale=3.0) + 1.0


def test_importing_the_package_leaves_dynamo_unloaded():
    code = ("import sys, nanomoe_fn, nanomoe_fn.comm.nvlink, nanomoe_fn.moe.expert_kernels_fp8; "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_eager_call_is_the_plain_call():
    SEEN.clear()
    x = torch.randn(5)
    assert torch.equal(_kernel_like(x), x * 2.0) and SEEN == [False]
    assert _kernel_like.__name__ == "_kernel_like" and "Triton launch" in _kernel_like.__doc__


def test_under_compile_a_graph_break_run_eagerly():
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(7)
    explained = torch._dynamo.explain(_layer)(x)
    assert explained.graph_break_count == 1, explained
    SEEN.clear()
    out = torch.compile(_layer, backend="eager")(x)
    torch.testing.assert_close(out, torch.sin(x) * 3.0 + 1.0)
    assert SEEN == [False]  # called once, never traced
    torch._dynamo.reset()
    with pytest.raises(Exception, match="disable"):
        torch.compile(_layer, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()


def test_methods_keep_self():
    class Comm:
        k = 4.0

        @opaque_to_compile
        def send(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    x = torch.ones(3)
    assert torch.equal(Comm().send(x), x * 4.0)
    assert torch.equal(torch.compile(lambda c, t: c.send(t) + 1, backend="eager")(Comm(), x), x * 4.0 + 1)
