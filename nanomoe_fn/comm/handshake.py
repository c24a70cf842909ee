"""The first exchange of EP ranks: every rank compares its static config with the others' and all fail together.

Ranks launched with different flags (torchrun with per-node command lines, a stale config file) would
otherwise meet in their first collective with tensors of different shapes, which gloo answers with a
native abort (SIGABRT) and NCCL with a hang or garbage. `handshake(config)` right after
`init_process_group` turns that into one ValueError, raised on EVERY rank, naming the field that
differs and the ranks' values:

    ValueError: rank 0: handshake: ranks disagree on their config: rank 1 has MoEConfig.hidden=16,
    rank 0 has 32

How: each rank flattens its config into sorted (field name, repr(value)) pairs and hashes them
(sha256, the first 8 bytes as an int64). The hashes are all-gathered in one tensor collective on the
group's device (CUDA for NCCL, CPU for gloo); only when they differ are the field lists exchanged
(all_gather_object) to name the field. Field names: a dataclass at the top (or directly in a
top-level tuple/list) is named by its class (`MoEConfig.hidden`); dict keys and dataclass fields below
are joined with dots (`{"comm": ...}` -> `comm`), sequence items as `[i]`.

Timeouts: on gloo the gather waits `Work.wait(timeout_s)` on the host; on NCCL a StageWatchdog
(comm/watchdog.py) aborts the group when the gather has not completed within timeout_s. Either way a
peer that never arrives ends with a TimeoutError naming the rank and the 'handshake' stage. (The very
first NCCL collective also connects the peers on the host; that part is bounded by the process
group's own timeout.)

Dimension legend: W ranks in the group.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
from typing import Any

_MISSING = "<missing>"


def config_fields(config: object) -> list[tuple[str, str]]:
    """The config as sorted (field name, repr(value)) pairs; see the module docstring for the names.

    config: a dataclass instance, a dict (string-able keys), a tuple/list of those, or a plain value.
    Tensors are refused (TypeError): a handshake compares static fields, never data."""
    out: list[tuple[str, str]] = []
    _flatten(config, "", out, top=True)
    return sorted(out)


def _flatten(value: object, name: str, out: list[tuple[str, str]], top: bool = False) -> None:
    if type(value).__name__ in ("Tensor", "Parameter") and hasattr(value, "shape"):
        raise TypeError(f"handshake: config field {name or '<config>'} is a tensor; pass static fields only")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        prefix = f"{name}." if name else f"{type(value).__name__}."
        for f in dataclasses.fields(value):
            _flatten(getattr(value, f.name), prefix + f.name, out)
    elif isinstance(value, dict):
        for key in value:
            _flatten(value[key], f"{name}.{key}" if name else str(key), out)
    elif isinstance(value, (tuple, list)) and (top or not all(_is_leaf(v) for v in value)):
        for i, item in enumerate(value):
            if top and dataclasses.is_dataclass(item) and not isinstance(item, type):
                _flatten(item, "", out, top=False)
            else:
                _flatten(item, f"{name}[{i}]", out)
    else:
        out.append((name or "<config>", repr(value)))


def _is_leaf(value: object) -> bool:
    return not (dataclasses.is_dataclass(value) or isinstance(value, (dict, tuple, list))) and not (
        type(value).__name__ in ("Tensor", "Parameter") and hasattr(value, "shape"))


def config_hash(fields: list[tuple[str, str]]) -> int:
    """A stable signed 64-bit hash of the sorted fields (the same in every process and Python run)."""
    digest = hashlib.sha256(repr(fields).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def describe_mismatch(per_rank: list[list[tuple[str, str]] | None], errors: list[str | None]) -> str:
    """The message for ranks whose fields differ: the first differing field with every odd rank's value
    and rank 0's (or the ranks whose config could not be read, with their error)."""
    bad = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if bad:
        return "some ranks could not hash their config: " + "; ".join(bad)
    maps = [dict(f or []) for f in per_rank]
    names = sorted(set().union(*maps))
    differing = [n for n in names if len({m.get(n, _MISSING) for m in maps}) > 1]
    if not differing:  # equal fields, different hashes: cannot happen unless repr is not stable
        return "config hashes differ but no field does (a field whose repr changes between processes?)"
    first = differing[0]
    ref = maps[0].get(first, _MISSING)
    parts = [f"rank {r} has {first}={m.get(first, _MISSING)}" for r, m in enumerate(maps)
             if m.get(first, _MISSING) != ref]
    msg = "ranks disagree on their config: " + ", ".join(parts) + f", rank 0 has {ref}"
    if len(differing) > 1:
        more = ", ".join(differing[1:4]) + (", ..." if len(differing) > 4 else "")
        msg += f" (also differing: {more})"
    return msg


def handshake(config: object, group: Any = None, timeout_s: float = 60.0) -> None:
    """Check that every rank of `group` (default: the default process group) passes an equal config.

    Call it on every rank right after init_process_group, before any collective that depends on the
    config. Returns None when all agree; otherwise EVERY rank raises the same ValueError naming the
    first field that differs and the ranks' values. A peer that does not arrive within timeout_s:
    TimeoutError naming the rank and the 'handshake' stage. A config that cannot be hashed (a
    tensor in it) on any rank: every rank raises ValueError naming that rank.
    """
    import torch
    import torch.distributed as dist

    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"handshake: timeout_s must be a number > 0, got {timeout_s!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("handshake: no process group: call torch.distributed.init_process_group first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    error: str | None = None
    try:
        fields = config_fields(config)
        h = config_hash(fields)
    except (TypeError, ValueError) as err:
        fields, h, error = None, 0, str(err)
    backend = str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = torch.tensor([h, 0 if error is None else 1], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    _wait(work, rank, timeout_s, device, group)
    table = torch.stack(gathered).cpu()
    if not bool(table[:, 1].any()) and bool((table[:, 0] == table[0, 0]).all()):
        return
    objs: list = [None] * world
    dist.all_gather_object(objs, (fields, error), group=group)
    raise ValueError(f"rank {rank}: handshake: " + describe_mismatch([o[0] for o in objs], [o[1] for o in objs]))


def _wait(work: Any, rank: int, timeout_s: float, device: Any, group: Any) -> None:
    """Wait for the hash gather: on the host with a timeout (gloo), or under a StageWatchdog (NCCL)."""
    if device.type != "cuda":
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as err:  # gloo reports timeouts and vanished peers as RuntimeError
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TimeoutError(f"rank {rank}: stage 'handshake' failed waiting for peers "
                               f"(timeout {timeout_s:g}s): {first}") from err
        if ok is False:
            raise TimeoutError(f"rank {rank}: stage 'handshake' timed out after {timeout_s:g}s")
        return
    import torch

    from nanomoe_fn.comm.watchdog import StageWatchdog

    wd = StageWatchdog(rank, timeout_s, group=group)
    try:
        work.wait()  # the current stream waits on the gather
        wd.arm("handshake")
        try:  # returns when done, or raises once the watchdog has aborted the group
            torch.cuda.current_stream().synchronize()
        except RuntimeError:
            wd.check()  # the timeout, named, rather than the abort's NCCL error
            raise
        wd.check()
    finally:
        wd.close()
