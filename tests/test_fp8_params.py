"""FP8 expert records (moe/params.py, moe/fp8_params.py): quantize/dequantize against the float64 oracle,
the gate/up halves blocked apart, pytree flatten/unflatten/tree_map, the host-only check, and the refusal of
the bf16 paths; model/fp8.py delegating to kernels/fp8_quant.py.

Dimension legend: E experts, H hidden, I intermediate, b0 x b1 the scale block, Ib = ceil(I / b0).
"""

import pytest
import torch
from nanomoe_kernels.fp8_quant import quant_fp8_blocks
from nanomoe_reference.fp8 import dequant_blocks_ref, quant_blocks_ref
from torch.utils import _pytree as pytree

from nanomoe_fn import ExpertBatch, expert_ffn
from nanomoe_fn.model.fp8 import dequantize_blocks, quantize_blocks
from nanomoe_fn.moe.fp8_params import check_fp8_experts, dequantize_experts, quantize_experts
from nanomoe_fn.moe.params import (
    GateParams,
    LinearExperts,
    LinearExpertsFP8,
    MoEParams,
    SwiGLUExperts,
    SwiGLUExpertsFP8,
    cast_params,
    expert_scales,
    expert_tensors,
    refuse_fp8,
    select_experts,
)

F8 = torch.float8_e4m3fn


def swiglu(E: int, H: int, I: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> SwiGLUExperts:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * H**-0.5
    w13[:, I:] *= 100.0  # up rows far larger than gate rows: a shared block would show in the gate's scale
    return SwiGLUExperts(w13.to(dtype), (torch.randn(E, H, I, generator=gen) * I**-0.5).to(dtype))


def expand(s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """[E, Nb, Kb] block scales -> [E, N, K]: every element gets its block's scale."""
    return s.repeat_interleave(block[0], 1)[:, : shape[0]].repeat_interleave(block[1], 2)[..., : shape[1]]


def bytes_of(q: torch.Tensor) -> torch.Tensor:
    return (q if q.dtype == F8 else q.to(F8)).view(torch.uint8)


@pytest.mark.parametrize("E, H, I, block", [(3, 160, 128, (128, 128)), (2, 64, 32, (128, 128)),
                                            (2, 40, 24, (16, 16)), (0, 64, 32, (128, 128))])
def test_quantize_swiglu_matches_reference(E, H, I, block):
    """Each half of w13 and w2 block by block as the oracle does; I % b0 == 0 is w13 quantised whole."""
    experts = swiglu(E, H, I)
    fp8 = quantize_experts(experts, block)
    Ib = -(-I // block[0])
    assert fp8.w13.dtype == F8 and fp8.w13.shape == (E, 2 * I, H) and fp8.w2.shape == (E, H, I)
    assert fp8.w13_scale.shape == (E, 2 * Ib, -(-H // block[1])) and fp8.w13_scale.dtype == torch.float32
    assert fp8.w2_scale.shape == (E, -(-H // block[0]), -(-I // block[1])) and fp8.block == block
    check_fp8_experts(fp8)
    for rows, srows in ((slice(0, I), slice(0, Ib)), (slice(I, 2 * I), slice(Ib, 2 * Ib))):
        q, s = quant_blocks_ref(experts.w13[:, rows], block)
        assert torch.equal(bytes_of(fp8.w13[:, rows]), bytes_of(q)) and torch.equal(fp8.w13_scale[:, srows].double(), s)
    q, s = quant_blocks_ref(experts.w2, block)
    assert torch.equal(bytes_of(fp8.w2), bytes_of(q)) and torch.equal(fp8.w2_scale.double(), s)
    assert fp8.halves_aligned == (I % block[0] == 0) and fp8.num_experts == E
    if fp8.halves_aligned:
        whole_q, whole_s = quant_fp8_blocks(experts.w13, block)
        assert torch.equal(bytes_of(fp8.w13), bytes_of(whole_q)) and torch.equal(fp8.w13_scale, whole_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_round_trip(dtype):
    experts = swiglu(2, 160, 64, dtype)
    fp8 = quantize_experts(experts)
    back = dequantize_experts(fp8, dtype)
    assert isinstance(back, SwiGLUExperts) and back.w13.dtype == dtype and back.w2.dtype == dtype
    # written into another record: the same values, in place
    into = SwiGLUExperts(torch.full_like(experts.w13, 7.0), torch.full_like(experts.w2, 7.0))
    assert dequantize_experts(fp8, torch.float16, out=into) is into
    assert torch.equal(into.w13, back.w13) and torch.equal(into.w2, back.w2)
    with pytest.raises(ValueError, match="out must be a float tensor of q's shape"):
        dequantize_experts(fp8, out=SwiGLUExperts(experts.w13[:1], experts.w2[:1]))
    with pytest.raises(TypeError, match="out must be a SwiGLUExperts .* got LinearExperts"):
        dequantize_experts(fp8, out=LinearExperts(experts.w2))
    I, Ib = 64, 1
    want13 = torch.cat([dequant_blocks_ref(fp8.w13[:, :I], fp8.w13_scale[:, :Ib]),
                        dequant_blocks_ref(fp8.w13[:, I:], fp8.w13_scale[:, Ib:])], dim=1)
    assert torch.equal(back.w13, want13.float().to(dtype))
    assert torch.equal(back.w2, dequant_blocks_ref(fp8.w2, fp8.w2_scale).float().to(dtype))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each weight plus the subnormal step (tests/test_fp8_quant.py)
    scale13 = torch.cat([expand(fp8.w13_scale[:, :Ib], (I, 160)), expand(fp8.w13_scale[:, Ib:], (I, 160))], dim=1)
    for w, d, scale in ((experts.w13, back.w13, scale13), (experts.w2, back.w2, expand(fp8.w2_scale, (160, I)))):
        err = (w.double() - d.double()).abs()
        bound = w.double().abs() * (2.0**-4 + 2.0**-22) + scale.double() * 2.0**-10 * (1 + 2.0**-23)
        if dtype == torch.bfloat16:  # plus the final rounding to bfloat16
            bound = bound + d.double().abs() * 2.0**-8
        assert (err <= bound).all()


def test_linear_record():
    w = torch.randn(3, 200, 200)
    fp8 = quantize_experts(LinearExperts(w))
    assert isinstance(fp8, LinearExpertsFP8) and fp8.w_scale.shape == (3, 2, 2) and fp8.num_experts == 3
    q, s = quant_blocks_ref(w)
    assert torch.equal(bytes_of(fp8.w), bytes_of(q)) and torch.equal(fp8.w_scale.double(), s)
    back = dequantize_experts(fp8, torch.float32)
    assert isinstance(back, LinearExperts) and torch.equal(back.w, dequant_blocks_ref(fp8.w, fp8.w_scale).float())
    assert expert_tensors(fp8) == (fp8.w,) and expert_scales(fp8) == (fp8.w_scale,)


def test_pytree_flatten_unflatten_tree_map():
    fp8 = quantize_experts(swiglu(3, 40, 24), (16, 16))
    leaves, spec = pytree.tree_flatten(fp8)
    assert [t.dtype for t in leaves] == [F8, torch.float32, F8, torch.float32]
    assert all(a is b for a, b in zip(leaves, (fp8.w13, fp8.w13_scale, fp8.w2, fp8.w2_scale)))
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, SwiGLUExpertsFP8) and again.block == (16, 16) and again.w2 is fp8.w2
    clone = pytree.tree_map(lambda t: t.clone(), fp8)
    assert clone.block == (16, 16) and all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                                           for a, b in zip(pytree.tree_leaves(clone), leaves))
    paths = [pytree.keystr(k) for k, _ in pytree.tree_flatten_with_path(fp8)[0]]
    assert paths == [".w13", ".w13_scale", ".w2", ".w2_scale"]
    picked = select_experts(fp8, torch.tensor([2, 0]))
    assert picked.num_experts == 2 and picked.block == (16, 16)
    assert torch.equal(picked.w13_scale, fp8.w13_scale[[2, 0]])
    assert torch.equal(picked.w2.view(torch.uint8), fp8.w2.view(torch.uint8)[[2, 0]])
    layer = MoEParams(GateParams(torch.randn(3, 40)), fp8)
    assert isinstance(pytree.tree_map(lambda t: t, layer).experts, SwiGLUExpertsFP8)
    assert expert_tensors(fp8) == (fp8.w13, fp8.w2) and expert_scales(fp8) == (fp8.w13_scale, fp8.w2_scale)
    assert expert_scales(swiglu(1, 8, 8)) == ()


def test_bf16_paths_refuse_fp8_records():
    fp8 = quantize_experts(swiglu(2, 64, 32))
    batch = ExpertBatch(torch.randn(3, 64), torch.tensor([2, 1]))
    with pytest.raises(TypeError, match="SwiGLUExpertsFP8"):
        expert_ffn(fp8, batch, backend="bmm")
    with pytest.raises(TypeError, match=r"expert backend 'bmm' runs bf16/fp16/fp32 experts, got SwiGLUExpertsFP8 "
                                        r"\(block-scaled FP8 weights\): use an FP8 expert backend, or dequantize"):
        refuse_fp8(fp8, "expert backend 'bmm'")
    refuse_fp8(swiglu(1, 8, 8), "anything")  # bf16 records pass
    with pytest.raises(TypeError, match="cast_params runs bf16"):
        cast_params(MoEParams(GateParams(torch.randn(2, 64)), fp8), torch.bfloat16)
    # dequantised, the same record runs on the bf16 path
    out = expert_ffn(dequantize_experts(fp8, torch.float32), batch, backend="bmm")
    assert out.x.shape == (3, 64) and torch.isfinite(out.x).all()


def test_check_fp8_experts_names_the_field():
    fp8 = quantize_experts(swiglu(2, 64, 32))
    with pytest.raises(TypeError, match=r"experts.w13 must have dtype torch.float8_e4m3fn, got torch.bfloat16"):
        check_fp8_experts(SwiGLUExpertsFP8(fp8.w13.to(torch.bfloat16), fp8.w13_scale, fp8.w2, fp8.w2_scale))
    with pytest.raises(ValueError, match=r"experts.w13_scale must have shape \[2, 2, 1\], got \[2, 1, 1\]"):
        check_fp8_experts(SwiGLUExpertsFP8(fp8.w13, fp8.w13_scale[:, :1], fp8.w2, fp8.w2_scale))
    with pytest.raises(TypeError, match="experts.w2_scale must have dtype torch.float32"):
        check_fp8_experts(SwiGLUExpertsFP8(fp8.w13, fp8.w13_scale, fp8.w2, fp8.w2_scale.half()))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        check_fp8_experts(SwiGLUExpertsFP8(fp8.w13, fp8.w13_scale, fp8.w2, fp8.w2_scale, (128, 0)))
    with pytest.raises(TypeError, match="experts must be SwiGLUExpertsFP8 or LinearExpertsFP8, got SwiGLUExperts"):
        check_fp8_experts(swiglu(1, 8, 8))
    with pytest.raises(TypeError, match="experts must be SwiGLUExperts or LinearExperts, got SwiGLUExpertsFP8"):
        quantize_experts(fp8)
    with pytest.raises(ValueError, match=r"experts.w13 must be \[E, 2I=64, H\]"):
        quantize_experts(SwiGLUExperts(torch.randn(2, 60, 64), torch.randn(2, 64, 32)))


def test_model_fp8_delegates():
    """nanomoe_fn.model.fp8 (the checkpoint loader's) is the 2-D case of kernels/fp8_quant.py."""
    w = torch.randn(300, 160, dtype=torch.bfloat16)
    q, s = quantize_blocks(w)
    q2, s2 = quant_fp8_blocks(w)
    assert torch.equal(bytes_of(q), bytes_of(q2)) and torch.equal(s, s2) and s.shape == (3, 2)
    assert torch.equal(dequantize_blocks(q, s), dequant_blocks_ref(q, s).float())
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_blocks(w[None])
    with pytest.raises(ValueError, match=r"needs scales of shape \(3, 2\)"):
        dequantize_blocks(q, s[:2])


@pytest.mark.parametrize("write_back", [False, True])
def test_model_with_fp8_experts(write_back):
    """Every MoE layer's experts quantised; write_back rounds the bf16 experts (and what shares their tensors)
    to exactly the FP8 values, in place; dense layers and the rest are the same objects."""
    from nanomoe_fn.model.config import model_preset
    from nanomoe_fn.model.params import init_model_params, with_fp8_experts

    cfg = model_preset("tiny-fp8")
    params = init_model_params(cfg, torch.bfloat16, "cpu", seed=3)
    moe = [lay.moe for lay in params.layers if lay.moe is not None]
    before = [SwiGLUExperts(m.experts.w13.clone(), m.experts.w2.clone()) for m in moe]
    fp8 = with_fp8_experts(params, write_back=write_back)
    assert with_fp8_experts(fp8).layers[1].moe.experts is fp8.layers[1].moe.experts  # FP8 already: kept
    for m, q, old in zip(moe, (lay.moe for lay in fp8.layers if lay.moe is not None), before):
        assert isinstance(q.experts, SwiGLUExpertsFP8) and q.gate is m.gate and q.shared is m.shared
        ref = quantize_experts(old)  # quantised from the weights as they were
        assert torch.equal(bytes_of(q.experts.w13), bytes_of(ref.w13)) and torch.equal(q.experts.w2_scale, ref.w2_scale)
        want = dequantize_experts(q.experts, torch.bfloat16)
        rounded = torch.equal(m.experts.w13, want.w13) and torch.equal(m.experts.w2, want.w2)
        unchanged = torch.equal(m.experts.w13, old.w13) and torch.equal(m.experts.w2, old.w2)
        assert (rounded, unchanged) == ((True, False) if write_back else (False, True))
    assert fp8.layers[0].dense is params.layers[0].dense and fp8.embed is params.embed


def test_block_layout_records():
    """tile_experts / untile_experts: the weights' bytes move, the scales stay; the check, dequantisation and
    the backends that run rows only (a clear refusal) all handle the block layout."""
    from nanomoe_fn.moe.fp8_params import tile_experts, untile_experts

    fp8 = quantize_experts(swiglu(3, 256, 128))
    t = tile_experts(fp8)
    assert t.tiled and not fp8.tiled and t.w13.shape == (3, 2, 2, 128, 128) and t.w2.shape == (3, 2, 1, 128, 128)
    assert (t.hidden, t.intermediate, t.num_experts) == (256, 128, 3) and t.halves_aligned
    assert t.w13_scale is fp8.w13_scale and tile_experts(t) is t and untile_experts(fp8) is fp8
    check_fp8_experts(t)
    back = untile_experts(t)
    for a, b in ((back.w13, fp8.w13), (back.w2, fp8.w2)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert t.w13[1, 1, 0, 5, 7].view(torch.uint8) == fp8.w13[1, 128 + 5, 7].view(torch.uint8)
    assert torch.equal(dequantize_experts(t, torch.float32).w13, dequantize_experts(fp8, torch.float32).w13)
    with pytest.raises(ValueError, match="w2_scale"):
        check_fp8_experts(SwiGLUExpertsFP8(t.w13, t.w13_scale, t.w2, t.w13_scale, t.block))
    with pytest.raises(ValueError, match="multiples of 128"):
        tile_experts(quantize_experts(swiglu(2, 192, 128)))
    with pytest.raises(ValueError, match="tile_experts needs SwiGLUExpertsFP8"):
        tile_experts(quantize_experts(swiglu(2, 256, 128), block=(64, 128)))
    rows = torch.randn(5, 256).half()
    with pytest.raises(ValueError, match="block layout .tile_experts.: use triton_fp8"):
        expert_ffn(t, ExpertBatch(rows, torch.tensor([2, 0, 3])), "triton_w8a16")
