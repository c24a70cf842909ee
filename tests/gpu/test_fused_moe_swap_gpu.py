"""The swap-AB expert GEMM (kernels/fused_moe_swap.py) on a Hopper GPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
Every entry point runs with `SWAP` configs against reference.moe_experts (float64) and against the Triton kernel's
configs; each test first asserts the swap kernel really runs (`unsupported` is ''), so a fallback to the Triton
kernel cannot pass it. Block sizes cover every piece rule (1..18 x 16 rows) and experts split into several blocks.
Marked `gpu`; skipped off sm_90 or below Triton 3.6.
"""

import nanomoe_reference as reference
import pytest
import torch
from nanomoe_kernels import fused_moe_swap, fused_moe_wgmma
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_contiguous
from nanomoe_kernels.fused_moe_kernel import moe_gemm
from nanomoe_kernels.moe_align import moe_align_contiguous
from nanomoe_reference.expert_rows import make_routing, make_weights

from tests.gpu.expert_layouts import check_layouts, rel_err

_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and fused_moe_wgmma.supported_triton()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason="needs an sm_90 GPU and Triton >= 3.6")]
TOL = 2e-2
UP = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True)
DOWN = {**UP, "BLOCK_N": 128}
SWAP = {"up": UP, "down": DOWN, "linear": DOWN}
SWAP_SMALL = {op: {**c, "GROUP_M": 1, "num_stages": 2} for op, c in SWAP.items()}
# the tables' entry at 32 x 1024: the up GEMM's rows copied into aligned order first, loaded by TMA (SwiGLU boxes)
SWAP_PERM = {**SWAP, "up": {**UP, "PERMUTE_A": True}}
TRITON = {op: {**c, "SWAP": False, "BLOCK_M": 64, "BLOCK_K": 32, "num_stages": 3} for op, c in SWAP.items()}


def assert_runs_swap(cfg: dict, a: torch.Tensor, w: torch.Tensor, swiglu: bool, weighted: bool) -> None:
    reason = fused_moe_swap.unsupported(a, w, cfg["BLOCK_N"], cfg["BLOCK_K"], 16, swiglu, weighted,
                                        cfg["num_stages"])
    assert reason == "", reason


@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
@pytest.mark.parametrize("kind", ["uniform", "hot"])
@pytest.mark.parametrize("T", [1, 37, 300, 2000])
def test_fused_moe_swap_matches_reference(expert_type, kind, T):
    """T = 2000 (E = 8, top-3): ~750 rows an expert, three blocks each; "hot": expert 0 in every token."""
    E, k, H, I = 8, 3, 256, 192
    w = make_weights(E, H, I, expert_type, torch.bfloat16, "cuda", seed=T)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=T + 1)
    if kind == "hot":
        ids[:, 0] = 0
        ids[:, 1:] = ids[:, 1:] % (E - 1) + 1
    want64 = reference.moe_experts(x, ids, tw, w, expert_type)
    want = fused_moe(x, ids, tw, w, expert_type, config=TRITON)
    for cfg in (SWAP, SWAP_SMALL, SWAP_PERM):
        op = "up" if expert_type == "swiglu" else "linear"
        assert_runs_swap(cfg[op], x, w[0], expert_type == "swiglu", expert_type == "linear")
        out = fused_moe(x, ids, tw, w, expert_type, config=cfg)
        assert rel_err(out, want64) < TOL
        assert rel_err(out, want) < 5e-3


def test_float16():
    E, k, H, I, T = 8, 2, 256, 128, 400
    w = make_weights(E, H, I, "swiglu", torch.float16, "cuda", seed=1)
    x = torch.randn(T, H, device="cuda", dtype=torch.float16)
    ids, tw = make_routing(T, E, k, "cuda", seed=2)
    out = fused_moe(x, ids, tw, w, config=SWAP)
    assert rel_err(out, reference.moe_experts(x, ids, tw, w, "swiglu")) < TOL


def test_every_block_size_and_split_experts():
    """Experts of 16 v rows for v = 1..18 (every piece rule: pieces, one n256, n256 + n16 / n32), of 1 / 17 / 289 /
    577 rows (padding rows; experts split into two and three blocks) and an empty one: the same FFN as the Triton
    kernel, and padding rows of the intermediate and rows past the batch are never written."""
    counts_l = [16 * v for v in range(1, 19)] + [1, 17, 289, 577, 0]
    E, H, I = len(counts_l), 256, 128
    counts = torch.tensor(counts_l, dtype=torch.int32, device="cuda")
    N = int(counts.sum())
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=3)
    rows = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    want = fused_moe_contiguous(rows, counts, w, config=TRITON)
    assert_runs_swap(UP, rows, w[0], True, False)
    assert rel_err(fused_moe_contiguous(rows, counts, w, config=SWAP), want) < 5e-3
    assert rel_err(fused_moe_contiguous(rows, counts, w, config=SWAP_PERM), want) < 5e-3
    align = moe_align_contiguous(counts, N, 16)
    out = torch.full((N + 64, H), 7.0, device="cuda", dtype=torch.bfloat16)
    inter = torch.zeros(align.sorted_ids.numel(), I, device="cuda", dtype=torch.bfloat16)
    moe_gemm(rows, w[0], inter, align, UP, gather_a=True, scatter_c=False, swiglu=True)
    moe_gemm(inter, w[1], out, align, DOWN, gather_a=False, scatter_c=True)
    assert (out[N:] == 7.0).all(), "a row past the batch was written"
    assert rel_err(out[:N], want) < 5e-3


def test_contiguous_gathered_and_masked_layouts():
    check_layouts(SWAP, TRITON, T=700)


def test_deepseek_dims_against_the_tables():
    """V3 expert dims (H 7168, I 2048), 32 experts, top-8, T = 1024 (232-287 rows an expert: one block each)."""
    E, k, H, I, T = 32, 8, 7168, 2048, 1024
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=3)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=4)
    out = fused_moe(x, ids, tw, w, config=SWAP)
    grouped = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=True,
                   SPLIT_M=64, MERGE_TAIL=True, WGMMA=True, STAGE_C=True)
    want = fused_moe(x, ids, tw, w, config={"up": grouped, "down": {**grouped, "BLOCK_N": 256}})
    assert rel_err(out, want) < 5e-3


def test_cuda_graph_replay_follows_new_routing():
    """The block list is made on the device: a captured call follows new routing (one hot expert: 3 blocks)."""
    E, k, H, I, T = 16, 4, 512, 256, 300
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=8)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=9)
    fused_moe(x, ids, tw, w, config=SWAP)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe(x, ids, tw, w, config=SWAP)
    ids[:, 0] = 0
    ids[:, 1:] = ids[:, 1:] % (E - 1) + 1
    g.replay()
    assert rel_err(out, reference.moe_experts(x, ids, tw, w, "swiglu")) < TOL
