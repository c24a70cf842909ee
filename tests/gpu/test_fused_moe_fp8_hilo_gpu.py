"""Two-term FP8 activations (act_terms=2, backend `triton_fp8_hilo`) and the swapped MMA (config SWAP_AB) of
kernels/fused_moe_fp8*.py on the GPU, bf16 activations.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
References (tests/gpu/test_fused_moe_fp8_gpu.py's, float64 on the GPU): "unquantised" = the FFN on the
dequantised weights with x and the activation unquantised. Two terms put e4m3's rounding at ~2^-8 (bf16's
scale), so the FP8 FFN lands within bf16 rounding of that reference (the one-term scheme: ~4.3%).
SWAP_AB computes the same products on wgmma (see ORDER_TOL) and meets the same references as the unswapped.
Marked `gpu`; needs sm_89+.
"""

import pytest
import torch
from nanomoe_kernels.fused_moe_fp8 import fused_moe_fp8
from nanomoe_reference.expert_rows import make_routing

from tests.gpu.test_fused_moe_fp8_gpu import FP8_OK, HILO_TOL, SAME_QUANT_TOL, SMALL, make_experts, reference, rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not FP8_OK, reason="needs a CUDA GPU with sm_89+")]
ISSUE_BOUND = 3e-2  # the FP8 expert FFN against the unquantised float64 FFN on the dequantised weights
# swapped vs unswapped: the swapped MMA is Hopper's wgmma, whose fp8 products accumulate with reduced precision
# inside each 128-deep scale group (the unswapped 16-32 row tiles run mma.sync); a few of the intermediate's
# e4m3 roundings flip (one flip moves a T=1 output by ~4e-3), plus the bf16 output rounding
ORDER_TOL = 1.5e-2
SWAPPED = [{**SMALL, "SWAP_AB": True},
           {**SMALL, "SWAP_AB": True, "USE_TMA": True, "K_STEPS": 2, "BLOCK_M": 32, "num_stages": 2},
           {"up": {**SMALL, "SWAP_AB": True, "USE_TMA": True, "num_warps": 8},
            "down": {**SMALL, "SWAP_AB": True, "USE_TMA": True, "BLOCK_N": 256, "num_warps": 8}},
           {**SMALL, "SWAP_AB": True, "BLOCK_M": 64, "SPLIT_M": 16, "MERGE_TAIL": True, "USE_TMA": True}]


@pytest.mark.parametrize("T", [64, 1024])
def test_hilo_deepseek_dims_accuracy(T):
    """H=7168, I=2048, 32 experts, top-8, default (tuned) configs: within bf16 rounding of the unquantised
    FFN, far below the one-term scheme's error on the same inputs."""
    w = make_experts(32, 7168, 2048)
    x = torch.randn(T, 7168, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(T, 32, 8, "cuda", seed=T)
    want = reference(x, ids, tw, w, same_quant=False)
    out = fused_moe_fp8(x, ids, tw, *w, act_terms=2)
    assert out.dtype == torch.bfloat16 and out.shape == (T, 7168)
    err, one_term = rel(out, want), rel(fused_moe_fp8(x, ids, tw, *w), want)
    assert err < min(HILO_TOL, ISSUE_BOUND), f"two-term FP8 FFN error {err:.3g}"
    assert err < one_term / 4, f"two terms ({err:.3g}) should be far below one term ({one_term:.3g})"


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("ci", range(len(SWAPPED)))
@pytest.mark.parametrize("T", [1, 300])
def test_swapped_configs_match_references(T, ci, terms):
    w = make_experts(8, 256, 256, seed=ci)
    x = torch.randn(T, 256, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(T, 8, 3, "cuda", seed=ci + T)
    cfg = SWAPPED[ci]
    plain = {op: {**c, "SWAP_AB": False} for op, c in cfg.items()} if "up" in cfg else {**cfg, "SWAP_AB": False}
    got = fused_moe_fp8(x, ids, tw, *w, config=cfg, act_terms=terms)
    assert rel(got, fused_moe_fp8(x, ids, tw, *w, config=plain, act_terms=terms).double()) < ORDER_TOL
    if terms == 2:
        assert rel(got, reference(x, ids, tw, w, same_quant=False)) < HILO_TOL
    elif T > 1:  # one token's 768 intermediate values are too few to average the flips of ORDER_TOL out
        assert rel(got, reference(x, ids, tw, w, same_quant=True)) < SAME_QUANT_TOL


def test_hilo_backend():
    """expert_ffn with backend triton_fp8_hilo on a row record and on its block layout (the same bytes); the
    layouts themselves: tests/gpu/test_fused_moe_fp8_gpu.py::test_layouts[2]."""
    from nanomoe_fn import ExpertBatch, expert_ffn
    from nanomoe_fn.moe.fp8_params import tile_experts
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    w = make_experts(6, 256, 128, seed=1)
    counts = torch.tensor([5, 0, 70, 1, 33, 0], device="cuda")
    rows = torch.randn(int(counts.sum()), 256, device="cuda").to(torch.bfloat16)
    e_of = torch.repeat_interleave(torch.arange(6, device="cuda"), counts)[:, None]
    fp8 = SwiGLUExpertsFP8(*w)
    y = expert_ffn(fp8, ExpertBatch(rows, counts), "triton_fp8_hilo")
    assert rel(y.x, reference(rows, e_of, torch.ones(len(e_of), 1, device="cuda"), w, same_quant=False)) < HILO_TOL
    assert torch.equal(expert_ffn(tile_experts(fp8), ExpertBatch(rows, counts), "triton_fp8_hilo").x, y.x)


def test_hilo_cuda_graph_capture():
    """No host sync with two terms either: capture, change the inputs in place, replay."""
    w = make_experts(8, 256, 256, seed=3)  # K_STEPS=2 needs I a multiple of 256
    x = torch.randn(64, 256, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(64, 8, 4, "cuda", seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe_fp8(x, ids, tw, *w, config=SWAPPED[1], act_terms=2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_fp8(x, ids, tw, *w, config=SWAPPED[1], act_terms=2)
    ids2, tw2 = make_routing(64, 8, 4, "cuda", seed=4)
    x.copy_(torch.randn_like(x)), ids.copy_(ids2), tw.copy_(tw2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, reference(x, ids, tw, w, same_quant=False)) < HILO_TOL


@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("T", [64, 1024])
def test_block_layout_weights_give_the_same_bytes(T, terms):
    """tile_weights' block layout at DeepSeek-V3 dims (tuned configs of the *_tiles tables, or the rows'):
    the same output bytes as the [E, NW, K] rows when both run one config, and the accuracy of the scheme."""
    from nanomoe_kernels.fused_moe_fp8 import fp8_configs
    from nanomoe_kernels.fused_moe_fp8_kernel import tile_weights

    w = make_experts(32, 7168, 2048)
    tiles = (tile_weights(w[0]), w[1], tile_weights(w[2]), w[3])
    x = torch.randn(T, 7168, device="cuda").to(torch.bfloat16)
    ids, tw = make_routing(T, 32, 8, "cuda", seed=T)
    up, down, _ = fp8_configs(None, 32, 7168, 2048, T * 8, x.device, act_terms=terms, tiles=True)
    cfg = {"up": up, "down": down}
    got = fused_moe_fp8(x, ids, tw, *tiles, config=cfg, act_terms=terms)
    assert torch.equal(got, fused_moe_fp8(x, ids, tw, *w, config=cfg, act_terms=terms))
    err = rel(fused_moe_fp8(x, ids, tw, *tiles, act_terms=terms), reference(x, ids, tw, w, same_quant=False))
    assert err < (HILO_TOL if terms == 2 else 5e-2)
