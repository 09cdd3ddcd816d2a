"""The stream and event operations the accelerator engines use, as one replaceable seam.

`Streams` is the whole of what the copy engines, the device clock and graph capture ask of a device;
`TorchStreams` is the real one, through the device-generic ``torch.Stream`` / ``torch.Event`` /
``torch.accelerator`` API (CUDA, ROCm, XPU ...). The test suite drives the same engine code with a
simulated implementation (streams whose work runs later, on worker threads) to check its ordering on
a machine without an accelerator. `streams_for` picks the real one for a device, or None for the CPU
(whose engine is a plain thread).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class Streams(Protocol):
    """Stream and event operations on one device. Streams and events are opaque to the caller."""

    pin: bool  # host buffers that feed copies are page-locked
    can_capture: bool  # graph capture (CUDA graphs) is available

    def new_stream(self) -> Any: ...

    def current_stream(self) -> Any:
        """The calling thread's current stream on the device: where compute is issued."""

    def new_event(self, timing: bool = False) -> Any: ...

    def record(self, event: Any, stream: Any) -> None:
        """``event`` completes when the work issued to ``stream`` so far has run."""

    def wait(self, stream: Any, event: Any) -> None:
        """Work issued to ``stream`` from now on waits for ``event``'s latest record (the host does not wait)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        """Issue ``dst.copy_(src)`` on ``stream``, asynchronously; the caller's current device and stream
        are left as they were."""

    def sync_event(self, event: Any) -> None:
        """The host waits for ``event``."""

    def sync_stream(self, stream: Any) -> None:
        """The host waits for everything issued to ``stream``."""

    def done(self, event: Any) -> bool:
        """Whether ``event`` has completed (never blocks)."""

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds of device time between two completed timing events."""

    def capture(self, graph: Any, **kwargs: Any) -> AbstractContextManager:
        """Capture the work issued inside the block into ``graph`` (``torch.cuda.graph``)."""

    def capturing(self) -> bool:
        """Whether the current stream is being captured."""


class TorchStreams:
    """`Streams` for a real accelerator ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pin = True
        self.can_capture = device.type == "cuda"

    def new_stream(self) -> torch.Stream:
        return torch.Stream(device=self.device)

    def current_stream(self) -> torch.Stream:
        return torch.accelerator.current_stream(self.device)

    def new_event(self, timing: bool = False) -> torch.Event:
        return torch.Event(device=self.device, enable_timing=timing)

    def record(self, event: torch.Event, stream: torch.Stream) -> None:
        event.record(stream)

    def wait(self, stream: torch.Stream, event: torch.Event) -> None:
        stream.wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.Stream) -> None:
        # `set_stream` also makes the stream's device current: put back both the caller's device and
        # the caller's current stream on this device
        index = torch.accelerator.current_device_index()
        previous = torch.accelerator.current_stream(self.device)
        torch.accelerator.set_stream(stream)
        try:
            dst.copy_(src, non_blocking=True)
        finally:
            torch.accelerator.set_stream(previous)
            torch.accelerator.set_device_index(index)

    def sync_event(self, event: torch.Event) -> None:
        event.synchronize()

    def sync_stream(self, stream: torch.Stream) -> None:
        stream.synchronize()

    def done(self, event: torch.Event) -> bool:
        return event.query()

    def elapsed(self, start: torch.Event, end: torch.Event) -> float:
        return start.elapsed_time(end) / 1e3

    def capture(self, graph: Any, **kwargs: Any) -> AbstractContextManager:
        return torch.cuda.graph(graph, **kwargs)

    def capturing(self) -> bool:
        return self.can_capture and torch.cuda.is_current_stream_capturing()


def streams_for(device: torch.device) -> Streams | None:
    """The stream operations for ``device``: None for the CPU (a thread copies there)."""
    return None if device.type == "cpu" else TorchStreams(device)
