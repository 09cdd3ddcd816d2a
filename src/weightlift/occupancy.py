"""One thread at a time inside a handle's offloaded layers.

The slots hold the layers of one forward at a time: a second thread's forward would load its layers
into slots the first one's layers are still computing on. So a handle refuses a thread that enters an
offloaded layer while another thread is inside one (its layer hooks call `enter` before a layer runs
and `leave` after it ran, or raised). Offloaded layers nested in one another within one thread are
fine: the count goes up and down. Two models offloaded with two handles run from two threads freely.
"""

from __future__ import annotations

import threading

from .errors import OffloadError


class Occupancy:
    """Which thread is inside the offloaded layers of one handle, and how deep."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._depth = 0

    def enter(self, layer: str) -> None:
        """The current thread is about to run offloaded ``layer``; `OffloadError` if another thread is inside."""
        me = threading.get_ident()
        with self._lock:
            if self._thread not in (None, me):
                raise OffloadError(
                    f"the offloaded {self.model} is used from two threads at once (`{layer}` entered while another "
                    "thread's forward is inside the offloaded layers): its slots hold one forward's layers at a "
                    "time. Offload one copy of the model per thread (one handle per thread), or serialise its calls "
                    "with a lock"
                )
            self._thread, self._depth = me, self._depth + 1

    def leave(self) -> None:
        """The current thread's innermost offloaded layer has run (or raised)."""
        with self._lock:
            self._depth -= 1
            if self._depth <= 0:
                self._thread, self._depth = None, 0
