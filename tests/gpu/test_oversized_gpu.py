"""A rank given more tokens than a fixed-size comm's max_tokens, over NCCL (the Triton kernels' path).

The torch comm's decode mode, torch_fixed, the nvlink comm (decode and prefill) and DeepEP's low-latency mode (2
GPUs, where deep_ep imports): rank 0 dispatches 6 tokens with max_tokens=4 and the others 3.
Rank 0 sends none of its tokens but takes part in both exchanges, and its combine raises ValueError; every
other rank's output is right (identity experts) and nobody waits; then a good round works on every rank, and
after close() the comms that hold buffers (nvlink, DeepEP) refuse a dispatch.
At one GPU (world size 1) this checks the zero-row kernels and the refusal; at two, the peer as well.

Dimension legend: T tokens on a rank, W ranks.
"""

from __future__ import annotations

import pytest
import torch

from nanomoe_fn.comm.launch import free_port
from tests.dist_worker import run_oversized
from tests.helpers import NO_MULTICAST, spawn_bounded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _deep_ep_missing() -> str:
    try:
        import deep_ep  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError or a mismatched build
        return f"deep_ep (DeepEP v1.2.1) is not importable: {type(err).__name__}"
    return ""


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("kind", ["torch_decode", "torch_fixed", "nvlink", "nvlink_prefill", "deepep_ll"])
def test_oversized_rank_refused_at_combine_on_nccl(tmp_path, monkeypatch, kind, world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices")
    if kind == "deepep_ll" and (world_size < 2 or _deep_ep_missing()):
        pytest.skip(_deep_ep_missing() or "DeepEP's low-latency mode is checked at 2 ranks")
    for key, value in NO_MULTICAST.items():
        monkeypatch.setenv(key, value)
    spawn_bounded(run_oversized, world_size, (world_size, free_port(), str(tmp_path), kind, "nccl"), 120,
                  what=f"{kind} ranks")
    name = {"torch_decode": "torch", "torch_fixed": "torch_fixed", "nvlink": "nvlink", "nvlink_prefill": "nvlink",
            "deepep_ll": "deepep"}[kind]
    closed = ["True"] if name in ("nvlink", "deepep") else []   # after close(), a dispatch raises RuntimeError
    first, *rest = (tmp_path / "oversized_rank0.txt").read_text().split("\n")
    assert first.startswith(f"ValueError: rank 0: x had 6 tokens, more than this {name} comm's max_tokens=4; none "
                            f"of them was sent"), first
    assert rest == ["True"] + closed
    for rank in range(1, world_size):
        assert (tmp_path / f"oversized_rank{rank}.txt").read_text().split("\n") == ["True", "True"] + closed
