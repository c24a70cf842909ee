"""The decode-shaped layer (masked experts, local comm) compiles as one graph and keeps its checks.

The pipeline transform will run stages under torch.compile; a host sync or Python-side value check
in a stage would break its graph, so this pins the contract: fullgraph=True must succeed, agree with
the float64 reference, and bad values must still raise (as a device assert) inside the graph.
The aot_eager backend traces exactly what inductor would get, without needing a C++ compiler.
"""

from __future__ import annotations

import pytest
import torch

from nanomoe_fn import LocalComm, MoEConfig, Placement, init_moe_params, moe_layer
from tests.helpers import assert_close_to_ref, reference_layer


@pytest.fixture(scope="module")
def compiled_layer():
    torch._dynamo.reset()
    return torch.compile(moe_layer, fullgraph=True, backend="aot_eager")


def test_masked_layer_compiles_fullgraph_and_matches_reference(compiled_layer):
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, n_shared_experts=1)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(3))
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(4))
    out = compiled_layer(params, x, cfg, LocalComm(), Placement.identity(8, 1), "bmm", 24)
    ref, _ = reference_layer(params, x, cfg)
    assert_close_to_ref(out, ref, torch.float32, "compiled layer")


def test_compiled_layer_still_rejects_nan_and_overflow(compiled_layer):
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, n_shared_experts=1)
    params = init_moe_params(cfg, generator=torch.Generator().manual_seed(3))
    comm, placement = LocalComm(), Placement.identity(8, 1)
    x = torch.randn(12, 32)
    x[5, 7] = float("nan")
    with pytest.raises(RuntimeError, match="router logits contain NaN"):
        compiled_layer(params, x, cfg, comm, placement, "bmm", 24)
    # 12 tokens on the same 2 experts: 12 rows for an expert with room for 4
    params.gate.weight.zero_()
    params.gate.weight[:2] = 1.0
    with pytest.raises(RuntimeError, match="capacity"):
        compiled_layer(params, torch.rand(12, 32) + 0.5, cfg, comm, placement, "bmm", 4)
