"""`opaque_to_compile`: torch.compiler.disable without importing torch._dynamo at import time.

`torch.compiler.disable` imports torch._dynamo, ~1.7 s of CPU, and every process that imports nanomoe_fn
would pay it (each spawned rank, each bench command line, `nanomoe generate`) though most never compile.
The wrapper below is marked the way torch.compiler.disable marks its own wrappers (`_torchdynamo_disable`,
read by dynamo when it meets the call: the call is a graph break and runs eagerly), and when it runs it
calls the function through torch.compiler.disable only once torch._dynamo is loaded: without it nothing can
be compiling, so the plain call is the same.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def opaque_to_compile(fn: F) -> F:
    """`fn` as torch.compile sees a torch.compiler.disable'd function (a graph break; Triton kernels, peer
    signals and DeepGEMM calls run eagerly inside it), with torch._dynamo imported only when it is in use."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:  # nothing compiles without it
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    call._torchdynamo_disable = True  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]
