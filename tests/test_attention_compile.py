"""Triton attention under torch.compile: the MLA kernels are custom ops there (nanomoe_fn/attention/
triton_ops.py), so a decoder layer's decode step with triton attention compiles as one graph
(fullgraph=True; aot_eager traces what inductor would get) and equals the eager layer, over contiguous and
paged caches, sequential and two-batch overlap, a second call on new tokens included (no retrace); the
prefill kernel compiles as one graph too. float32; the kernels run under TRITON_INTERPRET=1 on the CPU, on
the GPU where there is one.

Dimension legend: B sequences, S new tokens per sequence, L cache rows, H hidden.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nanomoe_fn import MLAConfig, MoEConfig, init_contiguous_cache, init_mla_params, init_moe_params  # noqa: E402
from nanomoe_fn.attention.backends import torch_prefill, triton_prefill, triton_supports  # noqa: E402
from nanomoe_fn.attention.cache import init_paged_cache  # noqa: E402
from nanomoe_fn.decoder import DECODER_MOE_PROGRAM, DecoderParams, decoder_context, decoder_layer  # noqa: E402
from nanomoe_fn.pipeline import sequential, two_batch_overlap  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
H, B, L = 32, 3, 24
MLA = MLAConfig(hidden_size=H, num_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=16, v_head_dim=16)
MOE = MoEConfig(hidden=H, intermediate=16, num_experts=8, top_k=2, n_shared_experts=1)
pytestmark = pytest.mark.skipif(not triton_supports(MLA, DEV)[0],
                                reason="needs Triton (a GPU, or TRITON_INTERPRET=1 set before kernels/ is imported)")


def _params() -> DecoderParams:
    g = torch.Generator().manual_seed(0)
    attn = init_mla_params(MLA, torch.float32, generator=g)
    norms = [1 + 0.1 * torch.randn(H, generator=g) for _ in range(2)]
    params = DecoderParams(norms[0], attn, norms[1], moe=init_moe_params(MOE, torch.float32, generator=g))
    return torch.utils._pytree.tree_map(lambda t: t.to(DEV) if isinstance(t, torch.Tensor) else t, params)


def _cache(paged: bool):
    """B sequences with 5, 9 and 13 random rows already in the cache."""
    g = torch.Generator().manual_seed(1)
    cache = (init_paged_cache(B, L, MLA.cache_dim, torch.float32, DEV, page_size=4, generator=g) if paged
             else init_contiguous_cache(B, L, MLA.cache_dim, torch.float32, DEV))
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(2)))
    cache.lens.copy_(torch.tensor([5, 9, 13], dtype=torch.int32))
    return cache


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("plan_name", ["sequential", "tbo"])
def test_decode_step_with_triton_attention_compiles_as_one_graph(paged, plan_name):
    params = _params()
    plan = (sequential if plan_name == "sequential" else two_batch_overlap)(DECODER_MOE_PROGRAM)
    ctx = decoder_context(MLA, "triton", MOE, capacity=2 * B, check=False)  # masked experts: fixed shapes
    ctxs = [ctx] * plan.micro_batches

    def step(x, cache):
        out, new = decoder_layer(params, x, new_positions(cache), cache, ctxs, plan)
        return out, new.lens

    def new_positions(cache):
        return cache.lens.long()[:, None]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    for seed in (3, 4):  # the second call runs the same graph on new tokens
        x = torch.randn(B, 1, H, generator=torch.Generator().manual_seed(seed)).to(DEV)
        want_cache, got_cache = _cache(paged), _cache(paged)
        want, want_lens = step(x, want_cache)
        got, got_lens = compiled(x, got_cache)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got_lens, want_lens) and want_lens.tolist() == [6, 10, 14]
        torch.testing.assert_close(got_cache.kv, want_cache.kv, rtol=1e-5, atol=1e-5)  # the new rows, in place
        assert not torch.equal(want_cache.kv, _cache(paged).kv)


def test_prefill_kernel_compiles_as_one_graph():
    g = torch.Generator().manual_seed(5)
    Bp, S, N, D = 2, 6, 2, 16
    q_nope, q_pe, k_nope, v = (torch.randn(Bp, S, N, D, generator=g).to(DEV) for _ in range(4))
    k_pe = torch.randn(Bp, S, D, generator=g).to(DEV)
    pos = torch.arange(S).repeat(Bp, 1)
    pos[1, 4:] = -1  # a padded sequence: its rows are 0
    pos = pos.to(DEV)
    compiled = torch.compile(triton_prefill, fullgraph=True, backend="aot_eager")
    got = compiled(q_nope, q_pe, k_nope, k_pe, v, pos, MLA)
    torch.testing.assert_close(got, triton_prefill(q_nope, q_pe, k_nope, k_pe, v, pos, MLA))
    tol = 1e-2 if DEV.type == "cuda" else 1e-4  # the kernel's float32 dots run in TF32 on GPUs
    torch.testing.assert_close(got, torch_prefill(q_nope, q_pe, k_nope, k_pe, v, pos, MLA), rtol=tol, atol=tol)
    assert got[1, 4:].abs().max() == 0
