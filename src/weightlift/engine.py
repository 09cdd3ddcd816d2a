"""Copy engines: run a layer's transfer (host or disk to its device slot), overlapped with compute.

A transfer is a zero-argument callable (`copy_job` for host memory, a disk read for the disk tier).
Both engines share one interface:

- ``start(job) -> ticket``: begin the transfer, ordered after all compute issued so far (so a slot is
  never overwritten while a layer still reads it);
- ``wait(ticket)``: compute issued from now on sees the transferred bytes;
- ``load_now(job, after)``: transfer in compute order, after the in-flight transfer ``after`` (or None);
- ``synchronize()``: every transfer started so far has finished; ``close()``.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .pool import pinned_empty

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]
Job = Callable[[], None]


def _copy_all(pairs: Pairs, non_blocking: bool) -> None:
    for dst, src in pairs:
        dst.copy_(src, non_blocking=non_blocking)


def copy_job(pairs: Pairs, device: torch.device) -> Job:
    """A transfer of ``(dst, src)`` byte pairs; asynchronous from pinned memory on accelerators."""
    return partial(_copy_all, pairs, device.type != "cpu")


class ThreadEngine:
    """CPU targets: transfers run on one background thread (``copy_`` and file reads release the GIL),
    in FIFO order. On the CPU, compute has finished when a forward hook runs, so a transfer started
    from a hook never races a reader of its slot."""

    def __init__(self) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightlift-copy")
        self._last: cf.Future | None = None

    def start(self, job: Job) -> cf.Future:
        self._last = self._pool.submit(job)
        return self._last

    def wait(self, ticket: cf.Future) -> None:
        ticket.result()

    def load_now(self, job: Job, after: cf.Future | None) -> None:
        if after is not None:
            after.result()
        job()

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.exception()  # waits; errors were already raised to whoever waited on them

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StreamEngine:
    """Accelerator targets: copies on a side stream from pinned host memory, joined by events.

    Uses the device-generic ``torch.Stream``/``torch.Event`` API, so it serves CUDA, ROCm, XPU and any
    backend exposed through ``torch.accelerator``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.Stream(device=device)

    def _compute_stream(self) -> torch.Stream:
        return torch.accelerator.current_stream(self.device)

    def start(self, job: Job) -> torch.Event:
        compute = self._compute_stream()
        ready = torch.Event(device=self.device)
        ready.record(compute)
        self._stream.wait_event(ready)  # the slot's last reader has run
        torch.accelerator.set_stream(self._stream)
        try:
            job()
        finally:
            torch.accelerator.set_stream(compute)
        done = torch.Event(device=self.device)
        done.record(self._stream)
        return done

    def wait(self, ticket: torch.Event) -> None:
        self._compute_stream().wait_event(ticket)

    def load_now(self, job: Job, after: torch.Event | None) -> None:
        if after is not None:
            self.wait(after)
        job()

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self.synchronize()


@dataclass
class StagedJob:
    """A disk-to-device transfer: ``read(buffer)`` fills a host staging buffer in the slot layout, which is
    then copied to ``dst`` (the slot), ``nbytes`` of it."""

    read: Callable[[torch.Tensor], None]
    dst: torch.Tensor
    nbytes: int


class StagingRing:
    """A fixed ring of host staging slabs (pinned for accelerators); a slab is reused only once the copy
    out of it has finished."""

    def __init__(self, count: int, nbytes: int, pin: bool) -> None:
        allocated = [pinned_empty(nbytes, pin) for _ in range(count)]
        self.slabs = [slab for slab, _ in allocated]
        self.nbytes = sum(taken for _, taken in allocated)  # host bytes really taken (pinned rounding included)
        self._busy: list[torch.Event | None] = [None] * count
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            index, self._next = self._next, (self._next + 1) % len(self.slabs)
        if self._busy[index] is not None:
            self._busy[index].synchronize()  # the copy out of this slab is done
        return index

    def release(self, index: int, done: torch.Event | None) -> None:
        self._busy[index] = done


class StagedEngine:
    """Disk to device: a reader thread fills staging slabs ahead (file reads release the GIL), and the
    copy to the slot is issued from that thread on a side stream, after the compute that last read the
    slot. On a CPU target the copy is a plain ``copy_`` in the reader thread."""

    def __init__(self, device: torch.device, ring: StagingRing) -> None:
        self.device, self.ring = device, ring
        self._accel = device.type != "cpu"
        self._stream = torch.Stream(device=device) if self._accel else None
        self._reader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightlift-read")
        self._last: cf.Future | None = None

    def _event(self, stream: torch.Stream | None) -> torch.Event | None:
        if not self._accel:
            return None
        event = torch.Event(device=self.device)
        event.record(stream)
        return event

    def _transfer(self, job: StagedJob, stream: torch.Stream | None, ready: torch.Event | None):
        slab = self.ring.acquire()
        buffer = self.ring.slabs[slab]
        job.read(buffer)
        if self._accel:
            torch.accelerator.set_stream(stream)  # this thread's current stream
            if ready is not None:
                stream.wait_event(ready)  # the slot's last reader has run
        job.dst[: job.nbytes].copy_(buffer[: job.nbytes], non_blocking=self._accel)
        done = self._event(stream)
        self.ring.release(slab, done)
        return done

    def start(self, job: StagedJob) -> cf.Future:
        ready = self._event(torch.accelerator.current_stream(self.device)) if self._accel else None
        self._last = self._reader.submit(self._transfer, job, self._stream, ready)
        return self._last

    def wait(self, ticket: cf.Future) -> None:
        done = ticket.result()
        if done is not None:
            torch.accelerator.current_stream(self.device).wait_event(done)

    def load_now(self, job: StagedJob, after: cf.Future | None) -> None:
        if after is not None:
            self.wait(after)
        compute = torch.accelerator.current_stream(self.device) if self._accel else None
        self._transfer(job, compute, None)

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.exception()
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        self.synchronize()
        self._reader.shutdown(wait=True)


def make_engine(device: torch.device) -> ThreadEngine | StreamEngine:
    return ThreadEngine() if device.type == "cpu" else StreamEngine(device)
