"""The MoE layer on a CUDA device in bfloat16/float16 against the float64 reference."""

import pytest
import torch

from nanomoe_fn import EXPERT_BACKENDS, init_moe_params, moe_layer, preset
from tests.helpers import MIN_MARGIN, assert_close_to_ref, reference_layer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["loop", "bmm", "triton", "deepgemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["tiny", "deepseek-v3"])
def test_layer_on_gpu_matches_reference(backend, dtype, name):
    cfg = preset(name)
    if name == "deepseek-v3":  # real routing (256 experts, 8 groups), reduced widths for the float64 oracle
        cfg = cfg.with_(hidden=256, intermediate=64)
    ok, why = EXPERT_BACKENDS[backend].supports(cfg, torch.device("cuda"))
    if not ok or (backend == "deepgemm" and (dtype != torch.bfloat16 or name == "tiny")):
        pytest.skip(f"{backend} cannot run {name}/{dtype}: {why or 'DeepGEMM: bf16, dims multiple of 64'}")
    checked = 0
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        params = init_moe_params(cfg, dtype, "cuda", gen)
        x = torch.randn(48, cfg.hidden, generator=gen).to("cuda", dtype)
        ref, margin = reference_layer(params, x, cfg)
        if margin <= MIN_MARGIN:
            continue
        checked += 1
        assert_close_to_ref(moe_layer(params, x, cfg, backend=backend), ref, dtype, f"{name}/{backend}")
        out_cap = moe_layer(params, x, cfg, backend=backend, capacity=48)
        assert_close_to_ref(out_cap, ref, dtype, f"{name}/{backend}/masked")
    assert checked >= 1
