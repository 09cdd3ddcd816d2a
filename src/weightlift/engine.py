"""Copy engines: move one layer's bytes into its device slot (a `Transfer`), overlapped with compute.

Three engines, one interface (`Engine`): `ThreadEngine` for CPU targets (a background thread),
`StreamEngine` for accelerators (a side stream fed from pinned host memory, joined by events) and
`StagedEngine` for disk to accelerator (a reader thread fills pinned staging slabs, copied out on a side
stream). The accelerator engines issue every stream and event operation through a `streams.Streams`,
so the same code runs against a simulated device in the tests.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .pool import pinned_empty
from .report import Timeline
from .streams import Streams


@dataclass
class Transfer:
    """One layer's move into its slot ``dst``: ``(dst, src)`` byte pairs from host memory, or a disk read
    ``read(buffer)`` that fills ``nbytes`` of a buffer in the slot layout. ``ranges`` (byte ranges of the
    slot layout) limits a read to part of the layer (its dense part, or some of its experts)."""

    name: str  # the layer's name, for the timeline
    dst: torch.Tensor
    nbytes: int
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()
    read: Callable[[torch.Tensor], None] | None = None
    ranges: Sequence[tuple[int, int]] | None = None  # a read of these ranges only (None: the first nbytes)


class Engine(Protocol):
    """What the prefetcher asks of a copy engine. A slot is never overwritten while a layer still reads
    it: a transfer into a slot waits for the compute that `release` marked as that slot's last reader."""

    def start(self, job: Transfer, slot: int) -> Any:
        """Begin ``job`` into slot ``slot`` asynchronously; returns a ticket."""

    def wait(self, ticket: Any) -> None:
        """Compute issued from now on sees the bytes of the transfer ``ticket``."""

    def load_now(self, job: Transfer, slot: int, after: Any) -> None:
        """Transfer in compute order, after ``after`` (a ticket still in flight into that slot, or None)."""

    def copy_now(self, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Device-to-device copies ``(dst, src)`` in compute order: after the compute and loads issued so far,
        before any issued later (the device expert cache's copies into and out of slots)."""

    def release(self, slot: int | None) -> None:
        """The compute issued so far is the last to read ``slot`` (None: every slot) until it is loaded again."""

    def synchronize(self) -> None:
        """Every transfer started so far has finished."""

    def close(self) -> None: ...


class ThreadEngine:
    """CPU targets: transfers run on one background thread (``copy_`` and file reads release the GIL),
    in FIFO order. On the CPU, compute has finished when a forward hook runs, so a transfer started from
    a hook never races a reader of its slot, and `release` has nothing to record."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightlift-copy")
        self._last: cf.Future | None = None

    def _run(self, job: Transfer) -> None:
        def move() -> None:
            if job.read is not None:
                job.read(job.dst)
            for dst, src in job.pairs:
                dst.copy_(src)

        self.timeline.timed("copy", "copy", job.name, move)

    def start(self, job: Transfer, slot: int) -> cf.Future:
        self._last = self._pool.submit(self._run, job)
        return self._last

    def wait(self, ticket: cf.Future) -> None:
        ticket.result()

    def load_now(self, job: Transfer, slot: int, after: cf.Future | None) -> None:
        if after is not None:
            after.exception()  # waits; a failure of that copy is overwritten now, so it is no error
        self._run(job)

    def copy_now(self, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if pairs:
            self._run(Transfer(name, pairs[0][0], sum(d.numel() for d, _ in pairs), pairs=pairs))

    def release(self, slot: int | None) -> None:
        pass

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.exception()  # waits; errors were already raised to whoever waited on them

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._last = None


class _Accelerated:
    """What both accelerator engines share: a copy stream and, per slot, the event after its last reader."""

    def __init__(self, streams: Streams, n_slots: int, timeline: Timeline) -> None:
        self.streams = streams
        self.timeline = timeline
        self._copy = streams.new_stream()
        self._released: list[Any] = [None] * n_slots

    def release(self, slot: int | None) -> None:
        event = self.streams.new_event()
        self.streams.record(event, self.streams.current_stream())
        if slot is None:
            self._released = [event] * len(self._released)
        else:
            self._released[slot] = event

    def wait(self, ticket: Any) -> None:
        self.streams.wait(self.streams.current_stream(), ticket)

    def copy_now(self, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if pairs:
            self._copy_on(self.streams.current_stream(), name, pairs)

    def _copy_on(self, stream: Any, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Issue ``pairs`` on ``stream``, timed there; the event that completes with them."""
        begin = self.timeline.mark(stream)
        for dst, src in pairs:
            self.streams.copy(dst, src, stream)
        done = self.timeline.mark(stream)
        if done is None:  # not timing (inside a capture): a plain event
            done = self.streams.new_event()
            self.streams.record(done, stream)
        self.timeline.span("copy", "copy", name, begin, done)
        return done

    def synchronize(self) -> None:
        self.streams.sync_stream(self._copy)


class StreamEngine(_Accelerated):
    """Accelerator targets: copies from pinned host memory on a side stream; compute waits on their events."""

    def start(self, job: Transfer, slot: int) -> Any:
        released = self._released[slot]
        if released is not None:
            self.streams.wait(self._copy, released)  # the slot's last reader has run
        return self._copy_on(self._copy, job.name, job.pairs)

    def load_now(self, job: Transfer, slot: int, after: Any) -> None:
        if after is not None:
            self.wait(after)
        self._copy_on(self.streams.current_stream(), job.name, job.pairs)

    def close(self) -> None:
        self.synchronize()


class StagingRing:
    """A fixed ring of host staging slabs (pinned for accelerators). A slab has one user at a time, and
    is handed out again only once the device copy out of it has finished."""

    def __init__(self, count: int, nbytes: int, streams: Streams) -> None:
        allocated = [pinned_empty(nbytes, streams.pin) for _ in range(count)]
        self.streams = streams
        self.slabs = [slab for slab, _ in allocated]
        self.nbytes = sum(taken for _, taken in allocated)  # host bytes really taken (pinned rounding included)
        self._busy: list[Any] = [None] * count  # the copy out of each slab
        self._held = [False] * count
        self._next = 0
        self._free = threading.Condition()

    def acquire(self) -> int:
        with self._free:
            index, self._next = self._next, (self._next + 1) % len(self.slabs)
            while self._held[index]:  # another thread reads into it or copies out of it
                self._free.wait()
            self._held[index] = True
            busy = self._busy[index]
        if busy is not None:
            self.streams.sync_event(busy)  # the copy out of this slab is done
        return index

    def release(self, index: int, done: Any) -> None:
        with self._free:
            self._busy[index], self._held[index] = done, False
            self._free.notify_all()


class StagedEngine(_Accelerated):
    """Disk to accelerator: a reader thread fills staging slabs ahead (file reads release the GIL), and the
    copy to the slot is issued from that thread on a side stream, after the slot's last reader."""

    def __init__(self, streams: Streams, n_slots: int, timeline: Timeline, ring: StagingRing) -> None:
        super().__init__(streams, n_slots, timeline)
        self.ring = ring
        self._reader = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightlift-read")
        self._last: cf.Future | None = None

    def _transfer(self, job: Transfer, stream: Any, ready: Any) -> Any:
        index = self.ring.acquire()
        done = None
        try:
            buffer = self.ring.slabs[index]
            self.timeline.timed("read", "read", job.name, lambda: job.read(buffer))
            if ready is not None:
                self.streams.wait(stream, ready)  # the slot's last reader has run
            spans = job.ranges if job.ranges is not None else [(0, job.nbytes)]
            done = self._copy_on(stream, job.name, [(job.dst[a:b], buffer[a:b]) for a, b in spans])
        finally:
            self.ring.release(index, done)
        return done

    def start(self, job: Transfer, slot: int) -> cf.Future:
        self._last = self._reader.submit(self._transfer, job, self._copy, self._released[slot])
        return self._last

    def wait(self, ticket: cf.Future) -> None:
        super().wait(ticket.result())

    def load_now(self, job: Transfer, slot: int, after: cf.Future | None) -> None:
        if after is not None and after.exception() is None:
            self.wait(after)
        elif after is not None:  # its read failed before it issued a copy: none of it to wait for, no error (the
            super().synchronize()  # slot is overwritten now), but an earlier copy into the slot may be in flight
        self._transfer(job, self.streams.current_stream(), None)  # in compute order: nothing to wait for

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.exception()
        super().synchronize()

    def close(self) -> None:
        self.synchronize()
        self._reader.shutdown(wait=True)
        self._last = None
