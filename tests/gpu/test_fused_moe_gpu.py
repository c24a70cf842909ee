"""Triton fused MoE on the GPU in bfloat16, against float64/float32 references.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
Small shapes go through reference.moe_experts (float64 loops); DeepSeek-V3 dims (H=7168, I=2048) are
checked on sampled tokens against float32 torch math written out here. Marked `gpu`. The DeepGEMM
adapter's tests live in test_deepgemm_gpu.py.
"""

import nanomoe_reference as reference
import pytest
import torch
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_contiguous, fused_moe_masked
from nanomoe_kernels.moe_align import moe_align
from nanomoe_reference.expert_rows import make_routing, make_weights, reference_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2
SMALL = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=3)
CONFIGS = [None, SMALL, {**SMALL, "USE_TMA": True},
           dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, USE_TMA=True),
           {"up": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_M=64),
            "down": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                         USE_TMA=True),
            "linear": SMALL},
           # tails in the main launch (MERGE_TAIL), the down GEMM's A rows through TMA (A_TMA)
           {"up": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_M=64,
                       USE_TMA=True, MERGE_TAIL=True),
            "down": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                         USE_TMA=True, A_TMA=True, MERGE_TAIL=True),
            "linear": {**SMALL, "BLOCK_M": 64, "SPLIT_M": 16, "MERGE_TAIL": True}},
           # the up GEMM on rows permuted into aligned order, A through TMA (PERMUTE_A)
           {"up": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_M=64,
                       USE_TMA=True, MERGE_TAIL=True, PERMUTE_A=True),
            "down": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                         USE_TMA=True, A_TMA=True, MERGE_TAIL=True),
            "linear": SMALL},
           # tail programs of two column tiles (PAIR_TAILS): the up GEMM at the H200 tables' tile, both GEMMs
           {"up": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, SPLIT_M=64,
                       USE_TMA=True, MERGE_TAIL=True, PAIR_TAILS=True),
            "down": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                         USE_TMA=True, A_TMA=True, MERGE_TAIL=True, PAIR_TAILS=True),
            "linear": {**SMALL, "BLOCK_M": 64, "SPLIT_M": 16, "MERGE_TAIL": True, "PAIR_TAILS": True}}]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/Inf"
    return float((out.double().cpu() - want.double().cpu()).norm() / want.double().norm().clamp_min(1e-30))


def small_case(T, E, k, H, I, expert_type, seed=0):
    w = make_weights(E, H, I, expert_type, torch.bfloat16, "cuda", seed=seed)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=seed + 1)
    return x, ids, tw, w


@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("T", [1, 200])
def test_fused_moe_bf16_matches_reference(expert_type, ci, T):
    x, ids, tw, w = small_case(T, 8, 3, 256, 192, expert_type, seed=T)
    out = fused_moe(x, ids, tw, w, expert_type, config=CONFIGS[ci])
    assert rel_err(out, reference.moe_experts(x, ids, tw, w, expert_type)) < BF16_TOL


@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
def test_contiguous_and_masked_bf16(expert_type):
    E, H, I = 6, 256, 128
    counts = torch.tensor([5, 0, 70, 1, 33, 0], device="cuda")
    w = make_weights(E, H, I, expert_type, torch.bfloat16, "cuda")
    rows = torch.randn(int(counts.sum()), H, device="cuda", dtype=torch.bfloat16)
    expert_of_row = torch.repeat_interleave(torch.arange(E, device="cuda"), counts)[:, None]
    want = reference.moe_experts(rows, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.float32), w,
                                 expert_type)
    for cfg in (None, SMALL, {**SMALL, "USE_TMA": True}):
        assert rel_err(fused_moe_contiguous(rows, counts, w, expert_type, config=cfg), want) < BF16_TOL
        cap = 72
        xm = torch.zeros(E, cap, H, device="cuda", dtype=torch.bfloat16)
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        for e, (s, c) in enumerate(zip(starts, counts.tolist())):
            xm[e, :c] = rows[s:s + c]
        ym = fused_moe_masked(xm, counts, w, expert_type, config=cfg, expected_m=24)
        got = torch.cat([ym[e, :c] for e, c in enumerate(counts.tolist())])
        assert rel_err(got, want) < BF16_TOL


@pytest.mark.parametrize("T", [16, 300])
def test_deepseek_dims_tuned_configs(T):
    """H=7168, I=2048, 32 experts, top-8, the tuned (or default) configs: sampled tokens vs float32."""
    x, ids, tw, w = small_case(T, 32, 8, 7168, 2048, "swiglu")
    out = fused_moe(x, ids, tw, w)
    sample = torch.arange(0, T, max(1, T // 6), device="cuda")
    assert rel_err(out[sample], reference_rows(x, ids, tw, w, "swiglu", sample)) < BF16_TOL


def test_align_large_matches_torch_sort():
    """131072 rows over 256 experts (several chunks): each expert's rows in order, padded to 64."""
    ids = torch.randint(0, 256, (16384, 8), device="cuda", dtype=torch.int32)
    al = moe_align(ids, 256, 64)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=256)
    padded = (counts + 63) // 64 * 64
    assert int(al.num_padded) == int(padded.sum())
    order = torch.sort(flat, stable=True).indices
    seg = torch.cumsum(padded, 0) - padded
    rank = torch.arange(flat.numel(), device="cuda") - (torch.cumsum(counts, 0) - counts)[flat[order]]
    assert torch.equal(al.sorted_ids[(seg[flat[order]] + rank)].long(), order)
    blocks = int(al.num_padded) // 64
    owner = torch.repeat_interleave(torch.arange(256, device="cuda"), padded // 64)
    assert torch.equal(al.expert_ids[:blocks].long(), owner)


@pytest.mark.parametrize("layout", ["unsorted", "masked"])
def test_cuda_graph_capture(layout):
    """No host sync anywhere: the whole path captures into a CUDA graph and replays on new inputs."""
    x, ids, tw, w = small_case(64, 8, 4, 256, 128, "swiglu", seed=3)
    cap = 48
    counts = torch.tensor([40, 0, 7, 48, 1, 30, 12, 5], device="cuda")
    xm = torch.randn(8, cap, 256, device="cuda", dtype=torch.bfloat16)

    def run():
        if layout == "unsorted":
            return fused_moe(x, ids, tw, w, config=SMALL)
        return fused_moe_masked(xm, counts, w, config={**SMALL, "USE_TMA": True})

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x2, ids2, tw2, _ = small_case(64, 8, 4, 256, 128, "swiglu", seed=4)
    x.copy_(x2), ids.copy_(ids2), tw.copy_(tw2)
    xm.copy_(torch.randn_like(xm))
    counts.copy_(torch.tensor([3, 48, 0, 9, 20, 0, 33, 2], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    if layout == "unsorted":
        assert rel_err(out, reference.moe_experts(x2, ids2, tw2, w)) < BF16_TOL
    else:
        c = counts.tolist()
        rows = torch.cat([xm[e, :n] for e, n in enumerate(c)])
        e_of = torch.repeat_interleave(torch.arange(8), torch.tensor(c))[:, None]
        want = reference.moe_experts(rows, e_of, torch.ones(len(e_of), 1), w)
        assert rel_err(torch.cat([out[e, :n] for e, n in enumerate(c)]), want) < BF16_TOL
