"""The swap-AB expert GEMM's host side on the CPU: its device-made block list (kernels/moe_swap_blocks.py) against a
Python model, the SWAP config key, and the FFN with SWAP configs off Hopper (the Triton kernel on the same 16-row
alignment) against the float64 oracle. The kernel itself runs in tests/gpu/test_fused_moe_swap_gpu.py.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, N rows of a batch.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import nanomoe_kernels.fused_moe as fm  # noqa: E402
import nanomoe_kernels.fused_moe_kernel as fmk  # noqa: E402
import nanomoe_kernels.moe_align as ma  # noqa: E402
import nanomoe_kernels.moe_swap_blocks as msb  # noqa: E402
import nanomoe_reference as reference  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels import fused_moe_swap  # noqa: E402
from nanomoe_reference.expert_rows import make_routing, make_weights  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not fmk.runs_interpreted():
    for mod in (ma, msb, fmk, fm):   # kernels/ was imported before the variable was set: decorate them again
        importlib.reload(mod)

pytestmark = pytest.mark.skipif(not fmk.runs_interpreted(),
                                reason="CPU kernel tests run under TRITON_INTERPRET=1 (GPU: tests/gpu/)")
SWAP = {"up": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True),
        "down": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True),
        "linear": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4, SWAP=True)}


def model_blocks(padded: list[int]) -> list[tuple[int, int, int]]:
    """(first aligned row, rows, expert) per block, written from the module docstring's rule."""
    out, start = [], 0
    for e, c in enumerate(padded):
        if c:
            nb = -(-c // msb.MOST)
            per_block = -(-c // nb)
            chunk = -(-per_block // 16) * 16
            out += [(start + j * chunk, min(chunk, c - j * chunk), e) for j in range(nb)]
        start += c
    return out


def check_blocks(counts: list[int]) -> None:
    """swap_blocks over an alignment of these counts equals model_blocks, count and padding entries included."""
    c = torch.tensor(counts, dtype=torch.int32)
    align = ma.moe_align_contiguous(c, int(c.sum()), 16)
    b = msb.swap_blocks(align)
    padded = align.padded_counts.tolist()
    want = model_blocks(padded)
    n = int(b.count)
    assert n == len(want) <= b.rows.numel() == msb.max_swap_blocks(align)
    got = list(zip(b.rows[:n].tolist(), b.sizes[:n].tolist(), b.experts[:n].tolist()))
    assert got == want
    assert (b.sizes[n:] == 0).all()
    # every aligned row in exactly one block of its own expert, every block at most MOST rows, in 16-row steps
    assert sum(s for _, s, _ in got) == sum(padded)
    assert all(0 < s <= msb.MOST and s % 16 == 0 for _, s, _ in got)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 700), min_size=1, max_size=40))
def test_swap_blocks_match_the_rule(counts):
    check_blocks(counts)


@pytest.mark.parametrize("counts", [[300] * 256, [200, 0, 77] * 70, [300_000, 5, 0, 1000]],
                         ids=["256x300", "210_mixed", "few_huge"])
def test_swap_blocks_over_many_programs(counts):
    # programs of BB blocks each (16 at 256 experts, 1024 at 4): these lists need several of them
    check_blocks(counts)


def test_swap_blocks_need_the_16_row_alignment():
    align = ma.moe_align_contiguous(torch.tensor([3, 5], dtype=torch.int32), 8, 64)
    with pytest.raises(ValueError, match="alignment to 16 rows"):
        msb.swap_blocks(align)


def test_swap_blocks_of_no_experts_and_the_ring_fits():
    b = msb.swap_blocks(ma.moe_align_contiguous(torch.zeros(0, dtype=torch.int32), 0, 16))
    assert int(b.count) == 0 and b.rows.numel() == 0
    # 4 stages of the weight tile and 288 token rows, plus the offsets, fit an H100 / H200 block; 5 do not
    assert fused_moe_swap.smem_bytes(4) == 4 * (128 + 288) * 64 * 2 + 288 * 8 <= fused_moe_swap.SMEM_BYTES
    assert fused_moe_swap.smem_bytes(5) > fused_moe_swap.SMEM_BYTES


def test_swap_config_key():
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    assert fmk.check_config({**base, "SWAP": True})["SWAP"] is True
    assert fmk.check_config(base)["SWAP"] is False
    for bad in ({"SWAP": True, "BLOCK_M": 128}, {"SWAP": True, "WGMMA": True}, {"SWAP": 1}):
        with pytest.raises(ValueError, match="SWAP"):
            fmk.check_config({**base, **bad})


def test_swap_says_why_not_off_hopper():
    w = torch.zeros(4, 256, 128, dtype=torch.bfloat16)
    a = torch.zeros(32, 128, dtype=torch.bfloat16)
    reason = fused_moe_swap.unsupported(a, w, 128, 64, 16, False, False, 4)
    assert reason and ("GPU" in reason or "Triton" in reason)


@pytest.mark.parametrize("expert_type", ["swiglu", "linear"])
@pytest.mark.parametrize("T", [0, 5, 90])
def test_swap_configs_match_reference_off_hopper(expert_type, T):
    """Off Hopper a SWAP config runs the Triton kernel on the 16-row alignment: the same FFN."""
    E, k, H, I = 6, 2, 128, 64
    w = make_weights(E, H, I, expert_type, torch.float32, "cpu", seed=T)
    x = torch.randn(T, H)
    ids, tw = make_routing(T, E, k, "cpu", seed=T + 1)
    out = fm.fused_moe(x, ids, tw, w, expert_type, config=SWAP)
    assert out.shape == (T, H)
    if T:
        want = reference.moe_experts(x, ids, tw, w, expert_type)
        assert float((out.double() - want).norm() / want.norm()) < 2e-5
