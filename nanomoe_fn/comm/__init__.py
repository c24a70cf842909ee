"""Comm backends by name. Each class has `supports(**options) -> (ok, reason)`."""

from nanomoe_fn.comm.base import Comm, make_comm, supports_comm
from nanomoe_fn.comm.deepep import DeepEPComm
from nanomoe_fn.comm.local import LocalComm
from nanomoe_fn.comm.nvlink import NvlinkComm
from nanomoe_fn.comm.torch_dist import TorchComm
from nanomoe_fn.comm.torch_fixed import TorchFixedComm

COMM_BACKENDS = {"local": LocalComm, "torch": TorchComm, "torch_fixed": TorchFixedComm, "nvlink": NvlinkComm,
                 "deepep": DeepEPComm}

__all__ = ["COMM_BACKENDS", "Comm", "DeepEPComm", "LocalComm", "NvlinkComm", "TorchComm", "TorchFixedComm", "make_comm",
           "supports_comm"]
