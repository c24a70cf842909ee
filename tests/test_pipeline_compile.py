"""The MoE layer over a real comm as one graph: OpComm (nanomoe_fn/comm/ops.py) puts the torch comm behind
custom ops, in its decode mode (a masked batch of fixed size) and its prefill mode (a gathered batch whose row
count depends on the routing: unbacked sizes in the graph), and every schedule compiles with fullgraph=True
(aot_eager on 2 gloo ranks) to the same output as eager, as the plain comm eagerly, and as the single-rank
layer; a second compiled call on new tokens runs the graph (no retrace) and still matches. OpComm refuses
FP8 rows and halves called out of order, by name. (On GPUs: tests/gpu/test_pipeline_gpu.py
compiles the decode layer over nvlink and the torch decode mode with inductor.)
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from nanomoe_fn import Placement, moe_layer
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.comm.ops import OpComm, masked_rows
from nanomoe_fn.moe.layer import MOE_PROGRAM, check_shared_comm
from nanomoe_fn.pipeline import sequential
from tests import pipeline_worker


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decode", "gathered", "gathered+capacity"])
def test_every_schedule_compiles_as_one_graph_over_a_real_comm(tmp_path, mode):
    # gathered: the prefill mode, ragged token counts (a rank's micro-batch may be empty), triton experts (their
    # gathered path is a custom op; bmm reads the counts on the host there), or bmm on the masked layout of a
    # capacity (to_masked traces)
    case = dict(cfg=dict(hidden=16, intermediate=8, num_experts=8, top_k=3, n_shared_experts=1, score_func="sigmoid",
                         correction_bias=True, n_group=2, topk_group=2),
                dtype="float32", seed=11, tokens=[6, 6] if mode == "decode" else [7, 1],
                backend="triton" if mode == "gathered" else "bmm", gathered=mode != "decode",
                capacity=16 if mode == "gathered+capacity" else None)
    W = 2
    mp.start_processes(pipeline_worker.run_compiled, args=(W, free_port(), case, str(tmp_path)), nprocs=W,
                       join=True, start_method="spawn")
    for rank in range(W):
        cfg, params, x = pipeline_worker.case_inputs(case, rank)
        outs = torch.load(tmp_path / f"compiled_rank{rank}.pt")
        assert len(outs) == 1 + 4 * len(pipeline_worker.SCHEDULES), sorted(outs)
        single = moe_layer(params, x, cfg, backend="bmm")
        again = moe_layer(params, x.flip(0), cfg, backend="bmm")
        assert single.shape[0] == case["tokens"][rank]
        for name, out in outs.items():
            want = again if name.endswith("again") else single
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, what=f"rank {rank} {name}": f"{what}: {m}")


class _Gathered:
    name, rank, world_size, max_tokens = "torch", 0, 1, None  # exact splits: a data-dependent batch


def test_opcomm_sizes_its_batches_and_refuses_fp8_rows_and_halves_out_of_order():
    assert masked_rows(_Gathered()) is None and OpComm(_Gathered(), Placement.identity(8, 1)).rows is None
    fp8 = _Gathered()
    fp8.fp8 = True
    with pytest.raises(ValueError, match="sends FP8 rows"):
        OpComm(fp8, Placement.identity(8, 1))
    for name, extra in (("torch_fixed", {}), ("deepep", {"mode": "low_latency"})):  # masked batches [P, W * T, H]
        masked = _Gathered()
        masked.name, masked.max_tokens = name, 3
        masked.__dict__.update(extra)
        assert OpComm(masked, Placement.identity(8, 1)).rows == 3
    masked.dispatch_dtype = torch.float8_e4m3fn
    with pytest.raises(ValueError, match="sends FP8 rows"):
        OpComm(masked, Placement.identity(8, 1))
    fixed = _Gathered()
    fixed.max_tokens = 4
    op = OpComm(fixed, Placement.identity(8, 1))
    assert op.rows == 4 and op.name == "op:torch"
    with pytest.raises(RuntimeError, match="no dispatch in flight"):
        op.dispatch_recv(torch.zeros(2, 16))
    with pytest.raises(RuntimeError, match="no received dispatch"):
        torch.ops.nanomoe.comm_combine_send(op.state, op.key, torch.zeros(8, 4, 16))
    with pytest.raises(ValueError, match="placement must be the one"):
        op.dispatch_send(torch.zeros(2, 16), None, Placement.identity(8, 1))


def test_a_batch_sized_by_the_routing_needs_a_backend_that_traces_it():
    op = OpComm(_Gathered(), Placement.identity(8, 1))
    with pytest.raises(ValueError, match="expert backend 'bmm' cannot trace"):
        check_shared_comm(sequential(MOE_PROGRAM), [op], "bmm")
    check_shared_comm(sequential(MOE_PROGRAM), [op], "triton")  # its gathered path is a custom op
    check_shared_comm(sequential(MOE_PROGRAM), [op], "bmm", capacity=4)  # the masked layout traces
    fixed = _Gathered()
    fixed.max_tokens = 4
    check_shared_comm(sequential(MOE_PROGRAM), [OpComm(fixed, Placement.identity(8, 1))], "bmm")
