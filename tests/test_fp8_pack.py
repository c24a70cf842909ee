"""Packed FP8 rows (kernels/fp8_pack.py) and the FP8 dispatch options of the comms that send them.

Dimension legend: M rows, H hidden (a multiple of 128), G = H / 128 scale groups, RB packed row bytes.
Checked: the packing kernel == fp8_quant.quant_fp8_groups bit for bit (fp8 bytes and scales, over shapes,
magnitudes, all-zero rows and groups, ties, saturating elements) == the torch twin; padding bytes are never
written; the unpacked views are zero-copy and make a valid FP8 ExpertBatch (masked and gathered); the comms'
option checks refuse what FP8 dispatch cannot do, with the reason; the FP8 kernel variants compile for
sm_90 (the GPU compiler, run on the CPU). The comms' exchange itself: tests/test_nvlink_kernels.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomoe_fn.batch import ExpertBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F8 = torch.float8_e4m3fn
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="the packing kernel needs a GPU or TRITON_INTERPRET=1")


def as_bytes(q: torch.Tensor) -> torch.Tensor:
    return q.contiguous().view(torch.uint8).cpu()


@st.composite
def rows(draw: st.DrawFn) -> torch.Tensor:
    """x [M, H]: M 0-24, H a multiple of 128 (one chunk, a partial chunk, several), rows of mixed magnitudes,
    all-zero rows and groups, tie values, one element saturating its group."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    M, H = draw(st.integers(0, 24)), draw(st.sampled_from([128, 256, 384, 1024, 1152, 2176]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lo = -6 if dtype == torch.float32 else -2
    x = torch.randn(M, H, generator=gen) * 10.0 ** torch.empty(M, 1).uniform_(lo, 3, generator=gen)
    ties = torch.tensor([2.0**-10, 3 * 2.0**-10, 1.0625, 7.75, 13.0, 26.0, 232.0, 440.0])
    for r, kind in enumerate(torch.randint(0, 5, (M,), generator=gen).tolist()):
        if kind == 0:
            x[r] = 0.0
        elif kind == 1:
            x[r] = ties[torch.randint(0, len(ties), (H,), generator=gen)] * torch.randn(H, generator=gen).sign()
            x[r, ::128] = 448.0
        elif kind == 2:
            x[r, int(torch.randint(0, H, (1,), generator=gen))] *= 1e3
        elif kind == 3:
            x[r, 128 * int(torch.randint(0, H // 128, (1,), generator=gen)):][:128] = 0.0  # one zero group
    big = torch.finfo(dtype).max / 2
    return x.clamp(-big, big).to(dtype)


def test_packed_row_bytes():
    from nanomoe_kernels.fp8_pack import packed_row_bytes

    assert packed_row_bytes(7168) == 7392  # DeepSeek-V3: 7168 fp8 bytes + 56 scales, no padding
    assert packed_row_bytes(2048) == 2112 and packed_row_bytes(128) == 160
    for h in (128 * n for n in range(1, 80)):
        rb = packed_row_bytes(h)
        assert rb % 32 == 0 and 0 <= rb - (h + h // 32) < 32
    for bad in (0, 64, 200, 7168.0):
        with pytest.raises(ValueError, match="multiple of 128"):
            packed_row_bytes(bad)


@interpreted
@settings(max_examples=30, deadline=None)
@given(rows())
def test_pack_equals_quant_fp8_groups_bit_for_bit(x):
    from nanomoe_kernels.fp8_pack import pack_fp8_rows, pack_fp8_rows_torch, packed_row_bytes, unpack_fp8_rows
    from nanomoe_kernels.fp8_quant import quant_fp8_groups

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    M, H = x.shape
    RB, G = packed_row_bytes(H), H // 128
    out = torch.full((M, RB), 0xA5, dtype=torch.uint8, device=dev)
    packed = pack_fp8_rows(x.to(dev), out=out)
    assert packed is out
    q, s = unpack_fp8_rows(packed, H)
    qw, sw = quant_fp8_groups(x.to(dev))
    assert q.shape == (M, H) and q.dtype == F8 and s.shape == (M, G) and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(qw)) and torch.equal(s.cpu(), sw.cpu())
    assert bool((packed[:, H + 4 * G:] == 0xA5).all()), "padding bytes were written"
    if x.dtype != torch.bfloat16 or dev == "cuda":  # the interpreter converts some bfloat16 values differently
        assert torch.equal(packed[:, :H + 4 * G].cpu(), pack_fp8_rows_torch(x)[:, :H + 4 * G])
    if M:
        assert bool((s > 0).all()) and float(s[(x == 0).view(M, G, 128).all(-1).to(dev)].ne(1).sum()) == 0


@interpreted
def test_pack_refuses_bad_inputs():
    from nanomoe_kernels.fp8_pack import pack_fp8_rows

    with pytest.raises(ValueError, match="multiple of 128"):
        pack_fp8_rows(torch.randn(2, 100))
    with pytest.raises(TypeError, match="dtype"):
        pack_fp8_rows(torch.randn(2, 128).double())
    with pytest.raises(ValueError, match="contiguous rows"):
        pack_fp8_rows(torch.randn(256, 2).t())
    with pytest.raises(ValueError, match="out must be contiguous uint8"):
        pack_fp8_rows(torch.randn(2, 128), out=torch.empty(2, 160, dtype=torch.int8))


def test_unpacked_views_are_zero_copy_and_make_fp8_batches():
    from nanomoe_kernels.fp8_pack import pack_fp8_rows_torch, packed_row_bytes, unpack_fp8_rows

    H, RB, G = 384, packed_row_bytes(384), 3
    x = torch.randn(2 * 5, H)
    buf = pack_fp8_rows_torch(x).view(2, 5, RB)  # a masked batch [P_local, cap, RB]
    q, s = unpack_fp8_rows(buf, H)
    assert q.shape == (2, 5, H) and s.shape == (2, 5, G)
    assert q.stride() == (5 * RB, RB, 1) and s.stride() == (5 * RB // 4, RB // 4, 1)
    assert q.data_ptr() == buf.data_ptr() and s.data_ptr() == buf.data_ptr() + H
    deq = (q.float().view(2, 5, G, 128) * s[..., None]).view(10, H)
    assert float((deq - x).abs().max()) <= float(x.abs().max()) * 2**-4
    masked = ExpertBatch(q, torch.tensor([5, 3]), "masked", x_scale=s)
    assert masked.x_scale is s
    flat_q, flat_s = unpack_fp8_rows(buf.view(10, RB), H)
    index = torch.tensor([3, 3, 0, 9], dtype=torch.int32)
    batch = ExpertBatch(flat_q, torch.tensor([1, 3]), "gathered", index, x_scale=flat_s).materialize()
    assert torch.equal(as_bytes(batch.x), as_bytes(flat_q[index.long()])) and torch.equal(batch.x_scale, s.view(10, G)[
        index.long()])
    buf.view(10, RB)[3, :H] = 0  # views, not copies
    assert int(flat_q[3].view(torch.uint8).sum()) == 0
    with pytest.raises(ValueError, match=r"uint8 \[\.\., 416\]"):
        unpack_fp8_rows(buf[..., :400], H)


def test_nvlink_fp8_options_are_checked_before_anything_is_built():
    from nanomoe_fn.comm.nvlink import NvlinkComm
    from nanomoe_fn.comm.nvlink_buffers import buffer_shapes, option_reason

    base = dict(max_tokens=8, hidden=256, top_k=2, num_slots=4, dtype=torch.bfloat16)
    assert option_reason(**base, dispatch_dtype=F8) == ""
    assert option_reason(**base, dispatch_dtype=torch.bfloat16) == ""
    assert "multiple of 128" in option_reason(**{**base, "hidden": 200}, dispatch_dtype=F8)
    assert "dispatch_dtype must be None" in option_reason(**base, dispatch_dtype=torch.float16)
    ok, why = NvlinkComm.supports(**{**base, "hidden": 200}, dispatch_dtype=F8)
    assert not ok and "multiple of 128" in why
    shapes = buffer_shapes(2, 8, 7168, 8, 128, torch.bfloat16, fp8=True)
    assert shapes["tok"] == ((16, 7392), torch.uint8) and shapes["comb"] == ((2, 8, 7168), torch.bfloat16)
    assert buffer_shapes(2, 8, 7168, 8, 128, torch.bfloat16, fp8=False)["tok"] == ((16, 7168), torch.bfloat16)


def test_deepep_fp8_options():
    from nanomoe_fn.comm.deepep_layout import check_options

    check_options("low_latency", 7168, 32, 64, 8, torch.bfloat16, 60.0, dispatch_dtype=F8)
    check_options("low_latency", 7168, 32, 64, 8, torch.bfloat16, 60.0, dispatch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="low_latency"):
        check_options("normal", 7168, 32, 64, 8, torch.bfloat16, 60.0, dispatch_dtype=F8)
    with pytest.raises(ValueError, match="dispatch_dtype"):
        check_options("low_latency", 7168, 32, 64, 8, torch.bfloat16, 60.0, dispatch_dtype=torch.float16)


class _Event:  # stands for the comm's CUDA event (the interpreter has run everything already)
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _one_rank_comm(T_max: int, H: int, k: int, P: int, mode: str, fp8: bool):
    """An NvlinkComm of one simulated rank on the CPU: the attributes __init__ sets, its symmetric buffers
    plain tensors (delta 0), the GPU-only signal replaced by its effect (count row published, counters
    zeroed). Exercises the comm's own code (checks, views, layouts) around the interpreted kernels."""
    import types

    from nanomoe_kernels import ep_nvlink, ep_nvlink_sync

    from nanomoe_fn.comm.nvlink import NvlinkComm
    from nanomoe_fn.comm.nvlink_buffers import MODES, buffer_shapes

    def signal_wait(flag, epoch, err_addr, rank, timeout_ns, stage, counts=None):
        if counts is not None:
            ctr, cnt, T = counts
            cnt[0][0, :P] = ctr.long()
            cnt[0][0, P] = T
            ctr.zero_()

    c = object.__new__(NvlinkComm)
    c._k, c._sync = ep_nvlink, types.SimpleNamespace(signal_wait=signal_wait, count_layout=ep_nvlink_sync.count_layout)
    c.group, c.rank, c.world_size, c.device = None, 0, 1, torch.device("cpu")
    c.max_tokens, c.hidden, c.top_k, c.num_slots, c.dtype = T_max, H, k, P, torch.bfloat16
    c.mode, c.layout, c.fp8, c.dispatch_dtype = mode, MODES[mode], fp8, F8 if fp8 else torch.bfloat16
    from nanomoe_kernels.fp8_pack import unpack_fp8_rows

    c._unpack, c.timeout_s, c._timeout_ns = unpack_fp8_rows, 1.0, 10**9
    c._ctr, c._rows = torch.zeros(P, dtype=torch.int32), torch.full((T_max, k), -1, dtype=torch.int32)
    shapes = buffer_shapes(1, T_max, H, k, P, torch.bfloat16, fp8)
    c._bufs = {n: (torch.zeros(s, dtype=dt), torch.zeros(1, dtype=torch.int64)) for n, (s, dt) in shapes.items()}
    c.epoch, c._err = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    c._m_host = torch.zeros(1, dtype=torch.int64)
    c._err_np, c._m_np = c._err.numpy(), c._m_host.numpy()
    c._base, c._m_ready, c._calls, c._open = torch.empty((1, P), dtype=torch.int64), _Event(), 0, False
    ep_nvlink.check_put_buffers(c._ctr, c.epoch, c._bufs, 1, T_max, H, k, torch.bfloat16, P, fp8)
    return c


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="simulates a rank under the interpreter")
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_one_rank_nvlink_comm_fp8_dispatch_and_bf16_combine(mode, fp8):
    """dispatch -> an FP8 batch whose rows are quant_fp8_groups of the routed tokens (bf16 dispatch: the
    tokens); combine of bf16 expert outputs (expert e: its dequantised rows times e + 1) -> the weighted
    sum, in the comm's dtype."""
    from nanomoe_kernels.fp8_quant import quant_fp8_groups

    from nanomoe_fn import Placement, Routing, combine, dispatch

    T, H, k, P = 5, 256, 2, 3
    comm = _one_rank_comm(6, H, k, P, mode, fp8=fp8)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.rand(T, P, generator=gen).topk(k, dim=1).indices.to(torch.int32)
    routing = Routing(ids, torch.rand(T, k, generator=gen))
    batch, handle = dispatch(x, routing, comm, Placement.identity(P, 1))
    assert batch.x.dtype == (F8 if fp8 else torch.bfloat16) and (batch.x_scale is not None) == fp8
    assert batch.layout == {"decode": "masked", "prefill": "gathered"}[mode]
    q, s = quant_fp8_groups(x.float()) if fp8 else (x, None)
    flat = batch.materialize() if mode == "prefill" else batch
    deq = flat.x.float() * (flat.x_scale.repeat_interleave(128, -1) if fp8 else 1)
    y = torch.zeros_like(deq)
    for e in range(P):
        toks = [t for t in range(T) for j in range(k) if int(ids[t, j]) == e]
        assert int(batch.counts[e]) == len(toks)
        lo = int(batch.counts[:e].sum())
        at = (e, slice(0, len(toks))) if mode == "decode" else (slice(lo, lo + len(toks)),)
        assert torch.equal(as_bytes(flat.x[at]), as_bytes(q[toks]))
        assert not fp8 or torch.equal(flat.x_scale[at], s[toks])
        y[at] = deq[at] * (e + 1)
    out = combine(flat.with_x(y.to(torch.bfloat16)), handle, comm)
    xq = (q.float() * (s.repeat_interleave(128, -1) if fp8 else 1)).double()
    ref = sum(routing.topk_weights[:, j, None].double() * (ids[:, j, None] + 1) * xq for j in range(k))
    assert out.dtype == torch.bfloat16 and float((out.double() - ref).norm() / ref.norm()) < 1e-2


COMPILE = """
from tests.test_kernels_compile import _compile
from nanomoe_kernels import ep_nvlink as k, fp8_pack as p
put = dict(x_ptr="*bf16", phys_ptr="*i32", w_ptr="*fp32", has_ptr="*i32", ctr_ptr="*i32", epoch_ptr="*i64",
           err_addr="i64", tok_ptr="*u8", tok_delta="*i64", meta_ptr="*i32", meta_delta="*i64", wb_ptr="*fp32",
           wb_delta="*i64")
for own in (False, True):
    _compile(k._put_kernel, put, dict(K=8, KP=8, OWN_ROWS=own, FP8=True, BLOCK=1024))
expand = dict(x_ptr="*i16", tok_ptr="*i16", meta_ptr="*i32", cnt_ptr="*i64", base_ptr="*i64", rows_ptr="*i32",
              counts_ptr="*i64", out_ptr="*i16")
_compile(k._expand_kernel, expand, dict(K=8, KP=8, MASKED=True, PLB=128, BLOCK=1024))
for dt in ("*bf16", "*fp16", "*fp32"):
    _compile(p._pack_kernel, dict(x_ptr=dt, out_ptr="*u8", stride_x="i64"), dict(BLOCK=1024, GROUP=128))
print("compiled")
"""


def test_fp8_kernel_variants_compile_for_sm90():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton build has no CUDA backend: {err}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, fresh process
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
