"""The `nvlink` comm on 2+ GPUs of one host: EP layer == float64 reference == single-rank layer, CUDA-graph
replay == eager, and a peer that never arrives ends with a TimeoutError naming rank and stage.

Each test spawns one NCCL rank per GPU; ranks save their outputs and the parent compares on the CPU.
"""

from __future__ import annotations

import functools
import os
import random
import time

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nanomoe_fn import moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from tests import dist_worker
from tests.helpers import (
    GPU_SAFE_ENV,
    MIN_MARGIN,
    assert_close_to_ref,
    init_nccl_rank,
    reference_layer,
    spawn_bounded,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
SAFE_ENV = GPU_SAFE_ENV
W = 2


def _init(rank: int, port: int) -> torch.device:
    return init_nccl_rank(rank, port, W)


def _spawn(fn, *args) -> None:
    os.environ.update(SAFE_ENV)
    spawn_bounded(fn, W, (free_port(), *args), 240, "nvlink GPU workers")


def draw_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        E = W * rng.choice([2, 4, 8])
        tokens = [rng.randint(0, 40) for _ in range(W)]
        if i == 0:
            tokens[1] = 0  # a rank with no tokens
        dtype = rng.choice(["bfloat16", "float16", "float32"])
        cases.append(dict(cfg=dict(hidden=rng.choice([64, 256, 1100]), intermediate=rng.choice([32, 64]),
                                   num_experts=E, top_k=rng.randint(1, min(4, E)), n_shared_experts=rng.randint(0, 1),
                                   expert_type=rng.choice(["swiglu", "linear"])),
                          dtype=dtype, seed=seed * 100 + i, tokens=tokens, mode=rng.choice(["decode", "prefill"]),
                          backend=rng.choice(["bmm", "triton"] if dtype != "float32" else ["bmm", "loop"]),
                          redundant=W * rng.choice([0, 1]), remap_policy=rng.choice(["static", "dynamic"])))
    base = dict(hidden=128, intermediate=64, num_experts=4 * W, top_k=2, expert_type="swiglu")
    cases.append(dict(cfg=base, dtype="bfloat16", seed=7, tokens=[0] * W, backend="bmm", mode="decode"))
    cases.append(dict(cfg=base, dtype="bfloat16", seed=8, tokens=[33] * W, backend="triton", hot=[1, 0], mode="decode"))
    cases.append(dict(cfg=base, dtype="bfloat16", seed=9, tokens=[17] * W, backend="bmm", hot=[1, 0],
                      replicate=[1, 0] * W, mode="prefill"))
    cases.append(dict(cfg=base, dtype="float32", seed=10, tokens=[5, 29], backend="loop", mode="prefill"))
    return cases


def _on(dev: torch.device, tree):
    return pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, tree)


def _run_cases(rank: int, port: int, cases: list[dict], out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    try:
        for i, case in enumerate(cases):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            placement = dist_worker.case_placement(case, cfg, W)
            comm = NvlinkComm(max(1, max(case["tokens"])), cfg.hidden, cfg.top_k, placement.num_physical,
                              x.dtype, case["mode"], timeout_s=30)
            local = _on(dev, shard_moe_params(params, placement, rank))
            outs = [moe_layer(local, x.to(dev), cfg, comm, placement.to(dev), backend=case["backend"])
                    for _ in range(2)]  # twice: the second call reuses the buffers (epochs move on)
            torch.save([o.cpu() for o in outs], os.path.join(out_dir, f"case{i}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nvlink_layer_equals_reference_and_single_rank(tmp_path):
    cases = draw_cases(8, seed=3)
    _spawn(_run_cases, cases, str(tmp_path))
    compared = 0
    for i, case in enumerate(cases):
        for rank in range(W):
            cfg, params, x = dist_worker.case_inputs(case, rank)
            outs = torch.load(tmp_path / f"case{i}_rank{rank}.pt")
            ref, margin = reference_layer(params, x, cfg)
            if margin <= MIN_MARGIN and not case.get("hot"):
                continue
            compared += 1
            single = moe_layer(params, x, cfg, backend="loop")
            for j, out in enumerate(outs):
                what = f"case {i} ({case['mode']}, {case['dtype']}, {case['backend']}) rank {rank} call {j}"
                assert out.dtype == x.dtype and out.shape == x.shape, what
                assert_close_to_ref(out, ref, x.dtype, what)
                assert_close_to_ref(out, single.double(), x.dtype, what + " vs single rank")
    assert compared >= len(cases)


def _run_graph(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    try:
        case = dict(cfg=dict(hidden=512, intermediate=128, num_experts=16, top_k=4, n_shared_experts=1),
                    dtype="bfloat16", seed=21, tokens=[24, 24])
        cfg, params, x = dist_worker.case_inputs(case, rank)
        placement = dist_worker.case_placement(case, cfg, W).to(dev)
        comm = NvlinkComm(32, cfg.hidden, cfg.top_k, placement.num_physical, x.dtype, "decode", timeout_s=30)
        local = _on(dev, shard_moe_params(params, placement, rank))
        static_x = x.to(dev).clone()
        eager = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        outs = []
        for scale in (1.0, -0.5):  # new inputs through the same graph
            static_x.copy_(x.to(dev) * scale)
            graph.replay()
            outs.append(static_out.clone())
        torch.cuda.synchronize()
        again = moe_layer(local, static_x, cfg, comm, placement, backend="triton")
        torch.save({"eager": eager.cpu(), "graph": [o.cpu() for o in outs], "again": again.cpu()},
                   os.path.join(out_dir, f"graph_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_nvlink_decode_layer_replays_in_a_cuda_graph(tmp_path):
    _spawn(_run_graph, str(tmp_path))
    for rank in range(W):
        saved = torch.load(tmp_path / f"graph_rank{rank}.pt")
        assert torch.isfinite(saved["graph"][0]).all()
        assert torch.equal(saved["graph"][0], saved["eager"]), f"rank {rank}: graph replay != eager"
        assert torch.equal(saved["graph"][1], saved["again"]), f"rank {rank}: replay on new input != eager"
        assert not torch.equal(saved["graph"][0], saved["graph"][1])


def _run_absent(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn.comm.nvlink import NvlinkComm

    dev = _init(rank, port)
    cfg = dict(hidden=64, intermediate=32, num_experts=4, top_k=2)
    case = dict(cfg=cfg, dtype="bfloat16", seed=5, tokens=[6, 6])
    cfgo, params, x = dist_worker.case_inputs(case, rank)
    placement = dist_worker.case_placement(case, cfgo, W).to(dev)
    comm = NvlinkComm(8, 64, 2, 4, torch.bfloat16, "decode", timeout_s=3)
    if rank == 1:
        time.sleep(12)  # joined the comm, then never dispatches
        return
    t0 = time.monotonic()
    try:
        moe_layer(_on(dev, shard_moe_params(params, placement, 0)), x.to(dev), cfgo, comm, placement)
        torch.cuda.synchronize()
        comm.check()
        message = "no error"
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, "absent.txt"), "w") as f:
        f.write(f"{time.monotonic() - t0:.2f}\n{message}")


def test_nvlink_absent_peer_times_out_naming_rank_and_stage(tmp_path):
    _spawn(_run_absent, str(tmp_path))
    seconds, message = (tmp_path / "absent.txt").read_text().split("\n", 1)
    assert message.startswith("TimeoutError"), message
    assert "rank 0" in message and "dispatch/payload" in message and "rank 1" in message, message
    assert float(seconds) < 15, f"took {seconds}s to notice a missing peer"


# ---- FP8 dispatch: packed e4m3 rows + scales in, bf16 combine out --------------------------------------------

F8 = torch.float8_e4m3fn
FP8_SHAPE = dict(H=7168, I=256, P=16, k=8)  # DeepSeek-V3's hidden and top-8, a small expert FFN
FP8_TOKENS = {"decode": 128, "prefill": 384}
ACCURACY_BOUND = 5e-2  # the FP8 scheme's error vs float64 (tests/gpu/test_fused_moe_fp8_gpu.py)
SAME_QUANT_TOL = 5e-3  # fp8 vs bf16 dispatch into triton_fp8: the same fp8 rows, float32 sums, bf16 outputs


def fp8_inputs(rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens (bf16 [T, H], mixed magnitudes, one all-zero group) and routing (ids, weights)."""
    T, H, P, k = FP8_TOKENS[mode], FP8_SHAPE["H"], FP8_SHAPE["P"], FP8_SHAPE["k"]
    gen = torch.Generator().manual_seed(1000 * rank + len(mode))
    x = torch.randn(T, H, generator=gen) * 4.0 ** torch.randn(T, 1, generator=gen)
    x[0, :128] = 0
    ids = torch.rand(T, P, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    return x.to(torch.bfloat16), ids, torch.rand(T, k, generator=gen)


def fp8_experts(dev: torch.device):
    """(full FP8 record, the same dequantised in float64) of P SwiGLU experts, equal on every rank."""
    from nanomoe_fn.moe.fp8_params import dequantize_experts, quantize_experts
    from nanomoe_fn.moe.params import SwiGLUExperts

    H, I, P = FP8_SHAPE["H"], FP8_SHAPE["I"], FP8_SHAPE["P"]
    gen = torch.Generator().manual_seed(77)
    full = SwiGLUExperts(torch.randn(P, 2 * I, H, generator=gen) * H ** -0.5,
                         torch.randn(P, H, I, generator=gen) * I ** -0.5)
    fp8 = quantize_experts(_on(dev, full))
    return fp8, dequantize_experts(fp8, torch.float64)


def _ffn64(w, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """sum_j w[t, j] * FFN_{ids[t, j]}(x[t]) in float64 (unquantised x, dequantised weights)."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    I = w.w2.shape[-1]
    for e in range(w.w13.shape[0]):
        t, j = torch.nonzero(ids == e, as_tuple=True)
        h = x[t].double() @ w.w13[e].T
        out.index_add_(0, t, (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w.w2[e].T * wts[t, j, None].double())
    return out


def _expert_rows(batch, e: int) -> torch.Tensor:
    """Expert e's received rows as packed bytes [n, H + 4 * H / 128] (fp8 bytes, then scales), on the CPU."""
    q, s = batch.x.view(torch.uint8), batch.x_scale.contiguous().view(torch.uint8)
    lo, n = int(batch.counts[:e].sum()), int(batch.counts[e])
    if batch.layout == "masked":
        return torch.cat([q[e, :n], s[e, :n]], 1).cpu()
    rows = batch.index[lo:lo + n]
    return torch.cat([q.index_select(0, rows), s.index_select(0, rows)], 1).cpu()


def _fp8_layer(local, routing, placement, comm, x: torch.Tensor) -> torch.Tensor:
    """dispatch (fp8 or bf16 rows, per comm) -> triton_fp8 experts -> combine (bf16)."""
    from nanomoe_fn import combine, dispatch
    from nanomoe_fn.moe.experts import expert_ffn

    batch, handle = dispatch(x, routing, comm, placement)
    return combine(expert_ffn(local, batch, "triton_fp8"), handle, comm)


def _run_fp8(rank: int, port: int, out_dir: str) -> None:
    from nanomoe_fn import Placement, Routing, combine, dispatch
    from nanomoe_fn.comm.nvlink import NvlinkComm
    from nanomoe_fn.moe.experts import expert_ffn
    from nanomoe_fn.moe.params import SwiGLUExpertsFP8

    dev = _init(rank, port)
    try:
        H, P, k = FP8_SHAPE["H"], FP8_SHAPE["P"], FP8_SHAPE["k"]
        fp8, deq = fp8_experts(dev)
        lo, hi = rank * P // W, (rank + 1) * P // W
        local = SwiGLUExpertsFP8(fp8.w13[lo:hi], fp8.w13_scale[lo:hi], fp8.w2[lo:hi], fp8.w2_scale[lo:hi], fp8.block)
        placement = Placement.identity(P, W).to(dev)
        saved: dict = {}
        for mode, T in FP8_TOKENS.items():
            x, ids, wts = (t.to(dev) for t in fp8_inputs(rank, mode))
            routing = Routing(ids, wts)
            comm8, comm16 = (NvlinkComm(T, H, k, P, torch.bfloat16, mode, timeout_s=30, dispatch_dtype=d)
                             for d in (F8, None))
            layer = functools.partial(_fp8_layer, local, routing, placement)

            batch, handle = dispatch(x, routing, comm8, placement)
            assert batch.x.dtype == F8 and batch.x_scale is not None and comm8.row_bytes == 7392
            rows = [_expert_rows(batch, e) for e in range(P // W)]
            out8 = combine(expert_ffn(local, batch, "triton_fp8"), handle, comm8)
            entry = dict(rows=rows, counts=batch.counts.cpu(), out8=out8.cpu(), again=layer(comm8, x).cpu(),
                         out16=layer(comm16, x).cpu(), ref=_ffn64(deq, x, ids, wts).cpu())
            if mode == "decode":  # the whole FP8 layer in one CUDA graph, replayed on a new input
                static_x = x.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        layer(comm8, static_x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = layer(comm8, static_x)
                static_x.copy_(x * -0.5)
                graph.replay()
                entry["graph"] = static_out.clone().cpu()
                torch.cuda.synchronize()
                entry["graph_eager"] = layer(comm8, x * -0.5).cpu()
            saved[mode] = entry
        torch.save(saved, os.path.join(out_dir, f"fp8_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="triton_fp8 needs sm_89+")
def test_nvlink_fp8_dispatch_rows_layer_and_graph(tmp_path):
    """FP8 dispatch, decode and prefill: every rank receives exactly the packed rows (fp8 bytes + scales) of the
    pairs routed to its experts, each equal to the local quantisation of the sent token; the layer (fp8
    dispatch -> triton_fp8 -> bf16 combine) equals bf16 dispatch + triton_fp8 up to float32 summation order
    and is within the FP8 scheme's bound of the float64 reference; its decode layer replays in a CUDA graph."""
    from nanomoe_kernels.fp8_pack import pack_fp8_rows_torch

    _spawn(_run_fp8, str(tmp_path))
    saved = [torch.load(tmp_path / f"fp8_rank{r}.pt") for r in range(W)]
    H, P = FP8_SHAPE["H"], FP8_SHAPE["P"]
    for mode in FP8_TOKENS:
        inputs = [fp8_inputs(r, mode) for r in range(W)]
        packed = [pack_fp8_rows_torch(x)[:, :H + 4 * (H // 128)] for x, _, _ in inputs]
        for r in range(W):
            got = saved[r][mode]
            for e in range(P // W):
                slot = r * P // W + e
                want = torch.cat([packed[s][(ids == slot).any(1)] for s, (_, ids, _) in enumerate(inputs)])
                assert int(got["counts"][e]) == want.shape[0], (mode, r, e)
                # rows of one source may come in any order inside an expert: compare as sorted multisets
                assert torch.equal(torch.unique(got["rows"][e], dim=0), torch.unique(want, dim=0)), (mode, r, e)
            what = f"{mode} rank {r}"
            assert got["out8"].dtype == torch.bfloat16 and got["out8"].shape == (FP8_TOKENS[mode], H), what
            assert torch.equal(got["out8"], got["again"]), f"{what}: a second call differs"
            assert _rel(got["out8"], got["out16"]) < SAME_QUANT_TOL, f"{what}: fp8 vs bf16 dispatch"
            err = _rel(got["out8"], got["ref"])
            assert err < ACCURACY_BOUND, f"{what}: {err:.3g} from the float64 reference"
            if mode == "decode":
                assert torch.equal(got["graph"], got["graph_eager"]), f"rank {r}: graph replay != eager"
