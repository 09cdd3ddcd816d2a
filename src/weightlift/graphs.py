"""CUDA graphs of an offloaded step: capture through the handle, and eager work that keeps replays safe.

A captured step makes, at each replay, the same copies into the same slots as the forward it recorded,
and expects the slots to hold at its start what they held when it was captured (`found`: the first
``step`` layers, as every full forward leaves them). A replay runs no Python, so it cannot wait for
eager copies or reload what an eager forward left elsewhere. So while graphs exist:

- every eager forward ends (after its last offloaded layer, or in a layer that raised) with the slots
  refilled to `found` and every copy joined into the compute stream: a replay issued next on that
  stream finds them landed;
- a slot is released to later eager copies only after all compute issued so far (a replay included),
  not after its own last reader;
- `close` (from ``remove()``) resets the graphs, so a replay after the weights are gone raises instead of
  reading freed memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import OffloadError
from .report import Timeline
from .schedule import Prefetcher
from .streams import Streams


class Graphs:
    """The graphs captured through one `OffloadHandle`, and what their replays expect."""

    def __init__(self, streams: Streams | None, model_name: str) -> None:
        self.streams = streams
        self.model_name = model_name
        self.captured: list[Any] = []
        self.found: tuple[int | None, ...] | None = None  # the slots' contents every replay starts from
        self.capturing = False

    @property
    def active(self) -> bool:
        return bool(self.captured)

    def check(self) -> None:
        """Refuse to run an offloaded layer inside a capture that `capture` does not manage."""
        if not self.capturing and self.streams is not None and self.streams.capturing():
            raise OffloadError(
                f"{self.model_name} is offloaded and a CUDA graph is being captured around it outside "
                "`handle.cuda_graph(graph)`: the copies started before the capture cannot be waited on inside it, "
                "and the copies the capture starts must be joined before it ends. Capture with "
                "`with handle.cuda_graph(graph): ...` (torch.compile mode='reduce-overhead' is not supported)"
            )

    def ready(self, prefetcher: Prefetcher) -> None:
        """After eager work: when graphs exist, the slots hold `found` and compute waits for every copy."""
        if self.found is not None and not self.capturing:
            prefetcher.refill(self.found)
            prefetcher.join()

    @contextmanager
    def capture(self, graph: Any, prefetcher: Prefetcher, timeline: Timeline, **kwargs: Any) -> Iterator[None]:
        """See `OffloadHandle.cuda_graph`."""
        assert self.streams is not None
        if self.found is not None:
            prefetcher.refill(self.found)  # every graph of this handle starts from the same slots
        prefetcher.settle()  # no event from before the capture is waited on in it
        found = prefetcher.contents()
        timeline.paused = True  # events recorded in a capture mean nothing to eager code
        try:
            with self.streams.capture(graph, **kwargs):
                self.capturing = True
                try:
                    yield
                finally:
                    self.capturing = False
                    prefetcher.join()  # a capture ends with every forked stream joined, even on an error
        finally:
            timeline.paused = False
        # nothing captured has run yet: the slots still hold what they held before
        left = prefetcher.contents()
        prefetcher.restore(found)
        if left != found:
            raise OffloadError(
                f"the captured step leaves the slots holding positions {left}, not {found} as "
                "it found them, so a replay after the first would read other layers' weights: capture one "
                "full forward through every offloaded layer, in order, and do not replay this graph"
            )
        self.captured.append(graph)
        self.found = found

    def close(self) -> None:
        """Reset every captured graph (its copies point into the pool and host memory being freed)."""
        for graph in self.captured:
            graph.reset()
        self.captured, self.found = [], None
