"""Comm backends by name. Each class has `supports(**options) -> (ok, reason)`."""

from nanomoe_fn.comm.base import Comm, make_comm, supports_comm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.comm.torch_dist import TorchComm

COMM_BACKENDS = {"local": LocalComm, "torch": TorchComm}

__all__ = ["COMM_BACKENDS", "Comm", "LocalComm", "TorchComm", "make_comm", "supports_comm"]
