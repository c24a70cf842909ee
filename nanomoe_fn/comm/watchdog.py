"""StageWatchdog: a peer that never arrives ends a GPU rank with an error naming the rank and stage.

On GPUs the comms never block the host on a collective: the current stream waits on it
(`Work.wait()` without a timeout), so a peer that never arrives leaves kernels spinning on the
device while the host runs on or sits in its next sync. After each collective's stream wait the
comm calls `arm(stage)`: a CUDA event recorded on the current stream and the time, appended under
a lock (no thread wake-up on the hot path). A daemon thread polls the events every `poll_s`; an
entry older than `timeout_s` and not complete builds
`TimeoutError("rank r: EP stage 's' did not complete within Ts (a peer did not arrive)")`, prints
it to stderr, stores it, and aborts the process group's NCCL communicators, so the kernels waiting
for the absent peer end and a host blocked behind them returns. Every comm entry point calls
`check()` first (a host attribute read, no sync), which raises the stored error; TorchComm also
checks right after its one host read of the counts, where its main thread sits while a peer is
absent. Once aborted, the group is unusable: every later call raises.

Abort, in order of preference (what torch 2.11 / 2.13 offer, each guarded with hasattr):
`ProcessGroupNCCL.abort()` on `group._get_backend(cuda)` (aborts the communicators and stops the
group's own NCCL watchdog, leaving the group registered so destroy_process_group still runs),
`ProcessGroup.abort()`, then `distributed_c10d._abort_process_group(group)`.

Backstop: the process group's own timeout (`init_process_group(timeout=...)`), after which
ProcessGroupNCCL's watchdog ends the process. `timeout_s` should be smaller than it; the first
collective on a fresh communicator (which connects the peers on the host, before any kernel) and a
replayed CUDA graph are covered only by that backstop.

CPU: no-op. The gloo path waits with `Work.wait(timeout)` on the host and never arms; this module
touches CUDA only when `arm` is called without an event (the comms do that only for CUDA tensors).
Events recorded while a CUDA graph is being captured cannot be queried, so `arm` skips them; the
thread switches itself to thread-local capture mode (as ProcessGroupNCCL's watchdog does) so its
queries never break another thread's capture.

Dimension legend: none (host-side bookkeeping of events; no tensors).
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LIVE: weakref.WeakSet = weakref.WeakSet()  # watchdogs whose threads run: stopped at interpreter exit


class StageWatchdog:
    """Times the collectives of one rank's comm; see the module docstring.

    rank: named in the error. timeout_s: seconds a stage may take (keep it below the process group's
    timeout). group: the process group to abort (None: the default group). poll_s: seconds between
    polls. max_per_stage: entries kept per stage (memory stays flat however often arm is called).
    abort: called instead of aborting the process group (a custom teardown, or a test).
    """

    def __init__(self, rank: int, timeout_s: float, group: Any = None, poll_s: float = 0.05,
                 max_per_stage: int = 4, abort: Callable[[], object] | None = None) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        if not isinstance(max_per_stage, int) or max_per_stage < 2:
            raise ValueError(f"max_per_stage must be an int >= 2, got {max_per_stage!r}")
        self.rank, self.timeout_s, self.group = rank, float(timeout_s), group
        self.poll_s, self.max_per_stage, self._abort_fn = float(poll_s), max_per_stage, abort
        self._lock = threading.Lock()
        self._pending: dict[str, list[tuple[Any, float]]] = {}  # stage -> [(event, armed at)], oldest first
        self._error: TimeoutError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._device: int | None = None  # CUDA device of the armed events (None: injected events only)
        self.aborted_with: str | None = None  # what the abort called (for logs and tests)

    @property
    def error(self) -> TimeoutError | None:
        """The stored error, or None while every stage completes in time."""
        return self._error

    def check(self) -> None:
        """Raise the stored error (a fresh TimeoutError with the same message), if any. No sync."""
        if self._error is not None:
            raise TimeoutError(*self._error.args)

    def pending(self) -> int:
        """Entries not yet seen complete (bounded by stages x max_per_stage)."""
        with self._lock:
            return sum(len(q) for q in self._pending.values())

    def arm(self, stage: str, event: Any = None, device: Any = None) -> None:
        """Watch the work queued so far on the current CUDA stream of `device` (default: the current
        device) under `stage`, or watch `event` (anything with `query() -> bool`; pass `device` with a
        CUDA event so the thread queries it from that device). Skipped while that stream captures a
        CUDA graph (a captured event cannot be queried)."""
        if self._error is not None or self._stop.is_set():
            return
        if event is None:
            import torch

            if torch.cuda.is_current_stream_capturing():
                return
            stream = torch.cuda.current_stream(device)
            event = torch.cuda.Event()
            event.record(stream)
            device = stream.device_index
        if device is not None and self._device is None:
            self._device = device if isinstance(device, int) else _device_index(device)
        now = time.monotonic()
        with self._lock:
            q = self._pending.setdefault(stage, [])
            if len(q) < self.max_per_stage:
                q.append((event, now))
            else:
                # replace the newest: the kept oldest entries carry the earliest start times, and the
                # collectives of one group complete in order, so the newest implies the dropped one
                q[-1] = (event, now)
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=_watch, args=(weakref.ref(self), self._stop, self.poll_s),
                                        name=f"nanomoe-ep-watchdog-rank{self.rank}", daemon=True)
        _LIVE.add(self)
        weakref.finalize(self, self._stop.set)  # a collected comm stops its thread at the next poll
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (pending entries are dropped). Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 4 * self.poll_s))
        with self._lock:
            self._pending.clear()

    def poll(self, now: float | None = None) -> str | None:
        """Drop completed entries; return the first stage whose oldest entry is older than timeout_s."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for stage, q in self._pending.items():
                while q and q[0][0].query():
                    q.pop(0)
                if q and now - q[0][1] > self.timeout_s:
                    return stage
        return None

    def fire(self, stage: str) -> None:
        """Store, print and act on the error for `stage`: abort the group (or call `abort`)."""
        err = TimeoutError(f"rank {self.rank}: EP stage '{stage}' did not complete within {self.timeout_s:g}s "
                           f"(a peer did not arrive)")
        self._error = err  # before the abort: a host unblocked by it must find the error
        print(f"{err}; aborting the process group's communicators", file=sys.stderr, flush=True)
        try:
            self.aborted_with = self._abort()
        except Exception as abort_err:  # noqa: BLE001 - report and leave the group's own timeout as backstop
            self.aborted_with = f"failed: {abort_err}"
            print(f"rank {self.rank}: EP watchdog could not abort the process group: {abort_err}",
                  file=sys.stderr, flush=True)
        with self._lock:
            self._pending.clear()

    def _abort(self) -> str:
        if self._abort_fn is not None:
            self._abort_fn()
            return "abort callback"
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return "nothing (no process group)"
        from torch.distributed import distributed_c10d as c10d

        pg = self.group if self.group is not None else c10d._get_default_group()
        backend = None
        if hasattr(pg, "_get_backend"):
            try:
                backend = pg._get_backend(torch.device("cuda"))
            except RuntimeError:  # no CUDA backend in this group
                backend = None
        if backend is not None and hasattr(backend, "abort"):
            backend.abort()
            return f"{type(backend).__name__}.abort()"
        if hasattr(pg, "abort"):
            pg.abort()
            return "ProcessGroup.abort()"
        if hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group(pg)
            return "_abort_process_group()"
        return "nothing (this torch offers no abort)"

    def _prepare_thread(self) -> None:
        """In the watchdog thread: the events' device, and thread-local capture mode (libcuda)."""
        if self._device is None:
            return  # injected events only: never touch CUDA
        import torch

        torch.cuda.set_device(self._device)  # event queries must not create a context on device 0
        try:  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1: our queries never invalidate another thread's capture
            mode = ctypes.c_int(1)
            ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))
        except (OSError, AttributeError):
            pass  # no driver library by that name: the comm still never arms while capturing


def _device_index(device: Any) -> int:
    """A CUDA device (torch.device or index) as an index; no index means the current device."""
    import torch

    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def _watch(ref: weakref.ref, stop: threading.Event, poll_s: float) -> None:
    """The daemon thread: poll until stopped, the watchdog is collected, or a stage times out."""
    wd = ref()
    if wd is None:
        return
    try:
        wd._prepare_thread()
    except Exception as err:  # noqa: BLE001 - a watchdog that cannot start must not kill the process
        print(f"rank {wd.rank}: EP watchdog not started: {err}", file=sys.stderr, flush=True)
        return
    del wd
    while not stop.wait(poll_s):
        wd = ref()
        if wd is None:
            return
        try:
            stage = wd.poll()
        except Exception as err:  # noqa: BLE001 - e.g. a device assert: the main thread sees it itself
            print(f"rank {wd.rank}: EP watchdog stopped: {str(err).splitlines()[0] if str(err) else err!r}",
                  file=sys.stderr, flush=True)
            return
        if stage is not None:
            wd.fire(stage)
            return
        del wd


@atexit.register
def _stop_all() -> None:
    for wd in list(_LIVE):
        wd.close()


@dataclass
class InFlight:
    """A started collective (its Work) and the stage named in its errors."""

    work: Any
    stage: str


def host_wait(rank: int, timeout_s: float, inflight: InFlight) -> None:
    """Host wait for a CPU (gloo) collective; a peer that does not arrive in time raises TimeoutError
    naming the stage. Never used for CUDA tensors (there the stream waits, see comm/torch_dist.py, TorchComm._join)."""
    try:
        ok = inflight.work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # gloo reports timeouts and vanished peers as RuntimeError
        raise TimeoutError(
            f"rank {rank}: EP stage '{inflight.stage}' failed waiting for peers "
            f"(timeout {timeout_s:g}s): {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err
    if ok is False:
        raise TimeoutError(f"rank {rank}: EP stage '{inflight.stage}' timed out after {timeout_s:g}s")
