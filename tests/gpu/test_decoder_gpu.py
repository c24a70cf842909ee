"""The DeepSeek-V3 decoder layer (MLA + MoE with its shared expert) on 2 GPUs, experts sharded over the
ranks, each rank its own sequences: every schedule (shared-expert overlap, two-batch overlap, both) equals
sequential for the prefill (ragged sequences) and a decode step after it, outputs and caches, over the
nvlink and torch comms. The overlapped schedules run their exchanges on exchange streams while MLA and the
experts run on the caller's stream (nanomoe_fn/pipeline/streams.py).

Dimension legend: B sequences per rank, S prefill tokens per sequence, H hidden.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from nanomoe_fn import MLAConfig, MoEConfig, Placement, TorchComm, init_mla_params, init_moe_params, shard_moe_params
from nanomoe_fn.attention.cache import init_contiguous_cache
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.decoder import DECODER_MOE_PROGRAM, DecoderParams, decoder_context, decoder_layer
from nanomoe_fn.pipeline import sequential, shared_expert_overlap, two_batch_overlap
from tests.helpers import GPU_SAFE_ENV, assert_close_to_ref, init_nccl_rank, spawn_bounded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
W, H, B, S, L = 2, 1024, 6, 24, 64
MLA = MLAConfig(hidden_size=H, num_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32)
MOE = MoEConfig(hidden=H, intermediate=256, num_experts=16, top_k=4, n_shared_experts=1, score_func="sigmoid",
                n_group=4, topk_group=2, correction_bias=True)
PLANS = {"sequential": lambda: sequential(DECODER_MOE_PROGRAM),
         "shared_overlap": lambda: sequential(shared_expert_overlap(DECODER_MOE_PROGRAM)),
         "tbo": lambda: two_batch_overlap(DECODER_MOE_PROGRAM),
         "tbo+shared": lambda: two_batch_overlap(shared_expert_overlap(DECODER_MOE_PROGRAM)),
         "shared_stream": lambda: sequential(shared_expert_overlap(DECODER_MOE_PROGRAM, window=None, stream=True)),
         "shared_stream_after_send": lambda: sequential(shared_expert_overlap(DECODER_MOE_PROGRAM, stream=True)),
         "tbo+shared_stream": lambda: two_batch_overlap(
             shared_expert_overlap(DECODER_MOE_PROGRAM, window=None, stream=True))}
COMMS = ("nvlink", "torch")


def _params(dev: torch.device, rank: int, placement: Placement) -> DecoderParams:
    g = torch.Generator().manual_seed(3)
    attn = init_mla_params(MLA, torch.bfloat16, generator=g)
    norms = [1 + 0.1 * torch.randn(H, generator=g) for _ in range(2)]
    moe = shard_moe_params(init_moe_params(MOE, torch.bfloat16, generator=g), placement, rank)
    params = DecoderParams(norms[0].bfloat16(), attn, norms[1].bfloat16(), moe=moe)
    return torch.utils._pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, params)


def _comm(name: str, placement: Placement):
    if name == "torch":
        return TorchComm(timeout_s=30)
    from nanomoe_fn.comm.nvlink import NvlinkComm

    return NvlinkComm(B * S, H, MOE.top_k, placement.num_physical, torch.bfloat16, "prefill", timeout_s=30)


def _worker(rank: int, port: int, out_dir: str) -> None:
    dev = init_nccl_rank(rank, port, W)
    try:
        placement = Placement.identity(MOE.num_experts, W).to(dev)
        params = _params(dev, rank, placement)
        g = torch.Generator().manual_seed(10 + rank)
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        x = torch.randn(B, S, H, generator=g).to(dev, torch.bfloat16)
        pos = torch.arange(S)[None].expand(B, S).clone()
        pos[pos >= lengths[:, None]] = -1
        pos = pos.to(dev)
        step = torch.randn(B, 1, H, generator=g).to(dev, torch.bfloat16)
        outs = {}
        for comm_name in COMMS:
            for name, make in PLANS.items():
                plan = make()
                ctxs = [decoder_context(MLA, "torch", MOE, _comm(comm_name, placement), placement, "triton")
                        for _ in range(plan.micro_batches)]
                cache = init_contiguous_cache(B, L, MLA.cache_dim, torch.bfloat16, dev)
                out, cache = decoder_layer(params, x, pos, cache, ctxs, plan)
                dpos = cache.lens.long()[:, None]
                out_d, cache = decoder_layer(params, step, dpos, cache, ctxs, plan)
                outs[(comm_name, name)] = (out.cpu(), out_d.cpu(), cache.kv.cpu(), cache.lens.cpu(), pos.cpu())
                for c in ctxs:
                    getattr(c.moe.comm, "close", lambda: None)()
        torch.save(outs, os.path.join(out_dir, f"decoder_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_decoder_schedule_equals_sequential_on_two_gpus(tmp_path):
    os.environ.update(GPU_SAFE_ENV)
    spawn_bounded(_worker, W, (free_port(), str(tmp_path)), 300, "decoder GPU workers")
    for rank in range(W):
        outs = torch.load(tmp_path / f"decoder_rank{rank}.pt")
        assert len(outs) == len(COMMS) * len(PLANS), sorted(outs)
        for comm_name in COMMS:
            want = outs[(comm_name, "sequential")]
            valid = want[4] >= 0
            for name in PLANS:
                out, out_d, kv, lens, _ = outs[(comm_name, name)]
                what = f"rank {rank} {comm_name} {name}"
                assert torch.equal(lens, want[3]), what + " cache lens"
                assert_close_to_ref(out[valid], want[0][valid].double(), torch.bfloat16, what + " prefill")
                assert_close_to_ref(out_d, want[1].double(), torch.bfloat16, what + " decode step")
                assert_close_to_ref(kv, want[2].double(), torch.bfloat16, what + " cache rows")
        if rank == 1:  # the comms agree with each other too (same tokens, same weights)
            assert_close_to_ref(outs[("nvlink", "sequential")][1], outs[("torch", "sequential")][1].double(),
                                torch.bfloat16, "nvlink vs torch decode step")
