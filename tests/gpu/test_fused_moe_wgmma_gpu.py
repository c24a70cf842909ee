"""The warp-specialised wgmma expert GEMM (kernels/fused_moe_wgmma.py) on a Hopper GPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
Every entry point runs with `WGMMA` configs against reference.moe_experts (float64) and against the Triton
kernel's configs; each test first asserts the wgmma kernel really runs (`wgmma_unsupported` is ''), so a
fallback to the Triton kernel cannot pass it. Routings: uniform, one hot expert, empty experts, one token.
Marked `gpu`; skipped off sm_90 or below Triton 3.6.
"""

import nanomoe_reference as reference
import pytest
import torch
from nanomoe_kernels import fused_moe_wgmma
from nanomoe_kernels.fused_moe import fused_moe, fused_moe_contiguous
from nanomoe_kernels.fused_moe_kernel import check_config, moe_gemm, wgmma_unsupported
from nanomoe_kernels.moe_align import moe_align, moe_align_contiguous
from nanomoe_reference.expert_rows import make_routing, make_weights

from tests.gpu.expert_layouts import check_layouts, rel_err

_OK = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and fused_moe_wgmma.supported_triton()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason="needs an sm_90 GPU and Triton >= 3.6")]
TOL = 2e-2
UP = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, SPLIT_M=64, WGMMA=True)
DOWN = {**UP, "BLOCK_N": 256}
WG = {"up": UP, "down": DOWN, "linear": DOWN}
# program groups of at most 2 blocks of one expert (a hot expert's 3+ blocks split), and groups off
WG_SMALL = {"up": {**UP, "BLOCK_N": 64, "num_stages": 2, "GROUP_M": 1, "EXPERT_GROUPS": 2},
            "down": {**DOWN, "BLOCK_N": 128, "num_stages": 3, "EXPERT_GROUPS": False},
            "linear": {**DOWN, "BLOCK_N": 128, "num_stages": 3, "EXPERT_GROUPS": 2}}
TRITON = {op: {**c, "WGMMA": False, "MERGE_TAIL": True, "USE_TMA": True} for op, c in WG.items()}
# carried tails (kernels/fused_moe_wgmma_tail.py): 32 rows with two B pieces a warpgroup (SwiGLU gate / up, and the
# 256-column down tile, staged at 3 stages to fit), 16 rows with one piece (128-column down tile)
TAIL32 = {"up": {**UP, "TAIL_N": 32}, "down": {**DOWN, "TAIL_N": 32, "STAGE_C": True, "num_stages": 3},
          "linear": {**DOWN, "TAIL_N": 32, "STAGE_C": True, "num_stages": 3}}
TAIL16 = {"up": {**UP, "TAIL_N": 16}, "down": {**DOWN, "BLOCK_N": 128, "TAIL_N": 16},
          "linear": {**DOWN, "BLOCK_N": 128, "TAIL_N": 16}}


def staged(cfgs: dict) -> dict:
    """The same configs with the output tile stored through shared memory (STAGE_C)."""
    return {op: {**c, "STAGE_C": True} for op, c in cfgs.items()}


def routing(T: int, E: int, k: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uniform; "hot": expert 0 in every token; "half_empty": only the even experts get rows."""
    ids, tw = make_routing(T, E, k, "cuda", seed=seed)
    if kind == "hot":
        ids[:, 0] = 0
        ids[:, 1:] = ids[:, 1:] % (E - 1) + 1
    elif kind == "half_empty":
        ids = torch.rand(T, E // 2, device="cuda").topk(k, dim=1).indices.to(torch.int32) * 2
    return ids.contiguous(), tw


def assert_runs_wgmma(cfg: dict, x: torch.Tensor, w: torch.Tensor, swiglu: bool) -> None:
    align = moe_align(torch.zeros(1, 1, dtype=torch.int32, device=x.device), w.shape[0], 64)
    reason = wgmma_unsupported(check_config(cfg), x, w, align, swiglu)
    assert reason == "", reason


@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
@pytest.mark.parametrize("kind", ["uniform", "hot", "half_empty"])
@pytest.mark.parametrize("T", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_wgmma_matches_reference(expert_type, kind, T, dtype):
    E, k, H, I = 8, 3, 256, 192
    w = make_weights(E, H, I, expert_type, dtype, "cuda", seed=T)
    x = torch.randn(T, H, device="cuda", dtype=dtype)
    ids, tw = routing(T, E, k, kind, seed=T + 1)
    for cfg in (WG, WG_SMALL):
        assert_runs_wgmma(cfg["up" if expert_type == "swiglu" else "linear"], x, w[0], expert_type == "swiglu")
        out = fused_moe(x, ids, tw, w, expert_type, config=cfg)
        assert rel_err(out, reference.moe_experts(x, ids, tw, w, expert_type)) < TOL
        want = fused_moe(x, ids, tw, w, expert_type, config=TRITON)
        assert rel_err(out, want) < 5e-3
        # the staged epilogue moves the same rounded values: the same bits
        assert torch.equal(fused_moe(x, ids, tw, w, expert_type, config=staged(cfg)), out)


@pytest.mark.parametrize("T", [64, 1024])
def test_deepseek_dims_against_the_triton_kernel(T):
    """V3 expert dims (H 7168, I 2048), 32 experts, top-8: the wgmma and Triton kernels agree, and sampled
    tokens match float32 torch math."""
    E, k, H, I = 32, 8, 7168, 2048
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=3)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=4)
    out = fused_moe(x, ids, tw, w, config=WG)
    assert rel_err(out, fused_moe(x, ids, tw, w, config=TRITON)) < 5e-3
    assert torch.equal(fused_moe(x, ids, tw, w, config=staged(WG)), out)
    rows = torch.arange(0, T, max(1, T // 16), device="cuda")
    w13, w2 = (t.float() for t in w)
    want = torch.zeros(rows.numel(), H, device="cuda")
    for j in range(k):
        e, xs = ids[rows, j].long(), x[rows].float()
        gu = torch.einsum("th,tnh->tn", xs, w13[e])
        h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
        want += tw[rows, j, None].float() * torch.einsum("ti,thi->th", h.bfloat16().float(), w2[e])
    assert rel_err(out[rows], want) < TOL


def test_contiguous_gathered_and_masked_layouts():
    check_layouts(WG, TRITON, T=200)


@pytest.mark.parametrize("stage_c, tail_n", [(False, 0), (True, 0), (False, 32), (True, 16)])
def test_padding_rows_are_never_written(stage_c, tail_n):
    """Rows the alignment pads (sentinel ids) and the second half of a tail block keep the output's old bytes;
    with carried tails too (expert 3's two tail rows ride on its main block)."""
    E, H, I = 4, 128, 128
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=7)
    counts = torch.tensor([1, 0, 65, 130], dtype=torch.int32, device="cuda")   # tails of 64 after 128-row blocks
    N = int(counts.sum())
    rows = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    align = moe_align_contiguous(counts, N, 64)
    out = torch.full((N + 64, I), 7.0, device="cuda", dtype=torch.bfloat16)
    inter = torch.full((align.sorted_ids.numel(), I), 7.0, device="cuda", dtype=torch.bfloat16)
    a_sorted = torch.zeros(align.sorted_ids.numel(), H, device="cuda", dtype=torch.bfloat16)
    used = torch.arange(align.sorted_ids.numel(), device="cuda") < align.num_padded   # entries past it: garbage
    live = used & (align.sorted_ids >= 0) & (align.sorted_ids < N)
    a_sorted[live] = rows[align.sorted_ids[live].long()]
    up, down = ({**c, "STAGE_C": stage_c, "TAIL_N": tail_n, "num_stages": 3} for c in (UP, DOWN))
    moe_gemm(a_sorted, w[0], inter, align, up, gather_a=False, scatter_c=False, swiglu=True)
    assert (inter[~live] == 7.0).all(), "a padding row of the intermediate was written"
    moe_gemm(inter, w[1], out, align, down, gather_a=False, scatter_c=True)
    assert (out[N:] == 7.0).all(), "a row past the batch was written"
    assert rel_err(out[:N], fused_moe_contiguous(rows, counts, w, config=TRITON)) < 5e-3


@pytest.mark.parametrize("tails, T", [(False, 96), (True, 600)])
def test_cuda_graph_replay_follows_new_routing(tails, T):
    """A captured call follows new routing; with carried tails (T = 600: ~150 rows an expert) which blocks carry
    changes with the routing too."""
    E, k, H, I = 16, 4, 512, 256
    cfg = TAIL32 if tails else WG
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=8)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=9)
    fused_moe(x, ids, tw, w, config=cfg)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe(x, ids, tw, w, config=cfg)
    new_ids, new_tw = routing(T, E, k, "hot", seed=10)
    ids.copy_(new_ids)
    tw.copy_(new_tw)
    g.replay()
    assert rel_err(out, reference.moe_experts(x, ids, tw, w, "swiglu")) < TOL


def tail_counts(tail_n: int) -> list[int]:
    """Expert row counts around the carried-tail rule: tails of 1, tail_n and tail_n + 1 rows after one or two main
    blocks, a lone tail (no main block), an exact main block, an empty expert, a main block of 67 rows."""
    return [128 + 1, 128 + tail_n, 128 + tail_n + 1, 256 + tail_n, 3, 128, 0, 67, 256 + 40, 130]


@pytest.mark.parametrize("tails", ["TAIL32", "TAIL16"])
@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
def test_carried_tails_match(tails, expert_type):
    """Carried tails against float64 and the Triton kernel, at counts around the rule; the rows outside carried
    tails are the same bits as without them (the main blocks' MMAs are unchanged), the carried rows within float32
    summation order."""
    cfg = {"TAIL32": TAIL32, "TAIL16": TAIL16}[tails]
    tail_n = cfg["up"]["TAIL_N"]
    E, H, I = 10, 256, 256
    counts = torch.tensor(tail_counts(tail_n), dtype=torch.int32, device="cuda")
    N = int(counts.sum())
    w = make_weights(E, H, I, expert_type, torch.bfloat16, "cuda", seed=11)
    rows = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    op = "up" if expert_type == "swiglu" else "linear"
    assert_runs_wgmma(cfg[op], rows, w[0], expert_type == "swiglu")
    assert_runs_wgmma(cfg["down"], rows.new_empty(1, I), w[-1], False)
    got = fused_moe_contiguous(rows, counts, w, expert_type, config=cfg)
    base = fused_moe_contiguous(rows, counts, w, expert_type, config=WG)
    want = fused_moe_contiguous(rows, counts, w, expert_type, config=TRITON)
    assert rel_err(got, want) < 5e-3
    # carried: rows past each expert's main blocks when they number at most tail_n (and there is a main block)
    carried = torch.zeros(N, dtype=torch.bool)
    start = 0
    for n in counts.tolist():
        tail = n % 128
        if n >= 128 and 0 < tail <= tail_n:
            carried[start + n - tail:start + n] = True
        start += n
    assert carried.sum() == 1 + tail_n + tail_n + 2   # experts 0, 1, 3 and 9 carry; 2, 4 and 8 do not
    assert torch.equal(got[~carried], base[~carried])
    assert rel_err(got[carried], base[carried]) < 5e-3
    # float64: each row through its expert (top-1 routing with weight 1 is the contiguous layout's math)
    expert_of = torch.repeat_interleave(torch.arange(E, device="cuda"), counts.long()).to(torch.int32)[:, None]
    ref = reference.moe_experts(rows, expert_of, torch.ones(N, 1, device="cuda"), w, expert_type)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("T", [37, 1024])
def test_carried_tails_routed(T):
    """fused_moe (gathered up GEMM, scattered down GEMM with top-k weights) with carried tails against float64
    and against the same configs without them: at T = 37 no block carries (the TAIL_N kernels' plain path), at
    V3 dims and T = 1024 (32 experts: ~256 rows an expert) about half the experts' last blocks do."""
    E, k, H, I = (8, 3, 256, 192) if T < 100 else (32, 8, 7168, 2048)
    w = make_weights(E, H, I, "swiglu", torch.bfloat16, "cuda", seed=T)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids, tw = make_routing(T, E, k, "cuda", seed=T + 2)
    for cfg in (TAIL32, TAIL16):
        out = fused_moe(x, ids, tw, w, config=cfg)
        assert rel_err(out, fused_moe(x, ids, tw, w, config=WG)) < 5e-3
        if T < 100:
            assert rel_err(out, reference.moe_experts(x, ids, tw, w, "swiglu")) < TOL
