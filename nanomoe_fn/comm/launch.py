"""Starting several EP ranks on one host: a free rendezvous port, port and world-size checks, a spawn helper.

Used by the benches and the multi-rank tests alike (one place, so tests never import bench/). Launch
mistakes are found in the parent, before any process starts, each as one ValueError line:
`check_port` (a port outside 1..65535, or one another process holds), `check_world_size`.
`spawn_error_line` turns what torch.multiprocessing raises for a failed rank into one line naming the
rank and its error (the last line of the rank's traceback).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: object, flag: str = "--master-port") -> int:
    """port as an int, after checking that it is in 1..65535 and can be bound now on this host (all
    interfaces, SO_REUSEADDR as torch's TCPStore does); else ValueError naming `flag` in one line."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{flag} must be an int port number in 1..65535, got {port!r}")
    if not 1 <= port <= 65535:
        raise ValueError(f"{flag} must be in 1..65535, got {port}")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            why = err.strerror or str(err)
            raise ValueError(f"{flag} {port} cannot be used: {why} (another process holds it?); "
                             "pick another port or leave it out for a free one") from None
    return port


def check_world_size(world_size: object, flag: str = "--world-size") -> int:
    """world_size as an int >= 1, else ValueError naming `flag`."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{flag} must be an int >= 1, got {world_size!r}")
    return world_size


def spawn_error_line(err: BaseException) -> str:
    """One line for an error raised by spawn_ranks: 'rank r: <the rank's exception line>' for a rank that
    raised, 'rank r: exited with code c' for one that died, else the error's first non-empty line."""
    index = getattr(err, "error_index", None)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    code = getattr(err, "exit_code", None)
    if index is not None and code is not None and type(err).__name__ == "ProcessExitedException":
        signal_name = getattr(err, "signal_name", None)
        return f"rank {index}: killed by {signal_name}" if signal_name else f"rank {index}: exited with code {code}"
    if index is not None and lines:
        return f"rank {index}: {lines[-1]}"  # the traceback's last line: 'ValueError: ...'
    return lines[0] if lines else type(err).__name__


def spawn_ranks(fn: Callable, world_size: int, master_port: int | None, *args: object) -> None:
    """Run fn(rank, world_size, *args) in world_size processes rendezvousing on 127.0.0.1; the world
    size and an explicit master_port are checked first (ValueError, nothing spawned)."""
    import torch.multiprocessing as mp

    check_world_size(world_size, "world_size")
    if master_port is not None:
        check_port(master_port, "master_port")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(master_port or free_port())
    mp.spawn(fn, args=(world_size, *args), nprocs=world_size, join=True)
