"""The `deepep` comm on 2 GPUs: the MoE layer over DeepEP (normal and low-latency) == reference == one rank.

Dimension legend: T tokens on a rank, H hidden, E logical experts, S physical slots, k top-k, W ranks.

Two NCCL ranks (NVLink multicast off) run nanomoe_fn.moe.layer.moe_layer with DeepEPComm in both modes and
the `bmm` and `triton` expert backends, bf16, over drawn cases (uniform, skewed V3-style grouped sigmoid
routing, a rank with zero tokens, all ranks empty, one hot expert set, redundant slots static and
dynamic). Each rank also runs the single-rank layer on its tokens; the parent compares everything with
the float64 reference. Low-latency mode is also captured in a CUDA graph and replayed on two inputs
(== eager), and a handle passed to the wrong comm must raise ValueError. One spawn per hidden size
(NVSHMEM is set up once per process: one low-latency Buffer per process). Every spawn has a hard
wall-clock bound (NANOMOE_DEEPEP_WALL_S, default 240 s); a hang ends in a failure naming each rank's
last step. Needs >= 2 CUDA devices and DeepEP v1.2.1 importable as deep_ep (built from its source).
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree

from nanomoe_fn import MoEParams, moe_layer, shard_moe_params
from nanomoe_fn.comm.launch import free_port
from tests.dist_worker import case_inputs, case_placement
from tests.helpers import MIN_MARGIN, NO_MULTICAST, TOL, assert_close_to_ref, reference_layer


def _deep_ep_error() -> str | None:
    try:
        import deep_ep  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure to load means: skip
        return f"{type(err).__name__}: {err}"
    return None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA devices"),
              pytest.mark.skipif(_deep_ep_error() is not None, reason="deep_ep (DeepEP v1.2.1) is not importable")]

W = 2
WALL_S = float(os.environ.get("NANOMOE_DEEPEP_WALL_S", "240"))
BACKENDS = ("bmm", "triton")
MODES = ("normal", "low_latency")
MAX_TOKENS = 64  # low-latency capacity per rank: masked batch [S / W, W * 64, H]
# hidden -> (slots S, top-k): 7168 is DeepSeek-V3's hidden with its top-8; 2048 a second compiled size
SHAPES = {7168: (32, 8), 2048: (16, 4)}


def draw_cases(hidden: int) -> list[dict]:
    """Cases sharing S slots and top-k (one comm per mode serves them all)."""
    S, k = SHAPES[hidden]
    base = dict(hidden=hidden, intermediate=32, num_experts=S, top_k=k)
    v3 = dict(base, score_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
              routed_scaling_factor=2.5, correction_bias=True)
    hot = [3, 1, 0, 2, 5, 4, 7, 6][:k]  # all on rank 0 (slots 0..S/2-1 there): rank 1 receives nothing
    cases = [
        dict(name="uniform", cfg=dict(base, n_shared_experts=1), tokens=[48, 40]),
        dict(name="skewed_v3_routing", cfg=v3, tokens=[64, 33], skew=True),
        dict(name="rank0_empty", cfg=base, tokens=[0, 24]),
        dict(name="all_empty", cfg=base, tokens=[0, 0]),
        dict(name="one_hot_set", cfg=base, tokens=[20, 20], hot=hot),
        dict(name="redundant_hot_static", cfg=dict(base, num_experts=S - 4), tokens=[24, 24], hot=hot,
             replicate=[0, 1, 2, 3]),
        dict(name="redundant_dynamic", cfg=dict(base, num_experts=S - 4), tokens=[30, 12], redundant=4,
             remap_policy="dynamic"),
    ]
    for i, c in enumerate(cases):
        c.update(dtype="bfloat16", seed=1000 * hidden + i)
    return cases


def gpu_case_inputs(case: dict, rank: int, x_seed: int | None = None) -> tuple:
    """case_inputs, hot router rows rescaled for wide hidden sizes, `skew` (rank 0's slots' router rows x3),
    and an optional second token draw."""
    cfg, params, x = case_inputs(case, rank)
    if case.get("hot"):  # logits ~8/(j+1) for the j-th hot expert, 0 elsewhere: no float underflow, no ties
        g = params.gate
        params = MoEParams(type(g)(g.weight * (2.0 / (0.9 * cfg.hidden)), g.bias), params.experts, params.shared)
    if case.get("skew"):
        w = params.gate.weight.clone()
        w[: SHAPES[cfg.hidden][0] // W] *= 3.0
        params = MoEParams(type(params.gate)(w, params.gate.bias), params.experts, params.shared)
    if x_seed is not None:
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(x_seed)).to(x.dtype)
    return cfg, params, x


def _graph_check(comm, local, x_d, x2_d, cfg, placement, backend: str) -> dict:
    """Capture moe_layer over the low-latency comm, replay on x and on x2; eager runs to compare."""
    run = lambda x: moe_layer(local, x, cfg, comm, placement, backend=backend)  # noqa: E731
    eager1, eager2 = run(x_d), run(x2_d)
    x_static = x_d.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run(x_static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out_static = run(x_static)
    graph.replay()
    replay1 = out_static.clone()
    x_static.copy_(x2_d)
    graph.replay()
    replay2 = out_static.clone()
    torch.cuda.synchronize()
    return {k: v.cpu() for k, v in dict(eager1=eager1, eager2=eager2, replay1=replay1, replay2=replay2).items()}


def _run_rank(rank: int, hidden: int, cases: list[dict], note, dev: torch.device) -> dict:
    from nanomoe_fn.batch import Handle
    from nanomoe_fn.comm.deepep import DeepEPComm
    from nanomoe_fn.moe.experts import expert_ffn
    from nanomoe_fn.moe.layer import shared_mlp
    from nanomoe_fn.moe.route import route

    S, k = SHAPES[hidden]
    comms = {}
    for mode in MODES:
        ok, why = DeepEPComm.supports(mode=mode, hidden=hidden, num_slots=S, max_tokens=MAX_TOKENS, top_k=k)
        assert ok, f"DeepEPComm.supports({mode}) says no: {why}"
        note(f"building {mode} comm")
        comms[mode] = DeepEPComm(mode, hidden=hidden, num_slots=S, max_tokens=MAX_TOKENS, top_k=k)
    out: dict = {"cases": [], "graph": {}, "graph_errors": {}}
    for i, case in enumerate(cases):
        cfg, params, x = gpu_case_inputs(case, rank)
        placement = case_placement(case, cfg, W).to(dev)
        assert placement.num_physical == S, (case["name"], placement.num_physical)
        params_d = pytree.tree_map(lambda t: t.to(dev), params)
        x_d = x.to(dev)
        local = shard_moe_params(params_d, placement, rank)
        entry = {}
        for backend in BACKENDS:
            note(f"case {i} {case['name']} single/{backend}")
            entry[f"single/{backend}"] = moe_layer(params_d, x_d, cfg, backend=backend).cpu()
            for mode, comm in comms.items():
                note(f"case {i} {case['name']} {mode}/{backend}")
                entry[f"{mode}/{backend}"] = moe_layer(local, x_d, cfg, comm, placement, backend=backend).cpu()
        out["cases"].append(entry)
        if i == 0:  # the halves by hand, with wrong handles offered to combine first
            note("halves and wrong handles")
            normal, ll = comms["normal"], comms["low_latency"]
            routing = route(local.gate, x_d, cfg)
            batch, handle = normal.dispatch_recv(normal.dispatch_send(x_d, routing, placement))
            y = expert_ffn(local.experts, batch, "bmm")
            errors = []
            for comm, bad in ((ll, handle), (normal, Handle(torch.zeros(1), torch.zeros(1, 1)))):
                try:
                    comm.combine_send(y, bad)
                    errors.append("no error")
                except ValueError as err:
                    errors.append(f"ValueError: {err}")
            halves = normal.combine_recv(normal.combine_send(y, handle))
            out["halves"] = (halves + shared_mlp(local.shared, x_d)).cpu()
            out["wrong_handle"] = errors
    cfg, params, x = gpu_case_inputs(cases[0], rank)
    placement = case_placement(cases[0], cfg, W).to(dev)  # identity: nothing to look up inside the graph
    params_d = pytree.tree_map(lambda t: t.to(dev), params)
    local = shard_moe_params(params_d, placement, rank)
    x2 = gpu_case_inputs(cases[0], rank, x_seed=cases[0]["seed"] + 77 * (rank + 1))[2]
    for backend in BACKENDS:  # last: a failed capture leaves DeepEP's host-side buffer parity flipped
        note(f"cuda graph low_latency/{backend}")
        try:
            out["graph"][backend] = _graph_check(comms["low_latency"], local, x.to(dev), x2.to(dev), cfg,
                                                 placement, backend)
        except Exception:  # noqa: BLE001 - reported by the parent with the traceback
            out["graph_errors"][backend] = traceback.format_exc()
            break
    torch.cuda.synchronize()
    note("closing")
    for comm in comms.values():
        comm.close()
    return out


def run_deepep_worker(rank: int, world_size: int, port: int, hidden: int, cases: list[dict], out_dir: str) -> None:
    """One rank: NCCL group on cuda:rank, all cases; saves out_rank{rank}.pt (errors: error_rank{rank}.txt)."""
    _in_rank(rank, world_size, port, out_dir, lambda note, dev: _run_rank(rank, hidden, cases, note, dev))


def run_deepep_fp8_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the FP8 low-latency test (its own processes: one low-latency Buffer per process)."""
    _in_rank(rank, world_size, port, out_dir, lambda note, dev: _fp8_rank(rank, note, dev))


def _in_rank(rank: int, world_size: int, port: int, out_dir: str, body) -> None:
    """NCCL group on cuda:rank, results = body(note, device) saved to out_rank{rank}.pt, progress and errors
    written beside it."""
    t0 = time.monotonic()
    progress = open(os.path.join(out_dir, f"progress_rank{rank}.txt"), "a", buffering=1)

    def note(msg: str) -> None:
        progress.write(f"{time.monotonic() - t0:7.1f}s {msg}\n")

    try:
        torch.cuda.set_device(rank)
        extra = {}
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            extra["device_id"] = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120), **extra)
        results = body(note, torch.device("cuda", rank))
        torch.save(results, os.path.join(out_dir, f"out_rank{rank}.pt"))
        note("saved")
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        progress.close()


def _tails(out_dir) -> str:
    lines = []
    for rank in range(W):
        for kind in ("progress", "error"):
            path = out_dir / f"{kind}_rank{rank}.txt"
            if path.exists():
                text = path.read_text().strip().splitlines()
                lines.append(f"--- rank {rank} {kind} (last lines):\n" + "\n".join(text[-25:]))
    return "\n".join(lines)


def _spawn(hidden: int | None, cases: list[dict], out_dir) -> None:
    """Spawn the ranks: the layer cases for `hidden`, or (hidden None) the FP8 low-latency test."""
    fn, args = ((run_deepep_fp8_worker, (W, free_port(), str(out_dir))) if hidden is None else
                (run_deepep_worker, (W, free_port(), hidden, cases, str(out_dir))))
    ctx = mp.start_processes(fn, args=args, nprocs=W, join=False, start_method="spawn")
    deadline = time.monotonic() + WALL_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:  # our own children, by object
                    if p.is_alive():
                        p.kill()
                        p.join(10)
                pytest.fail(f"DeepEP ranks (hidden {hidden}) did not finish within {WALL_S:g}s; killed.\n"
                            + _tails(out_dir))
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
        pytest.fail(f"a DeepEP rank failed (hidden {hidden}): {err}\n" + _tails(out_dir))


def _compare(failures: list[str], what: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    try:
        assert_close_to_ref(out, ref, torch.bfloat16, what)
    except AssertionError as err:
        failures.append(str(err))


@pytest.mark.parametrize("hidden", sorted(SHAPES))
def test_deepep_layer_equals_reference_and_single_rank(hidden, tmp_path, monkeypatch):
    for name, value in NO_MULTICAST.items():
        monkeypatch.setenv(name, value)
    cases = draw_cases(hidden)
    _spawn(hidden, cases, tmp_path)
    results = [torch.load(tmp_path / f"out_rank{rank}.pt") for rank in range(W)]
    failures: list[str] = []
    compared = 0
    for i, case in enumerate(cases):
        for rank in range(W):
            cfg, params, x = gpu_case_inputs(case, rank)
            ref, margin = reference_layer(params, x, cfg)
            if margin <= MIN_MARGIN and not case.get("hot"):
                continue  # near-tie in routing: float32 and float64 may choose differently
            compared += 1
            entry = results[rank]["cases"][i]
            tag = f"hidden {hidden} case {i} {case['name']} tokens {case['tokens']} rank {rank}"
            for backend in BACKENDS:
                single = entry[f"single/{backend}"]
                _compare(failures, f"{tag} single/{backend} vs reference", single, ref)
                for mode in MODES:
                    ep = entry[f"{mode}/{backend}"]
                    if ep.dtype != x.dtype:
                        failures.append(f"{tag} {mode}/{backend}: dtype {ep.dtype}, want {x.dtype}")
                    _compare(failures, f"{tag} {mode}/{backend} vs reference", ep, ref)
                    _compare(failures, f"{tag} {mode}/{backend} vs single rank", ep, single.double())
            if i == 0:
                _compare(failures, f"{tag} normal halves by hand vs reference", results[rank]["halves"], ref)
                for message in results[rank]["wrong_handle"]:
                    if not message.startswith("ValueError") or "handle" not in message:
                        failures.append(f"{tag}: a wrong handle gave {message!r}, want a ValueError about it")
    assert compared >= len(cases) * W // 2, f"only {compared} case-ranks compared (routing near-ties)"
    for rank in range(W):  # CUDA graph of the low-latency layer
        for backend, trace in results[rank]["graph_errors"].items():
            failures.append(f"hidden {hidden} rank {rank} cuda graph low_latency/{backend} failed:\n{trace}")
        case = cases[0]
        cfg, params, x = gpu_case_inputs(case, rank)
        x2 = gpu_case_inputs(case, rank, x_seed=case["seed"] + 77 * (rank + 1))[2]
        for backend, got in results[rank]["graph"].items():
            tag = f"hidden {hidden} rank {rank} cuda graph low_latency/{backend}"
            for xi, n in ((x, "1"), (x2, "2")):
                ref, margin = reference_layer(params, xi, cfg)
                _compare(failures, f"{tag} replay {n} vs eager", got[f"replay{n}"], got[f"eager{n}"].double())
                if margin > MIN_MARGIN:
                    _compare(failures, f"{tag} replay {n} vs reference", got[f"replay{n}"], ref)
            if torch.equal(got["replay1"], got["replay2"]):
                failures.append(f"{tag}: both replays gave the same output for different inputs")
    assert not failures, f"{len(failures)} failures (tolerance {TOL[torch.bfloat16]:g}):\n" + "\n".join(failures)



# ---- low-latency FP8 dispatch: DeepEP quantises on the way, the batch is FP8, combine stays bf16 ------------

FP8_H, FP8_I, FP8_S, FP8_K, FP8_T = 7168, 256, 32, 8, 48
FP8_BOUND, FP8_SAME = 5e-2, 2e-2  # vs float64; vs the layer quantising locally (DeepEP computes its scales with
# its own arithmetic, so some values land one e4m3 step apart: 6.4e-3 and 1.18e-2 seen in runs 42 and 43)


def fp8_rank_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens bf16 [T, H] and routing (ids [T, k] int32, weights [T, k] float32), on the CPU."""
    gen = torch.Generator().manual_seed(500 + rank)
    x = torch.randn(FP8_T, FP8_H, generator=gen) * 4.0 ** torch.randn(FP8_T, 1, generator=gen)
    ids = torch.rand(FP8_T, FP8_S, generator=gen).topk(FP8_K, dim=1).indices.to(torch.int32)
    return x.to(torch.bfloat16), ids, torch.rand(FP8_T, FP8_K, generator=gen)


def _fp8_layer(experts, routing, placement, comm, x: torch.Tensor) -> torch.Tensor:
    """dispatch -> triton_fp8 experts -> combine."""
    from nanomoe_fn import combine, dispatch
    from nanomoe_fn.moe.experts import expert_ffn

    batch, handle = dispatch(x, routing, comm, placement)
    return combine(expert_ffn(experts, batch, "triton_fp8"), handle, comm)


def _ffn64(w, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
    """sum_j w[t, j] * FFN_{ids[t, j]}(x[t]) in float64 (unquantised x, dequantised weights)."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(w.w13.shape[0]):
        t, j = torch.nonzero(ids == e, as_tuple=True)
        h = x[t].double() @ w.w13[e].T
        act = torch.nn.functional.silu(h[:, :FP8_I]) * h[:, FP8_I:]
        out.index_add_(0, t, act @ w.w2[e].T * wts[t, j, None].double())
    return out


def _fp8_rank(rank: int, note, dev: torch.device) -> dict:
    from nanomoe_fn import LocalComm, Placement, Routing, combine, dispatch
    from nanomoe_fn.comm.deepep import DeepEPComm
    from nanomoe_fn.moe.experts import expert_ffn
    from nanomoe_fn.moe.fp8_params import dequantize_experts, quantize_experts
    from nanomoe_fn.moe.params import SwiGLUExperts, SwiGLUExpertsFP8

    gen = torch.Generator().manual_seed(78)
    bf = SwiGLUExperts(torch.randn(FP8_S, 2 * FP8_I, FP8_H, generator=gen) * FP8_H ** -0.5,
                       torch.randn(FP8_S, FP8_H, FP8_I, generator=gen) * FP8_I ** -0.5)
    full = quantize_experts(pytree.tree_map(lambda t: t.to(dev), bf))
    lo, hi = rank * FP8_S // W, (rank + 1) * FP8_S // W
    local = SwiGLUExpertsFP8(full.w13[lo:hi], full.w13_scale[lo:hi], full.w2[lo:hi], full.w2_scale[lo:hi], full.block)
    x, ids, wts = (t.to(dev) for t in fp8_rank_inputs(rank))
    routing, placement = Routing(ids, wts), Placement.identity(FP8_S, W).to(dev)
    note("building the FP8 low-latency comm")
    comm = DeepEPComm("low_latency", hidden=FP8_H, num_slots=FP8_S, max_tokens=MAX_TOKENS, top_k=FP8_K,
                      dispatch_dtype=torch.float8_e4m3fn)
    batch, handle = dispatch(x, routing, comm, placement)
    out: dict = {"layout": (batch.x.dtype, batch.x_scale.dtype, tuple(batch.x_scale.shape), batch.x_scale.stride())}
    # each expert's valid rows, dequantised, against the tokens routed to it (any order): a bijection, every
    # row within e4m3's rounding of its token
    sent = [fp8_rank_inputs(r) for r in range(W)]
    worst, bijective = 0.0, True
    for e in range(hi - lo):
        n = int(batch.counts[e])
        got = batch.x[e, :n].float() * batch.x_scale[e, :n].repeat_interleave(128, -1)
        want = torch.cat([xr[(ir == lo + e).any(1)] for xr, ir, _ in sent]).to(dev).float()
        if n != want.shape[0]:
            bijective = False
        elif n:
            match = torch.cdist(got, want).argmin(1)
            bijective &= bool(torch.equal(match.sort().values, torch.arange(n, device=dev)))
            worst = max(worst, float(((got - want[match]).norm(dim=1) / want[match].norm(dim=1)).max()))
    out["rows"] = (bijective, worst)
    out["layer"] = combine(expert_ffn(local, batch, "triton_fp8"), handle, comm).cpu()
    out["local"] = _fp8_layer(full, routing, Placement.identity(FP8_S, 1).to(dev), LocalComm(), x).cpu()
    out["ref"] = _ffn64(dequantize_experts(full, torch.float64), x, ids, wts).cpu()
    note("cuda graph of the FP8 low-latency layer")
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _fp8_layer(local, routing, placement, comm, static_x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = _fp8_layer(local, routing, placement, comm, static_x)
    static_x.copy_(x * -0.5)
    graph.replay()
    out["graph"] = static_out.clone().cpu()
    torch.cuda.synchronize()
    out["graph_eager"] = _fp8_layer(local, routing, placement, comm, x * -0.5).cpu()
    torch.cuda.synchronize()
    note("closing")
    comm.close()
    return out


def test_deepep_low_latency_fp8_dispatch(tmp_path, monkeypatch):
    """use_fp8 low-latency dispatch: an FP8 masked batch (fp8 rows, DeepEP's column-major float32 scales),
    rows within e4m3 rounding of the routed tokens; the layer (-> triton_fp8 -> bf16 combine) equals the
    layer that quantises locally up to DeepEP's scale rounding, is within the FP8 bound of float64, and
    replays in a CUDA graph."""
    for name, value in NO_MULTICAST.items():
        monkeypatch.setenv(name, value)
    _spawn(None, [], tmp_path)
    C = W * MAX_TOKENS
    for rank in range(W):
        got = torch.load(tmp_path / f"out_rank{rank}.pt")
        assert got["layout"] == (torch.float8_e4m3fn, torch.float32, (FP8_S // W, C, FP8_H // 128),
                                 (C * FP8_H // 128, 1, C)), got["layout"]
        bijective, worst = got["rows"]
        assert bijective and worst <= 2**-4, f"rank {rank}: rows {got['rows']}"
        assert got["layer"].dtype == torch.bfloat16 and got["layer"].shape == (FP8_T, FP8_H)
        rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
        vs_ref, vs_local = rel(got["layer"], got["ref"]), rel(got["layer"], got["local"])
        print(f"rank {rank}: FP8 layer vs float64 {vs_ref:.4g}, vs the locally quantised layer {vs_local:.4g}")
        assert vs_ref < FP8_BOUND, f"rank {rank}: {vs_ref:.3g} from float64"
        assert vs_local < FP8_SAME, f"rank {rank}: {vs_local:.3g} from the layer quantising locally"
        assert torch.equal(got["graph"], got["graph_eager"]), f"rank {rank}: graph replay != eager"
