"""Dispatch / combine latency and bandwidth of every comm backend in one run, next to a plain all_to_all_single.

    python bench/bench_dispatch.py --world-size 2 --backend gloo --quick          # CPU
    python bench/bench_dispatch.py --world-size 2 --backend nccl --cases headline --json out.json

Dimension legend: T tokens per rank, H hidden, E experts (= physical slots, identity placement),
k experts per token, W ranks, P_local = E / W slots per rank.

Cases: `headline` = DeepSeek-V3 decode (128 tokens/rank) and prefill (4096) at H 7168, top-8 of 256;
`table` = the five rows of the public dispatch/combine table the peers are compared on; `default` = both; `quick`
= small CPU cases. Routing is uniform random top-k. Variants (`--variants`): `torch` (decode cases: its
decode mode, TorchComm(max_tokens=T), fixed blocks and no host read, its eager calls replaying CUDA graphs of
their own, graphs=True; prefill: exact splits), `torch_nograph` (decode cases: the decode mode, graphs=False),
`torch_exact`
(exact splits at every size), `torch_fixed` (decode cases), `nvlink` (mode decode / prefill by phase),
`deepep` (normal), `deepep_ll` (low latency, decode cases), `nvlink_fp8` / `deepep_ll_fp8` (those comms
with FP8 dispatch: e4m3 rows plus their float32 scales per 128 channels; combine in bf16), the baseline
`nccl_a2a` (`gloo_a2a` on gloo: one all_to_all_single of the same (token, k) pair rows, splits known in
advance), and on request the raw DeepEP peers `deepep_raw` / `deepep_ll_raw` (bench/deepep_peer.py). A
variant runs where `supports_comm` says it can (else it is listed under "skipped" with the reason); a
variant whose build, check or timing fails is listed under "failed" and the exit code is non-zero.

Each rank checks every variant first: dispatch then combine with an identity expert returns
sum_k(w) * x, and the per-expert counts equal the pairs this rank's experts must receive (from all
ranks' routing); FP8 variants: sum_k(w) * dequant(quant(x)) (x quantised here per 128 channels) within
1e-2 relative, norm-wise (DeepEP rounds its scales its own way). Timing: each iteration (after a
barrier) calls dispatch then combine, CUDA events around each; reported is the slowest rank's median
(the start-up skew the barrier leaves between ranks counts: the rank that starts first waits for its
peers). The barrier (`--barrier`): `host` (default on GPUs) is dist.barrier, a device sync, then a
shared-memory host barrier (bench/common.HostBarrier) that releases the ranks within microseconds of each
other; `dist` is dist.barrier alone, whose release skew between our hosts (100-200 us) is then counted
in every call. On GPUs the same calls are also timed back to back, no barrier between iterations
(b2b_dispatch_us, b2b_combine_us, b2b_gbps): the steady state of a layer loop, ranks in lockstep, host
time between the calls still counted. Between dispatch and combine, untimed, the identity experts: a
gathered batch (nvlink prefill, torch) is materialised into batch-row order, as an expert backend's
output would be, FP8 rows are dequantised to bf16 (what an FP8 backend returns); other batches are passed
on as they are. Sync-free variants (torch_fixed, nvlink decode, deepep_ll, their FP8 twins) also time
CUDA-graph replays: graph_dispatch_us, graph_combine_us and graph_round_us (one graph of dispatch +
combine, what a decode layer pays; FP8 variants combine a fixed bf16 expert output there, the round
graph having no expert stage, so only their split graphs are checked).
GB/s per rank = bytes of the rows a rank receives, one row per (token, destination rank), local rows
included (DeepEP's accounting), row_bytes each (H * itemsize; FP8 variants H + 4 * H / 128: e4m3 values
and float32 scales), over the dispatch time (mean over ranks): `bytes_per_rank` in each row, the same for
every variant of one payload. `pair_rows` = rows per (token, k) pair received, for reference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import deepep_peer  # noqa: E402
from bench.common import (  # noqa: E402
    DTYPES,
    HostBarrier,
    all_ranks_ok,
    capture_graph,
    ranks_errors,
    release_comm,
    sig,
    slowest,
    spawn_ranks,
    time_back_to_back,
    time_pair,
    write_record,
)
from nanomoe_fn import ExpertBatch, Placement, Routing, combine, dispatch  # noqa: E402
from nanomoe_fn.comm.base import make_comm, supports_comm  # noqa: E402

# (phase, experts, top_k, hidden, tokens per rank)
HEADLINE = [("decode", 256, 8, 7168, 128), ("prefill", 256, 8, 7168, 4096)]
TABLE = [("decode", 8, 2, 6144, 16), ("decode", 64, 6, 2048, 32), ("decode", 128, 4, 2880, 128),
         ("decode", 128, 8, 4096, 256), ("decode", 256, 8, 7168, 256)]
CASES = HEADLINE + TABLE
QUICK = [("decode", 256, 8, 512, 32), ("prefill", 256, 8, 512, 512), ("decode", 64, 6, 256, 32)]
CASE_SETS = {"default": CASES, "headline": HEADLINE, "table": TABLE, "quick": QUICK}
COMMS = ["torch", "torch_nograph", "torch_exact", "torch_fixed", "nvlink", "deepep", "deepep_ll", "nvlink_fp8",
         "deepep_ll_fp8"]
VARIANTS = [*COMMS, "nccl_a2a"]
SYNC_FREE = ("torch_fixed", "deepep_ll", "deepep_ll_fp8")  # + nvlink(_fp8) in decode mode: CUDA-graph capturable
DECODE_ONLY = ("torch_nograph", "torch_fixed", "deepep_ll", "deepep_ll_raw", "deepep_ll_fp8")
FP8_VARIANTS = ("nvlink_fp8", "deepep_ll_fp8")  # dispatch e4m3 rows + scales (DeepSeek-V3's 1 x 128 groups)


def _routing(T: int, E: int, k: int, device: torch.device, seed: int) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    return Routing(ids.to(device, torch.int32), torch.rand(T, k, generator=gen).to(device))


def comm_spec(variant: str, case: tuple, dtype: torch.dtype, timeout_s: float) -> tuple[str, dict]:
    """(registry name, constructor options) of a comm variant for a case."""
    phase, E, k, H, T = case
    if variant in ("torch", "torch_nograph", "torch_exact"):  # at decode: its decode mode (fixed blocks, no host read)
        decode = variant != "torch_exact" and phase == "decode"
        graphs = {"graphs": variant == "torch"}  # torch: the decode mode's own graphs (experimental)
        return "torch", {"timeout_s": timeout_s, **({"max_tokens": T, **graphs} if decode else {})}
    if variant == "torch_fixed":
        return "torch_fixed", {"max_tokens": T, "timeout_s": timeout_s}
    sizes = {"max_tokens": T, "hidden": H, "top_k": k, "num_slots": E, "dtype": dtype, "timeout_s": timeout_s}
    if variant in FP8_VARIANTS:
        sizes["dispatch_dtype"] = torch.float8_e4m3fn
    if variant.startswith("nvlink"):
        return "nvlink", {**sizes, "mode": "decode" if phase == "decode" else "prefill"}
    return "deepep", {**sizes, "mode": "normal" if variant == "deepep" else "low_latency"}


def dequant_batch(batch: ExpertBatch) -> ExpertBatch:
    """An FP8 batch's rows dequantised to bfloat16 in its layout (gathered: in batch row order, contiguous),
    what an identity FP8 expert would return; any other batch materialised as it is."""
    if batch.x_scale is None:
        return batch.materialize()
    q, s = batch.x, batch.x_scale
    if batch.index is not None:  # gathered: the rows through the index (fp8 as bytes: any torch indexes those)
        q = q.view(torch.uint8).index_select(0, batch.index).view(q.dtype)
        s = s.index_select(0, batch.index)
    y = (q.float().unflatten(-1, (s.shape[-1], -1)) * s.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    return batch.with_x(y)


class _Run:
    """One rank's state for one case: inputs, the expected answers, and what was recorded."""

    def __init__(self, case: tuple, rank: int, W: int, device: torch.device, args: argparse.Namespace,
                 barrier: Callable[[], None]) -> None:
        self.case, self.rank, self.W, self.device, self.args, self.barrier = case, rank, W, device, args, barrier
        phase, E, k, H, T = case
        self.dtype = DTYPES[args.dtype]
        self.placement = Placement.identity(E, W).to(device)
        self.routing = _routing(T, E, k, device, args.seed + rank)
        self.x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).to(device, self.dtype)
        self.expected = (self.x.double() * self.routing.topk_weights.double().sum(1, keepdim=True)).to(self.dtype)
        # every rank's routing: pairs and token rows each rank must receive
        ids = [torch.empty_like(self.routing.topk_ids) for _ in range(W)]
        dist.all_gather(ids, self.routing.topk_ids.contiguous())
        phys = torch.stack([self.placement.physical_ids(i, r) for r, i in enumerate(ids)]).long()  # [W, T, k]
        P_local = self.placement.local_experts
        self.expected_counts = torch.bincount(phys.flatten(), minlength=E)[rank * P_local:(rank + 1) * P_local]
        dest = phys // P_local
        token_rows = torch.stack([(dest == r).any(-1).sum() for r in range(W)])  # [W] rows per (token, rank)
        self.pair_rows = int((dest == rank).sum())
        self.token_rows = int(token_rows[rank])
        self.mean_rows = float(token_rows.double().mean())
        self._expected_fp8: torch.Tensor | None = None
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.failed: list[dict] = []

    def case_dict(self) -> dict:
        phase, E, k, H, T = self.case
        return {"phase": phase, "tokens": T, "experts": E, "top_k": k, "hidden": H, "dtype": self.args.dtype,
                "world_size": self.W}

    def skip(self, variant: str, reason: str) -> None:
        if self.rank == 0:
            print(f"  skipping {variant}: {reason}")
        self.skipped.append({"case": self.case_dict(), "variant": variant, "reason": reason})

    def fail(self, variant: str, stage: str, error: str) -> None:
        if self.rank == 0:
            print(f"  FAILED {variant} at {stage}: {error}")
        self.failed.append({"case": self.case_dict(), "variant": variant, "stage": stage, "error": error})

    def row_bytes(self, variant: str) -> int:
        """Bytes of one token row as the variant moves it (FP8: e4m3 values + float32 scales per 128)."""
        H = self.case[3]
        return H + 4 * (H // 128) if variant in FP8_VARIANTS else H * self.x.element_size()

    def bytes_per_rank(self, variant: str) -> float:
        """Bytes of the token rows a rank receives (mean over ranks), one per (token, destination rank)."""
        return self.mean_rows * self.row_bytes(variant)

    def expected_fp8(self) -> torch.Tensor:
        """sum_k(w) * dequant(quant(x)), x quantised per token and 128 channels (float64)."""
        if self._expected_fp8 is None:
            from nanomoe_kernels.fp8_quant import quant_fp8_groups_torch

            q, s = quant_fp8_groups_torch(self.x)
            xq = q.double().unflatten(-1, (s.shape[1], -1)) * s.double().unsqueeze(-1)
            self._expected_fp8 = xq.flatten(-2) * self.routing.topk_weights.double().sum(1, keepdim=True)
        return self._expected_fp8

    def check(self, out: torch.Tensor, counts: torch.Tensor | None, fp8: bool = False) -> str:
        """'' when out equals sum_k(w) * x (fp8: of x quantised, within 1e-2 norm-wise) and counts equal the
        expected per-expert counts, else why not."""
        if counts is not None and not torch.equal(counts.long().cpu(), self.expected_counts.cpu()):
            return (f"rank {self.rank}: counts {counts.sum()} rows != expected {self.expected_counts.sum()} "
                    f"(per-expert counts differ)")
        if fp8:
            want = self.expected_fp8()
            err = float((out.double() - want).norm() / want.norm().clamp_min(1e-30))
            return "" if err < 1e-2 else f"rank {self.rank}: FP8 combine(dispatch(x)) off by {err:.3g} (relative)"
        try:
            torch.testing.assert_close(out, self.expected, rtol=2e-2, atol=2e-2)
        except AssertionError as err:
            return f"rank {self.rank}: combine(dispatch(x)) != sum_k(w) * x: {' '.join(str(err).splitlines()[1:3])}"
        return ""

    def b2b_fields(self, t: list[tuple[float, float]], variant: str) -> dict:
        """Rows of eager calls timed back to back (no barrier between iterations): the slowest rank's medians."""
        med = slowest([statistics.median(v[0] for v in t), statistics.median(v[1] for v in t)], self.device)
        nd, nc = self.bytes_per_rank(variant), self.bytes_per_rank("")  # combine moves rows in x's dtype
        out = {"b2b_dispatch_us": round(med[0] * 1e6, 2), "b2b_gbps": sig(nd / med[0] / 1e9)}
        if med[1] > 0:
            out.update(b2b_combine_us=round(med[1] * 1e6, 2), b2b_combine_gbps=sig(nc / med[1] / 1e9))
        return out

    def add_row(self, variant: str, t_d: list[float], t_c: list[float] | None, extra: dict) -> None:
        med = slowest([statistics.median(t_d), statistics.median(t_c) if t_c else 0.0], self.device)
        nd, nc = self.bytes_per_rank(variant), self.bytes_per_rank("")
        row = {"case": self.case_dict(), "variant": variant, "median_us": round(med[0] * 1e6, 2),
               "dispatch_us": round(med[0] * 1e6, 2), "gbps": sig(nd / med[0] / 1e9),
               "recv_rows": self.token_rows, "pair_rows": self.pair_rows, "row_bytes": self.row_bytes(variant),
               "bytes_per_rank": round(nd)}
        if t_c:
            row["combine_us"] = round(med[1] * 1e6, 2)
            row["combine_gbps"] = sig(nc / med[1] / 1e9)
            row["round_us"] = round((med[0] + med[1]) * 1e6, 2)
        row.update(extra)
        self.rows.append(row)


def _graph_fields(run: _Run, comm: object, variant: str) -> dict:
    """CUDA-graph replays of dispatch, of combine, and of both in one graph; checked before timing."""
    a, barrier, fp8 = run.args, dist.barrier, variant in FP8_VARIANTS
    out: dict = {}
    d = lambda: dispatch(run.x, run.routing, comm, run.placement)  # noqa: E731
    try:
        # whole rounds only: a comm may allow one dispatch in flight (dispatch, its combine, the next)
        def round_trip() -> torch.Tensor:
            b, h = d()
            return combine(dequant_batch(b), h, comm)

        g_d, bh = capture_graph(d, warm_fn=round_trip)
        # FP8: a static bf16 expert output (refreshed from the dispatched rows before the check), combined in
        # place of the experts; bf16: the dispatched batch itself
        ys = dequant_batch(bh[0]) if fp8 else bh[0]
        g_c, y = capture_graph(lambda: combine(ys, bh[1], comm), warmup=0)
        g_r, y_r = capture_graph((lambda: combine(ys, d()[1], comm)) if fp8 else round_trip, warmup=0)
        ok = True
    except Exception as err:  # noqa: BLE001 - recorded; the eager rows stand
        ok, out["graph_error"] = False, f"rank {run.rank}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    if not all_ranks_ok(ok, run.device):
        out["graph_error"] = ranks_errors(out.get("graph_error", ""))
        print(f"  {variant}: CUDA graph capture failed: {out['graph_error']}")
        return out
    g_d.replay()
    if fp8:
        ys.x.copy_(dequant_batch(bh[0]).x)
    g_c.replay()
    why = run.check(y, bh[0].counts, fp8)
    g_r.replay()
    why = why or ("" if fp8 else run.check(y_r, None))  # FP8: its static expert output is an earlier call's
    if not all_ranks_ok(not why, run.device):
        out["graph_error"] = ranks_errors(why)
        run.fail(variant, "graph check", out["graph_error"])
        return out
    # replays back to back (one barrier first): ranks run in lockstep as in a decode loop
    t = time_back_to_back(g_d.replay, g_c.replay, run.device, a.warmup, a.iters, barrier)
    t_r = time_back_to_back(g_r.replay, None, run.device, a.warmup, a.iters, barrier)
    med = slowest([statistics.median(v[0] for v in t), statistics.median(v[1] for v in t),
                   statistics.median(v[0] for v in t_r)], run.device)
    return {"graph_dispatch_us": round(med[0] * 1e6, 2), "graph_combine_us": round(med[1] * 1e6, 2),
            "graph_round_us": round(med[2] * 1e6, 2)}


def _comm_variant(run: _Run, variant: str) -> None:
    """Build, check and time one comm variant; failures are recorded, never raised."""
    name, opts = comm_spec(variant, run.case, run.dtype, run.args.timeout)
    try:
        ok, why = supports_comm(name, **opts)
    except Exception as err:  # noqa: BLE001 - a supports() that raises is a reason too
        ok, why = False, f"supports() raised {type(err).__name__}: {err}"
    if not all_ranks_ok(ok, run.device):
        run.skip(variant, ranks_errors(why))
        return
    comm, stage, err_msg = None, "build", ""
    try:
        comm = make_comm(name, **opts)
        stage = "check"
        batch, handle = dispatch(run.x, run.routing, comm, run.placement)
        err_msg = run.check(combine(dequant_batch(batch), handle, comm), batch.counts, variant in FP8_VARIANTS)
    except Exception as err:  # noqa: BLE001
        err_msg = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    if not all_ranks_ok(not err_msg, run.device):
        run.fail(variant, stage, ranks_errors(err_msg))
        if comm is not None:
            release_comm(comm)
        return
    try:
        state: dict = {}

        def d() -> None:
            state["bh"] = dispatch(run.x, run.routing, comm, run.placement)

        def identity_experts() -> None:  # untimed: a gathered batch's rows, in batch order (what experts return)
            state["y"] = dequant_batch(state["bh"][0])  # FP8 rows: dequantised to bf16 too

        c = lambda: combine(state["y"], state["bh"][1], comm)  # noqa: E731
        t = time_pair(d, c, run.device, run.args.warmup, run.args.iters, run.barrier, middle=identity_experts)
        extra = {"mode": opts["mode"]} if "mode" in opts else {}
        if name == "torch":
            extra["mode"] = "decode" if "max_tokens" in opts else "exact"
        if run.device.type == "cuda":
            extra.update(run.b2b_fields(time_back_to_back(d, c, run.device, run.args.warmup, run.args.iters,
                                                          dist.barrier, middle=identity_experts), variant))
        graphable = variant in SYNC_FREE or (name == "nvlink" and opts["mode"] == "decode") or (
            name == "torch" and "max_tokens" in opts)
        if graphable and run.device.type == "cuda" and not run.args.no_graph:
            extra.update(_graph_fields(run, comm, variant))
        run.add_row(variant, [v[0] for v in t], [v[1] for v in t], extra)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        run.fail(variant, "timing", f"{type(err).__name__}: {err}")
    release_comm(comm)


def _a2a_variant(run: _Run, variant: str) -> None:
    """Baseline: one all_to_all_single of the same (token, k) pair rows, splits known in advance."""
    H, W, k = run.x.shape[1], run.W, run.routing.topk_ids.shape[1]
    phys = run.placement.physical_ids(run.routing.topk_ids, run.rank).long().flatten() // run.placement.local_experts
    send_splits = torch.bincount(phys, minlength=W)
    recv_splits = torch.empty_like(send_splits)
    dist.all_to_all_single(recv_splits, send_splits)
    send = run.x.repeat_interleave(k, 0)[torch.argsort(phys, stable=True)]
    recv = send.new_empty((int(recv_splits.sum()), H))
    ss, rs = send_splits.tolist(), recv_splits.tolist()
    a2a = lambda: dist.all_to_all_single(recv, send, rs, ss)  # noqa: E731
    t = time_pair(a2a, None, run.device, run.args.warmup, run.args.iters, run.barrier)
    extra = {}
    if run.device.type == "cuda":
        extra = run.b2b_fields(time_back_to_back(a2a, None, run.device, run.args.warmup, run.args.iters, dist.barrier),
                               variant)
    run.add_row(variant, [v[0] for v in t], None, extra)


def _peer_variant(run: _Run, variant: str) -> None:
    """Raw DeepEP Buffer calls (bench/deepep_peer.py), checked and timed like the comms."""
    ok, why = deepep_peer.supports(variant, run.case, run.dtype, run.device)
    if not all_ranks_ok(ok, run.device):
        run.skip(variant, ranks_errors(why))
        return
    try:
        t, err_msg = deepep_peer.run(variant, run, run.args.warmup, run.args.iters)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        t, err_msg = None, f"{type(err).__name__}: {err}"
    if not all_ranks_ok(not err_msg, run.device):
        run.fail(variant, "peer", ranks_errors(err_msg))
        return
    run.add_row(variant, [v[0] for v in t[0]], [v[1] for v in t[0]], run.b2b_fields(t[1], variant))


def _one_case(case: tuple, rank: int, W: int, device: torch.device, args: argparse.Namespace,
              barrier: Callable[[], None]) -> _Run:
    run = _Run(case, rank, W, device, args, barrier)
    if rank == 0:
        phase, E, k, H, T = case
        print(f"{phase} E={E} k={k} H={H} T={T}: {run.token_rows} token rows / {run.pair_rows} pairs to rank 0")
    a2a = "nccl_a2a" if args.backend == "nccl" else "gloo_a2a"
    for variant in args.variants:
        if variant in DECODE_ONLY and case[0] != "decode":
            run.skip(variant, "decode-only variant (prefill sizes are refused)")
        elif variant == "nccl_a2a":
            _a2a_variant(run, a2a)
        elif variant in deepep_peer.VARIANTS:
            _peer_variant(run, variant)
        else:
            _comm_variant(run, variant)
    base = {r["variant"]: r["dispatch_us"] for r in run.rows}.get(a2a)
    for r in run.rows:
        if base and r["variant"] != a2a:
            r["speedup_vs"] = {a2a: round(base / r["dispatch_us"], 3)}
    return run


def run_rank(rank: int, W: int, args: argparse.Namespace) -> None:
    """One rank: every case, then rank 0 prints and writes the JSON; exit 1 if any variant failed."""
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    dist.init_process_group(args.backend, rank=rank, world_size=W, timeout=timedelta(seconds=args.timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    host = args.barrier == "host" and device.type == "cuda"
    barrier = HostBarrier(rank, W, os.environ.get("MASTER_PORT", "0"), device) if host else dist.barrier
    try:
        runs = [_one_case(case, rank, W, device, args, barrier) for case in CASE_SETS[args.cases]]
        rows = [r for run in runs for r in run.rows]
        failed = [f for run in runs for f in run.failed]
        if rank == 0:
            _print_table(rows)
            if args.json:
                write_record(args.json, "dispatch", device, W, {}, rows,
                             {"skipped": [s for run in runs for s in run.skipped], "failed": failed,
                              "per_call_barrier": "host" if host else "dist"})
        any_failed = not all_ranks_ok(not failed, device)
        if host:
            barrier.close()
    finally:
        dist.destroy_process_group()
    if any_failed:
        if rank == 0:
            print("FAILED variants: " + "; ".join(f"{f['variant']} ({f['case']['phase']} T={f['case']['tokens']}) "
                                                  f"at {f['stage']}" for f in failed))
        sys.exit(1)


def _print_table(rows: list[dict]) -> None:
    for r in rows:
        c = r["case"]
        graph = "" if "graph_round_us" not in r else (
            f"  graph {r['graph_dispatch_us']:.1f}/{r['graph_combine_us']:.1f} round {r['graph_round_us']:.1f} us")
        b2b = "" if "b2b_dispatch_us" not in r else f"  b2b {r['b2b_dispatch_us']:.1f}/{r.get('b2b_combine_us', 0):.1f}"
        graph += b2b
        print(f"{c['phase']:7s} E={c['experts']:3d} k={c['top_k']} H={c['hidden']:5d} T={c['tokens']:5d} "
              f"{r['variant']:13s} dispatch {r['dispatch_us']:9.1f} us  combine "
              f"{r.get('combine_us', float('nan')):9.1f} us  {r['gbps']:8.2f} GB/s/rank ({r['row_bytes']} B rows)"
              f"{graph}")


def main(argv: list[str] | None = None) -> None:
    """Parse flags and spawn the ranks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--cases", default="default", choices=list(CASE_SETS))
    p.add_argument("--quick", action="store_true", help="same as --cases quick: small cases that fit a CPU")
    p.add_argument("--variants", default="all",
                   help=f"comma list of {VARIANTS + list(deepep_peer.VARIANTS)}; all = {','.join(VARIANTS)}")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--barrier", default="host", choices=["host", "dist"],
                   help="per-call rows: dist.barrier then a shared-memory host barrier that releases the ranks "
                        "together (host, GPUs), or dist.barrier alone (dist: the ranks' release skew counts)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for its peers")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.cases = "quick" if args.quick else args.cases
    known = VARIANTS + list(deepep_peer.VARIANTS) + ["gloo_a2a"]
    args.variants = VARIANTS if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in known]
    if bad or not args.variants:
        raise SystemExit(f"--variants: unknown {bad}; choose from {known} or all")
    args.variants = ["nccl_a2a" if v == "gloo_a2a" else v for v in args.variants]
    if args.backend == "nccl" and torch.cuda.device_count() < args.world_size:
        raise SystemExit(f"--backend nccl needs {args.world_size} GPUs, found {torch.cuda.device_count()}")
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} / {args.warmup}")
    try:
        spawn_ranks(run_rank, args.world_size, args.master_port, args)
    except Exception as err:  # a rank exited non-zero: failed variants were printed above
        raise SystemExit(f"bench_dispatch: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


if __name__ == "__main__":
    main()
