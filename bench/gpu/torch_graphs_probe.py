"""One GPU: the torch comm's decode-mode graphs (comm/torch_graphs.py) at world size 1, and the teardown rule.

Each scenario runs in its own process (NCCL process group of one rank) under a time bound, so a hang is recorded,
not suffered:
- `closed`: graph comm vs eager comm over a sequence of token counts (repeats capture and replay), bitwise and
  against the float64 formula; then close() and destroy_process_group, timed;
- `referenced`: the same, a reference to the static set kept past close() (what the first GPU test did): close()
  must still destroy the graphs, so destroy_process_group returns;
- `leaked`: no close(), the comm alive at destroy_process_group. With two or more ranks NCCL (2.26 on) waits there
  for the graphs of its collectives (recorded as `hung`); at one rank it returned (runs 78 and 84 on an H200,
  NCCL 2.28.9: a one-rank exchange leaves no persistent NCCL plan), so this probe cannot show the hazard alone.

    python bench/gpu/torch_graphs_probe.py --json out.json

Dimension legend: T tokens, H hidden, E experts (= slots), k top-k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanomoe_fn import ExpertBatch, Placement, Routing, TorchComm, combine, dispatch  # noqa: E402
from nanomoe_fn.comm.launch import free_port  # noqa: E402

H, E, K, T_MAX = 7168, 16, 8, 32
SEQ = [5, 5, 5, 32, 1, 32, 32, 0, 0, 5]


def inputs(call: int, T: int, dev: torch.device) -> tuple[torch.Tensor, Routing]:
    g = torch.Generator().manual_seed(call)
    x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
    return x, Routing(ids.to(dev, torch.int32), torch.rand(T, K, generator=g).to(dev))


def scaled(b: ExpertBatch) -> ExpertBatch:
    e = torch.arange(b.x.shape[0], device=b.x.device, dtype=torch.float32)
    return ExpertBatch((b.x.float() * (1 + e / 8)[:, None, None]).to(b.x.dtype), b.counts, "masked")


def scenario(name: str, port: int) -> dict:
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60), device_id=dev)
    placement = Placement.identity(E, 1).to(dev)
    graphed = TorchComm(timeout_s=30, max_tokens=T_MAX, graphs=True)
    eager = TorchComm(timeout_s=30, max_tokens=T_MAX, graphs=False)
    rows = []
    for call, T in enumerate(SEQ):
        x, r = inputs(call, T, dev)
        outs = []
        for comm in (graphed, eager):
            b, h = dispatch(x, r, comm, placement)
            outs.append(combine(scaled(b), h, comm))
        scale = 1 + (r.topk_ids.long() % E).double() / 8
        ref = (r.topk_weights.double() * scale).sum(1, keepdim=True) * x.double()
        err = float((outs[0].double() - ref).norm() / ref.norm().clamp_min(1e-30)) if T else 0.0
        rows.append(dict(T=T, equal=bool(torch.equal(outs[0], outs[1])), err=err))
    sets = list(graphed._graph_sets.values())
    res = dict(scenario=name, calls=rows, graphs=sorted(sets[0].dispatch_graphs) if sets else [],
               combine_graph=bool(sets and sets[0].combine_graph is not None))
    eager.close()
    if name != "leaked":
        graphed.close()  # `referenced` keeps `sets` alive past it
        res["after_close"] = [len(s.dispatch_graphs) + (s.combine_graph is not None) for s in sets]
    torch.cuda.synchronize()
    print(json.dumps(res), flush=True)  # before the teardown: a hang there still leaves the result
    t0 = time.perf_counter()
    dist.destroy_process_group()
    print(json.dumps({"destroy_s": round(time.perf_counter() - t0, 3)}), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--scenario", default=None, help="(internal) run one scenario in this process")
    p.add_argument("--limit", type=float, default=60.0, help="seconds a scenario may take before it counts as hung")
    a = p.parse_args()
    if a.scenario:
        scenario(a.scenario, free_port())
        return
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
    out = {"bench": "torch_graphs_probe", "torch": torch.__version__, "nccl": nccl, "scenarios": {}}
    for name in ("closed", "referenced", "leaked"):
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, __file__, "--scenario", name], capture_output=True, text=True,
                                 timeout=a.limit)
            lines = [json.loads(s) for s in run.stdout.splitlines() if s.startswith("{")]
            rec = {k: v for line in lines for k, v in line.items()}
            rec.update(rc=run.returncode, hung=False, stderr_tail=run.stderr[-1500:])
        except subprocess.TimeoutExpired as e:
            out_text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            lines = [json.loads(s) for s in out_text.splitlines() if s.startswith("{")]
            rec = {k: v for line in lines for k, v in line.items()}
            rec.update(hung=True, note=f"killed after {a.limit:g} s")
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        out["scenarios"][name] = rec
        print(name, json.dumps({k: v for k, v in rec.items() if k != "stderr_tail"}), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
