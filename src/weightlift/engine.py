"""Copy engines: move a layer's bytes from host to its device slot, overlapped with compute.

Both engines take a list of ``(dst, src)`` byte-tensor pairs and share one interface:

- ``start(pairs) -> ticket``: begin the copy, ordered after all compute issued so far (so a slot is
  never overwritten while a layer still reads it);
- ``wait(ticket)``: compute issued from now on sees the copied bytes;
- ``load_now(pairs, after)``: copy in compute order, after the in-flight copy ``after`` (or None);
- ``synchronize()``: every copy started so far has finished; ``close()``.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence

import torch

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _copy_all(pairs: Pairs, non_blocking: bool = False) -> None:
    for dst, src in pairs:
        dst.copy_(src, non_blocking=non_blocking)


class ThreadEngine:
    """CPU targets: copies run on one background thread (``copy_`` releases the GIL), in FIFO order.

    On the CPU, compute has finished when a forward hook runs, so a copy started from a hook never
    races a reader of its slot.
    """

    def __init__(self) -> None:
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightlift-copy")
        self._last: cf.Future | None = None

    def start(self, pairs: Pairs) -> cf.Future:
        self._last = self._pool.submit(_copy_all, pairs)
        return self._last

    def wait(self, ticket: cf.Future) -> None:
        ticket.result()

    def load_now(self, pairs: Pairs, after: cf.Future | None) -> None:
        if after is not None:
            after.result()
        _copy_all(pairs)

    def synchronize(self) -> None:
        if self._last is not None:
            self._last.result()

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

    def start(self, pairs: Pairs) -> torch.Event:
        compute = self._compute_stream()
        ready = torch.Event(device=self.device)
        ready.record(compute)
        self._stream.wait_event(ready)  # the slot's last reader has run
        previous = torch.accelerator.current_stream(self.device)
        torch.accelerator.set_stream(self._stream)
        try:
            _copy_all(pairs, non_blocking=True)
        finally:
            torch.accelerator.set_stream(previous)
        done = torch.Event(device=self.device)
        done.record(self._stream)
        return done

    def wait(self, ticket: torch.Event) -> None:
        self._compute_stream().wait_event(ticket)

    def load_now(self, pairs: Pairs, after: torch.Event | None) -> None:
        if after is not None:
            self.wait(after)
        _copy_all(pairs, non_blocking=True)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def close(self) -> None:
        self.synchronize()


def make_engine(device: torch.device) -> ThreadEngine | StreamEngine:
    return ThreadEngine() if device.type == "cpu" else StreamEngine(device)
