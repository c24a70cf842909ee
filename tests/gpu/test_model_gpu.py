"""The whole model on GPUs: generation with the decode step in a CUDA graph equals eager generation (Triton and
torch backends, contiguous and paged caches, float32 and bf16), logits equal transformers' in float32 with the
Triton backends, and expert-parallel generation on 2 GPUs (prefill over the torch comm, decode over nvlink in
a CUDA graph) equals single-GPU generation token for token.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward
from nanomoe_fn.model.generate import generate
from nanomoe_fn.model.params import init_model_params
from nanomoe_fn.model.sampling import SamplingConfig
from tests.helpers import init_nccl_rank, spawn_bounded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backends", [("torch", "triton"), ("triton", "triton")])
@pytest.mark.parametrize("paged", [False, True])
def test_graph_generation_equals_eager(dtype, backends, paged):
    cfg = model_preset("tiny")
    params = init_model_params(cfg, dtype, "cuda", seed=4)
    ctx = ModelContext(cfg, attn_backend=backends[0], expert_backend=backends[1])
    s = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    eager = generate(params, PROMPTS, ctx, s, paged=paged)
    graph = generate(params, PROMPTS, ctx, s, paged=paged, cuda_graph=True)
    assert graph == eager
    if backends[0] == "triton" and not paged:  # inductor-compiled glue between the Triton kernels, in the graph
        assert generate(params, PROMPTS, ctx, s, cuda_graph=True, compile=True) == eager
    sampled = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    assert generate(params, PROMPTS, ctx, sampled, cuda_graph=True) == generate(params, PROMPTS, ctx, sampled)


@pytest.mark.parametrize("backend", ["triton_fp8", "triton_w8a16"])
def test_fp8_expert_generation_graph_equals_eager(backend):
    """FP8 experts (bench_model --expert-weights fp8): the decode step in a CUDA graph (and compiled glue)
    generates the eager tokens; W8A16's logits are bf16 experts' on the same rounded weights."""
    from nanomoe_fn.model.params import with_fp8_experts

    cfg = model_preset("tiny-fp8")
    params = init_model_params(cfg, torch.bfloat16, "cuda", seed=4)
    fp8 = with_fp8_experts(params, write_back=True)
    ctx = ModelContext(cfg, attn_backend="triton", expert_backend=backend)
    s = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    eager = generate(fp8, PROMPTS, ctx, s)
    assert generate(fp8, PROMPTS, ctx, s, cuda_graph=True) == eager
    assert generate(fp8, PROMPTS, ctx, s, cuda_graph=True, compile=True) == eager
    if backend == "triton_w8a16":  # bf16 activations: the logits of bf16 experts on the same rounded weights
        ids = torch.tensor([p[:2] for p in PROMPTS], device="cuda")
        pos = torch.arange(2, device="cuda").expand(3, 2)
        logits = [model_forward(p, ids, pos, init_caches(cfg, 3, 4, torch.bfloat16, "cuda"), c)[0].float()
                  for p, c in ((fp8, ctx), (params, ModelContext(cfg, attn_backend="triton", expert_backend="triton")))]
        assert (logits[0] - logits[1]).norm() <= 0.05 * logits[1].norm()


def test_uncapturable_backend_is_named():
    cfg = model_preset("tiny")
    params = init_model_params(cfg, torch.float32, "cuda", seed=4)
    with pytest.raises(ValueError, match="expert backend 'bmm'"):  # its contiguous path reads counts on the host
        generate(params, PROMPTS, ModelContext(cfg, expert_backend="bmm"), cuda_graph=True)


def test_logits_match_transformers_with_triton_backends():
    pytest.importorskip("transformers")
    from nanomoe_fn.model.from_transformers import params_from_hf
    from nanomoe_fn.model.hf_config import config_from_hf
    from tests.hf_models import tiny_v3

    model = tiny_v3("random").cuda()
    cfg = config_from_hf(model.config.to_dict())
    params = params_from_hf(model, cfg)
    ids = torch.randint(2, cfg.vocab_size, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    ctx = ModelContext(cfg, attn_backend="triton", expert_backend="triton")
    caches = init_caches(cfg, 2, 32, torch.float32, "cuda")
    got, caches = model_forward(params, ids[:, :8], torch.arange(8, device="cuda").expand(2, 8), caches, ctx)
    assert float((got - want[:, :8]).norm() / want[:, :8].norm()) < 2e-3
    for t in range(8, 12):
        step, caches = model_forward(params, ids[:, t:t + 1], torch.full((2, 1), t, device="cuda"), caches, ctx)
        assert float((step[:, 0] - want[:, t]).norm() / want[:, t].norm()) < 2e-3


def _ep_rank(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm
    from nanomoe_fn.comm.torch_dist import TorchComm
    from nanomoe_fn.eplb.placement import Placement

    device = init_nccl_rank(rank, port, 2)
    cfg = model_preset("tiny")
    placement = Placement.identity(cfg.moe.num_experts, 2)
    params = init_model_params(cfg, torch.float32, device, seed=6, placement=placement, rank=rank)
    mine = PROMPTS[rank::2]
    ctx = ModelContext(cfg, TorchComm(timeout_s=60), placement, "triton", "triton")
    dctx = ModelContext(cfg, NvlinkComm(2, cfg.hidden, cfg.moe.top_k, placement.num_physical, torch.float32,
                                        timeout_s=60), placement, "triton", "triton")
    s = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    # the torch comm's decode mode: one max_tokens on both ranks (the most sequences a rank holds)
    tctx = ModelContext(cfg, TorchComm(timeout_s=60, max_tokens=-(-len(PROMPTS) // 2)), placement, "triton", "triton")
    out = {"graph": generate(params, mine, ctx, s, cuda_graph=True, decode_ctx=dctx),
           "compiled": generate(params, mine, ctx, s, cuda_graph=True, decode_ctx=dctx, compile=True),
           "graph_torch_decode": generate(params, mine, ctx, s, cuda_graph=True, decode_ctx=tctx),
           "eager": generate(params, mine, ctx, s)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ep_generation_on_two_gpus_equals_one(tmp_path):
    spawn_bounded(_ep_rank, 2, (free_port(), str(tmp_path)), 300, "EP model ranks")
    cfg = model_preset("tiny")
    params = init_model_params(cfg, torch.float32, "cuda", seed=6)
    ctx = ModelContext(cfg, attn_backend="triton", expert_backend="triton")
    s = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = generate(params, PROMPTS[rank::2], ctx, s)
        assert got["eager"] == want and got["graph"] == want and got["compiled"] == want
        assert got["graph_torch_decode"] == want
