"""StageWatchdog bookkeeping on the CPU: timeouts name the rank and stage, completed work is dropped,
memory stays bounded, and every comm entry point raises the stored error.

The events here are small objects with a `query()` method, injected through `arm(stage, event=...)`:
they test the watchdog's own logic (on GPUs the comm records CUDA events; tests/gpu covers that path).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from nanomoe_fn import Placement, Routing
from nanomoe_fn.comm.launch import free_port
from nanomoe_fn.comm.torch_dist import TorchComm
from nanomoe_fn.comm.watchdog import StageWatchdog


class Flag:
    """An event that completes when told to."""

    def __init__(self, done: bool = False) -> None:
        self.done = done
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.done


def wait_for(cond, seconds: float) -> float:
    """Seconds until cond() held (fails after `seconds`)."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < seconds, f"condition not met within {seconds}s"
        time.sleep(0.005)
    return time.monotonic() - t0


def test_never_completing_stage_times_out_naming_rank_and_stage(capfd):
    aborts = []
    wd = StageWatchdog(rank=3, timeout_s=0.3, poll_s=0.01, abort=lambda: aborts.append(1))
    wd.check()  # nothing yet
    wd.arm("dispatch/payload", event=Flag())
    elapsed = wait_for(lambda: wd.error is not None, 3.0)
    assert 0.25 <= elapsed < 1.5, elapsed
    msg = "rank 3: EP stage 'dispatch/payload' did not complete within 0.3s (a peer did not arrive)"
    assert str(wd.error) == msg
    assert aborts == [1] and wd.aborted_with == "abort callback"
    with pytest.raises(TimeoutError, match="rank 3: EP stage 'dispatch/payload'"):
        wd.check()
    with pytest.raises(TimeoutError, match="did not complete"):  # raised again on every later call
        wd.check()
    assert msg in capfd.readouterr().err
    wd.arm("combine/payload", event=Flag())  # after the error: a no-op
    assert wd.pending() == 0
    wd.close()


def test_completed_events_are_dropped_and_never_time_out():
    aborts = []
    wd = StageWatchdog(rank=0, timeout_s=0.2, poll_s=0.01, abort=lambda: aborts.append(1))
    late = Flag()
    for i in range(50):
        wd.arm(f"stage{i % 3}", event=Flag(done=True))
    wd.arm("late", event=late)
    wait_for(lambda: wd.pending() == 1, 2.0)  # the done ones are gone, the late one stays
    time.sleep(0.1)
    late.done = True  # completes before its timeout
    wait_for(lambda: wd.pending() == 0, 2.0)
    time.sleep(0.3)
    assert wd.error is None and aborts == []
    wd.check()
    wd.close()


def test_entries_stay_bounded_and_keep_the_oldest_start():
    wd = StageWatchdog(rank=1, timeout_s=10.0, poll_s=5.0, max_per_stage=4, abort=lambda: None)
    first = Flag()
    wd.arm("dispatch/counts", event=first)
    t_first = time.monotonic()
    flood = [Flag() for _ in range(3000)]
    for i, ev in enumerate(flood):
        wd.arm(("dispatch/counts", "dispatch/payload", "combine/payload")[i % 3], event=ev)
    assert wd.pending() == 3 * 4
    # the oldest entry survives the flood, so the stage still times out from its start
    assert wd.poll(now=t_first + 5.0) is None
    assert wd.poll(now=t_first + 10.5) == "dispatch/counts"
    first.done = True
    assert wd.poll(now=t_first + 5.0) is None and wd.pending() == 3 * 4 - 1
    for ev in flood:
        ev.done = True
    assert wd.poll(now=t_first + 100.0) is None and wd.pending() == 0
    wd.close()


def test_poll_drops_completed_prefix_only():
    wd = StageWatchdog(rank=0, timeout_s=1.0, poll_s=5.0, abort=lambda: None)
    a, b, c = Flag(done=True), Flag(), Flag(done=True)
    for ev in (a, b, c):
        wd.arm("s", event=ev)
    t0 = time.monotonic()
    assert wd.poll(now=t0) is None and wd.pending() == 2  # a dropped; b blocks c (stream order)
    b.done = True
    assert wd.poll(now=t0 + 2.0) is None and wd.pending() == 0
    wd.close()


def test_close_stops_the_thread_and_disarms():
    wd = StageWatchdog(rank=0, timeout_s=0.05, poll_s=0.01, abort=lambda: None)
    wd.arm("s", event=Flag(done=True))
    thread = wd._thread
    assert thread is not None and thread.daemon
    wd.close()
    assert not thread.is_alive()
    wd.arm("s", event=Flag())  # closed: ignored, so it can never fire
    time.sleep(0.1)
    assert wd.error is None and wd.pending() == 0
    assert wd._device is None  # injected events only: CUDA was never touched


@pytest.mark.parametrize("bad", [dict(timeout_s=0), dict(timeout_s=1, poll_s=0), dict(timeout_s=1, max_per_stage=1)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        StageWatchdog(rank=0, **bad)


def test_every_comm_entry_point_raises_the_stored_error():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        comm = TorchComm(timeout_s=5)
        placement = Placement.identity(4, 1)
        x = torch.randn(3, 8)
        routing = Routing(torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32), torch.rand(3, 2))
        pending = comm.dispatch_send(x, routing, placement)
        batch, handle = comm.dispatch_recv(pending)
        batch = batch.materialize()  # what identity experts would give combine
        back = comm.combine_send(batch, handle)
        expected = (x * routing.topk_weights.sum(1, keepdim=True)).to(x.dtype)
        torch.testing.assert_close(comm.combine_recv(back), expected)
        # a stage that never completes (as on a GPU whose peer is absent)
        comm.watchdog = StageWatchdog(comm.rank, 0.1, poll_s=0.01, abort=lambda: None)
        comm.watchdog.arm("combine/payload", event=Flag())
        wait_for(lambda: comm.watchdog.error is not None, 3.0)
        calls = [lambda: comm.dispatch_send(x, routing, placement), lambda: comm.dispatch_recv(pending),
                 lambda: comm.combine_send(batch, handle), lambda: comm.combine_recv(back), comm.check]
        for call in calls:
            with pytest.raises(TimeoutError, match="rank 0: EP stage 'combine/payload' did not complete"):
                call()
        comm.close()
    finally:
        dist.destroy_process_group()
