"""Starting several EP ranks on one host: a free rendezvous port and a spawn helper.

Used by the benches and the multi-rank tests alike (one place, so tests never import bench/).
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


def spawn_ranks(fn: Callable, world_size: int, master_port: int | None, *args: object) -> None:
    """Run fn(rank, world_size, *args) in world_size processes rendezvousing on 127.0.0.1."""
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(master_port or free_port())
    mp.spawn(fn, args=(world_size, *args), nprocs=world_size, join=True)
