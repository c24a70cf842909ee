"""EPLB on real ranks: the MoE layer under a skewed load before and after a rebalance, and the weight move.

    python bench/bench_eplb_layer.py --world-size 2 --backend nccl --json bench/results/eplb_layer_h200x2.json
    python bench/bench_eplb_layer.py --world-size 2 --backend gloo --hidden-dim 64 --intermediate-dim 32 \
        --num-experts 16 --top-k 4 --tokens 64,0 --redundant 2        # CPU, about 5 s
On the 2-GPU machine bench/gpu/eplb_gpu_part.sh runs it at the default (DeepSeek-V3) sizes.

Dimension legend: T tokens per rank, H hidden, I expert intermediate, E logical experts, R redundant
slots, P = E + R physical slots, W ranks, S = P // W slots per rank, k experts per token.

Routing bypasses the router: each rank draws topk_ids [T, k] (k distinct experts per token) from the
skew, exactly (nanomoe_fn/eplb/skew.py), and calls dispatch -> expert_ffn -> combine itself (no router,
no shared expert):
  zipf<a>  expert popularity ~ 1 / rank^a, a seeded permutation (the same on every rank) says which
           expert holds which rank; k experts per token drawn without replacement (Gumbel top-k).
  hot1     one hot expert h (seeded, the same on every rank) in every token, plus k - 1 others uniform.
Top-k weights are uniform in [0.5, 1.5], normalised per token. Per skew and token count:
  identity      P = E, every rank holds E / W experts; the layer is timed.
  weight_move   the load (nanomoe_fn.eplb.recorder, summed over ranks) is rebalanced with R redundant slots
                and the expert weights are moved with nanomoe_fn.eplb.move.replace_expert_weights (P2P over the
                process group: NCCL on GPUs); timed forward, then moved back (round trip checked bit
                for bit), --move-reps times; the moved weights must equal the logical experts their new
                slots name, bit for bit.
  eplb_static / eplb_dynamic  the layer again with the new placement and that remap policy.
Every layer output is checked against the identity output on the same tokens (relative error within
the dtype's tolerance; not bitwise: rows are grouped differently) and the first --check-tokens tokens
against reference.moe_experts in float64. Time per variant: the median over iterations of the slowest
rank. Balancedness = mean / max rows received per rank in dispatch (1.0 = even; eplb.balancedness's
convention); max_over_mean is its inverse. Expert weights are made on the device from an integer hash of
(seed, expert, index), so any rank can regenerate any expert bit for bit (at V3 dims the experts are
22.5 GB in bf16: drawing them on the CPU would take minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nanomoe_reference as reference  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import common  # noqa: E402
from nanomoe_fn import MoEConfig, Placement, Routing, SwiGLUExperts, TorchComm, TorchFixedComm  # noqa: E402
from nanomoe_fn.comm.base import Comm  # noqa: E402
from nanomoe_fn.eplb import balancedness, gpu_loads, placement_for_layer, rebalance_experts  # noqa: E402
from nanomoe_fn.eplb.move import plan_weight_moves, replace_expert_weights  # noqa: E402
from nanomoe_fn.eplb.recorder import global_load, init_recorder, record  # noqa: E402
from nanomoe_fn.eplb.skew import draw_routing  # noqa: E402
from nanomoe_fn.moe.combine import combine
from nanomoe_fn.moe.dispatch import dispatch  # noqa: E402
from nanomoe_fn.moe.experts import expert_ffn, get_expert_backend  # noqa: E402
from nanomoe_fn.profiling import nvtx_range  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _hash_uniform(n: int, key: int, device: torch.device) -> torch.Tensor:
    """[n] float32 uniform in [-1, 1) from an integer hash of (key, index): exact integer arithmetic, so the
    same bits on every device (a device RNG's stream may depend on the device's launch configuration)."""
    m32 = 0xFFFFFFFF
    x = (torch.arange(n, dtype=torch.int64, device=device) + ((key * 0x9E3779B1) & m32)) & m32  # < 2^32
    for mult in (0x7FEB352D, 0x2C1B3C6D):  # odd multipliers < 2^31: products stay inside int64
        x = x.bitwise_xor_(x >> 16).mul_(mult).bitwise_and_(m32)
    return x.bitwise_xor_(x >> 15).bitwise_right_shift_(8).float().mul_(2.0 ** -23).sub_(1.0)


def expert_weights(cfg: MoEConfig, ids: list[int], dtype: torch.dtype, device: torch.device,
                   seed: int) -> SwiGLUExperts:
    """SwiGLU weights of logical experts `ids` (w13 [n, 2I, H], w2 [n, H, I]), drawn on `device` from a hash
    of (seed, expert, index): uniform with std 1/sqrt(fan_in), the same bits on every rank and at every call."""
    H, I_ = cfg.hidden, cfg.intermediate
    w13 = torch.empty(len(ids), 2 * I_, H, dtype=dtype, device=device)
    w2 = torch.empty(len(ids), H, I_, dtype=dtype, device=device)
    for j, e in enumerate(ids):
        key = (seed * 100_003 + e) * 2
        w13[j].copy_(_hash_uniform(w13[j].numel(), key, device).mul_((3 / H) ** 0.5).view(2 * I_, H))
        w2[j].copy_(_hash_uniform(w2[j].numel(), key + 1, device).mul_((3 / I_) ** 0.5).view(H, I_))
    return SwiGLUExperts(w13, w2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of out against ref (0.0 for empty tensors), computed on out's device."""
    if ref.numel() == 0:
        return 0.0
    ref = ref.to(out.device, torch.float64)
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def make_comm(name: str, args: argparse.Namespace, T: int, placement: Placement, dtype: torch.dtype) -> Comm:
    """The --comm backend sized for T tokens per rank and this placement's slots (nvlink/deepep need them;
    decode mode up to 256 tokens, prefill mode above)."""
    if name == "torch":
        return TorchComm(timeout_s=args.timeout)
    if name == "torch_fixed":
        return TorchFixedComm(max(1, T), timeout_s=args.timeout)
    decode = T <= 256
    try:
        if name == "nvlink":
            from nanomoe_fn.comm.nvlink import NvlinkComm as cls
            opts = dict(mode="decode" if decode else "prefill")
        else:
            from nanomoe_fn.comm.deepep import DeepEPComm as cls
            opts = dict(mode="low_latency" if decode else "normal")
    except ImportError as err:
        raise SystemExit(f"--comm {name} is not available in this checkout: {err}") from err
    opts.update(max_tokens=max(1, T), hidden=args.hidden_dim, top_k=args.top_k,
                num_slots=placement.num_physical, dtype=dtype, timeout_s=args.timeout)
    ok, why = cls.supports(**opts)
    if not ok:
        raise SystemExit(f"--comm {name} cannot run here: {why}")
    return cls(**opts)


def run_rank(rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One rank: init the process group, run every case, (rank 0) write the record."""
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # the ranks share the cores
    dist.init_process_group(args.backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=args.timeout))
    try:
        _bench(rank, world_size, args, device)
    finally:
        dist.destroy_process_group()


def _slowest(values: list[float], device: torch.device) -> list[float]:
    """Per-entry maximum over ranks (a layer is as slow as its slowest rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _moves(rank: int, old: Placement, new: Placement, w_old: SwiGLUExperts, args: argparse.Namespace,
           device: torch.device) -> tuple[SwiGLUExperts, list[float], list[float]]:
    """Move weights old -> new and back --move-reps times: (new weights, forward and back seconds per
    rep, slowest rank). Raises when the round trip does not give back the old weights bit for bit."""
    fwd, back, w_new = [], [], w_old
    for _ in range(args.move_reps):
        for a, b, acc in ((old, new, fwd), (new, old, back)):
            dist.barrier()
            common.sync(device)
            t0 = time.perf_counter()
            moved = replace_expert_weights(a, b, w_old if a is old else w_new, rank, args.chunk_experts,
                                           timeout_s=args.timeout)
            common.sync(device)
            acc.append(time.perf_counter() - t0)
            if a is old:
                w_new = moved
            elif not (torch.equal(moved.w13, w_old.w13) and torch.equal(moved.w2, w_old.w2)):
                raise SystemExit(f"rank {rank}: expert weights moved to the EPLB placement and back differ")
            del moved
    return w_new, _slowest(fwd, device), _slowest(back, device)


@dataclass
class Env:
    """What every case of one rank shares: the group, the config, the identity-placed expert weights."""

    rank: int
    W: int
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    cfg: MoEConfig
    backend: str
    ident: Placement
    w_id: SwiGLUExperts
    comms: dict = field(default_factory=dict)

    def layer(self, experts: SwiGLUExperts, x: torch.Tensor, routing: Routing,
              pl: Placement) -> tuple[torch.Tensor, torch.Tensor]:
        """Drawn routing -> dispatch -> expert_ffn -> combine: (out [T, H], rows this rank received [])."""
        key = (x.shape[0], pl.num_physical)  # nvlink/deepep buffers depend on both
        if key not in self.comms:
            self.comms[key] = make_comm(self.args.comm, self.args, x.shape[0], pl, self.dtype)
        comm = self.comms[key]
        batch, handle = dispatch(x, routing, comm, pl)
        return combine(expert_ffn(experts, batch, self.backend), handle, comm), batch.counts.sum()

    def timed(self, name: str, experts: SwiGLUExperts, x: torch.Tensor, routing: Routing,
              pl: Placement) -> list[float]:
        """Seconds per iteration of the layer, slowest rank."""
        def step() -> None:
            with nvtx_range(f"eplb_layer[{name}]"):
                self.layer(experts, x, routing, pl)
        times = common.time_fn(step, self.device, self.args.warmup, self.args.iters, barrier=dist.barrier)
        return _slowest(times, self.device)

    def weights(self, ids: list[int]) -> SwiGLUExperts:
        """Logical experts `ids`, regenerated (bit-identical to the placed ones)."""
        return expert_weights(self.cfg, ids, self.dtype, self.device, self.args.seed)


def _reference(env: Env, x: torch.Tensor, routing: Routing, n: int) -> torch.Tensor:
    """reference.moe_experts (float64, CPU) on the first n tokens, from regenerated expert weights."""
    used, compact = torch.unique(routing.topk_ids[:n].cpu(), return_inverse=True)
    w = env.weights(used.tolist())
    return reference.moe_experts(x[:n], compact, routing.topk_weights[:n].cpu(), (w.w13.cpu(), w.w2.cpu()),
                                 "swiglu")


def _case(env: Env, T: int, skew: str) -> list[dict]:
    """Identity layer, rebalance, weight move, EPLB layer for one skew and token count: the rows."""
    rank, W, args, device = env.rank, env.W, env.args, env.device
    E, R, k = args.num_experts, args.redundant, args.top_k
    seed = args.seed + 1000 * args.skews.index(skew) + T
    routing = draw_routing(skew, T, E, k, seed, rank, device)
    gen = torch.Generator(device=device).manual_seed(seed + 31 * rank + 17)
    x = torch.randn(T, env.cfg.hidden, generator=gen, device=device).to(env.dtype)
    n = min(args.check_tokens, T)
    ref = _reference(env, x, routing, n)
    ident = env.ident.to(device)
    outs, recv = {}, {}
    outs["identity"], recv["identity"] = env.layer(env.w_id, x, routing, ident)
    times = {"identity": env.timed("identity", env.w_id, x, routing, ident)}
    # record and rebalance: every rank gets the same placement from the same summed load
    load = global_load(record(init_recorder(1, 1, E, device), routing.topk_ids, 0)).double()  # [1, E]
    phy2log, _, _ = rebalance_experts(load, E + R, 1, 1, W, args.policy)
    new = placement_for_layer(phy2log, 0, E, W)
    # the weight move, there and back, timed on the slowest rank; checked bit for bit
    plan = plan_weight_moves(env.ident, new, args.chunk_experts)
    w_new, fwd, back = _moves(rank, env.ident, new, env.w_id, args, device)
    expect = env.weights(new.local_slots(rank).tolist())
    if not (torch.equal(expect.w13, w_new.w13) and torch.equal(expect.w2, w_new.w2)):
        raise SystemExit(f"rank {rank} {skew} T={T}: moved weights differ from the logical experts their new "
                         f"slots name")
    del expect
    for policy in args.remap:
        pl = new.with_policy(policy).to(device)
        outs[f"eplb_{policy}"], recv[f"eplb_{policy}"] = env.layer(w_new, x, routing, pl)
        times[f"eplb_{policy}"] = env.timed(f"eplb_{policy}", w_new, x, routing, pl)
    del w_new
    # the output must not change across the rebalance, and must match the float64 reference
    tol = TOL[env.dtype]
    errs = {v: _slowest([rel_err(o, outs["identity"]), rel_err(o[:n], ref), float(not torch.isfinite(o).all())],
                        device) for v, o in outs.items()}
    for v, (e_id, e_ref, bad) in errs.items():
        if not (e_id <= tol and e_ref <= tol and not bad):
            raise SystemExit(f"{skew} T={T} {v}: output changed across the rebalance or is wrong: relative error "
                             f"vs identity {e_id:.3g}, vs float64 reference {e_ref:.3g} (tolerance {tol:g}), "
                             f"non-finite values: {bool(bad)}")
    case = {"skew": skew, "tokens": T, "phase": "decode" if T <= 256 else "prefill", "experts": E, "redundant": R,
            "top_k": k, "hidden": env.cfg.hidden, "intermediate": env.cfg.intermediate,
            "dtype": str(env.dtype).replace("torch.", ""), "comm": args.comm, "backend_ffn": env.backend,
            "policy": args.policy, "world_size": W}
    rows, med_id = [], statistics.median(times["identity"])
    for v, ts in times.items():
        gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(W)]
        dist.all_gather(gathered, recv[v].reshape(1).to(torch.int64))
        per_rank = torch.cat(gathered).cpu()
        bal = float(balancedness(per_rank))
        expected = balancedness(gpu_loads(load, (env.ident if v == "identity" else new).phy2log[None], W))
        med = statistics.median(ts)
        rows.append({"case": case, "variant": v, "median_us": round(med * 1e6, 2),
                     "mean_us": round(statistics.fmean(ts) * 1e6, 2), "balancedness": round(bal, 4),
                     "max_over_mean": round(1 / max(bal, 1e-12), 4), "rows_per_rank": per_rank.tolist(),
                     "balancedness_expected": round(float(expected[0]), 4),
                     "rel_err_vs_identity": common.sig(errs[v][0]), "rel_err_vs_reference": common.sig(errs[v][1]),
                     "checked_tokens": n, **({"speedup_vs": {"identity": round(med_id / med, 4)}}
                                             if v != "identity" else {})})
    slot_bytes = sum(t[0].numel() * t.element_size() for t in (env.w_id.w13, env.w_id.w2))
    moved = plan.sent_slots() * slot_bytes
    recv_max = max(sum(t.dst_rank == r for rd in plan.rounds for t in rd) for r in range(W)) * slot_bytes
    med = statistics.median(fwd)
    rows.append({"case": dict(case, chunk_experts=args.chunk_experts), "variant": "weight_move",
                 "median_us": round(med * 1e6, 2), "back_median_us": round(statistics.median(back) * 1e6, 2),
                 "gb_moved": common.sig(moved / 1e9), "gbps": common.sig(moved / med / 1e9),
                 "gbps_per_rank": common.sig(recv_max / med / 1e9), "slots_moved": plan.sent_slots(),
                 "rounds": plan.num_rounds, "weights_exact": True, "roundtrip_exact": True})
    return rows


def _bench(rank: int, W: int, args: argparse.Namespace, device: torch.device) -> None:
    dtype = common.pick_dtype(args.dtype, device)
    cfg = MoEConfig(hidden=args.hidden_dim, intermediate=args.intermediate_dim, num_experts=args.num_experts,
                    top_k=args.top_k)
    backend = args.backend_ffn or ("triton" if device.type == "cuda" else "bmm")
    get_expert_backend(backend, cfg, device)  # says why it cannot run, before any work
    ident = Placement.identity(args.num_experts, W)
    w_id = expert_weights(cfg, ident.local_slots(rank).tolist(), dtype, device, args.seed)
    env = Env(rank, W, args, device, dtype, cfg, backend, ident, w_id)
    rows = []
    for T in args.tokens:
        for skew in args.skews:
            case_rows = _case(env, T, skew)
            rows += case_rows
            if rank == 0:
                for row in case_rows:
                    keys = ("median_us", "speedup_vs", "balancedness", "rel_err_vs_identity", "gb_moved", "gbps")
                    print(f"{skew:>8} T={T:<5} {row['variant']:>12}: "
                          + "  ".join(f"{key} {row[key]}" for key in keys if key in row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # ceilings after the timed loops: the big matmul's thread pool otherwise slows small CPU work
    ceilings = common.measure_ceilings(device, dtype) if args.json and rank == 0 else None
    if rank == 0 and args.json:
        common.write_record(args.json, "eplb", device, W, ceilings, rows)
        print(f"wrote {args.json}")


def _list(kind: type):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> None:
    """Parse and check flags, then spawn --world-size ranks."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--master-port", type=int, default=None, help="default: a free port")
    ap.add_argument("--hidden-dim", type=int, default=7168)
    ap.add_argument("--intermediate-dim", type=int, default=2048)
    ap.add_argument("--num-experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=_list(int), default=[4096, 128], help="tokens per rank, comma-separated")
    ap.add_argument("--skews", type=_list(str), default=["zipf1.0", "hot1"], help="zipf<exponent> and/or hot1")
    ap.add_argument("--redundant", type=int, default=32, help="redundant slots R (E + R divisible by W)")
    ap.add_argument("--policy", default="global", choices=["global", "hierarchical"],
                    help="rebalance_experts policy (one group, one node)")
    ap.add_argument("--remap", type=_list(str), default=["static", "dynamic"], help="remap policies to time")
    ap.add_argument("--comm", default="torch", choices=["torch", "torch_fixed", "nvlink", "deepep"])
    ap.add_argument("--backend-ffn", default=None, choices=["loop", "bmm", "triton", "deepgemm"],
                    help="expert backend (default: triton on GPUs, bmm on the CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *common.DTYPES],
                    help="auto: bfloat16 on GPUs, else float32")
    ap.add_argument("--chunk-experts", type=int, default=8, help="expert slots a rank sends per move round")
    ap.add_argument("--move-reps", type=int, default=3, help="weight moves there and back")
    ap.add_argument("--check-tokens", type=int, default=2, help="tokens checked against the float64 reference")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for its peers")
    ap.add_argument("--json", default=None, help="write the JSON record (bench 'eplb'; its fields: bench/common.py, "
                    "write_record) to this path")
    args = ap.parse_args(argv)
    W, E = args.world_size, args.num_experts
    for name in ("world_size", "hidden_dim", "intermediate_dim", "num_experts", "top_k", "iters", "move_reps",
                 "chunk_experts"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("redundant", "warmup", "check_tokens"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.tokens or min(args.tokens) < 0:
        raise SystemExit(f"--tokens must list token counts >= 0, got {args.tokens}")
    if args.top_k > E:
        raise SystemExit(f"--top-k ({args.top_k}) must be <= --num-experts ({E})")
    if E % W or (E + args.redundant) % W:
        raise SystemExit(f"--world-size ({W}) must divide --num-experts ({E}) and --num-experts + --redundant "
                         f"({E + args.redundant})")
    for skew in args.skews:
        try:
            ok = skew == "hot1" or (skew.startswith("zipf") and float(skew[4:]) >= 0)
        except ValueError:
            ok = False
        if not ok:
            raise SystemExit(f"--skews: expected zipf<exponent >= 0> or hot1, got {skew!r}")
    if set(args.remap) - {"static", "dynamic"} or not args.remap:
        raise SystemExit(f"--remap: expected static and/or dynamic, got {args.remap}")
    if args.backend == "nccl":
        if torch.cuda.device_count() < W:
            raise SystemExit(f"--backend nccl needs {W} CUDA devices, this machine has {torch.cuda.device_count()}; "
                             f"use --backend gloo on the CPU")
        for key, value in NCCL_ENV.items():  # NVLink multicast stays off (inherited by the ranks)
            os.environ.setdefault(key, value)
    try:
        common.spawn_ranks(run_rank, W, args.master_port, args)
    except ValueError as err:  # a bad or taken --master-port, refused before anything is spawned: one line
        raise SystemExit(f"bench_eplb_layer: {err}") from err


if __name__ == "__main__":
    main()
