"""The real stream operations, where they can be checked without an accelerator."""

from __future__ import annotations

import torch

from weightlift.streams import TorchStreams, streams_for


def test_the_cpu_has_no_stream_operations():
    assert streams_for(torch.device("cpu")) is None


def test_a_copy_on_another_devices_stream_leaves_the_current_device_and_stream(monkeypatch):
    """`torch.accelerator.set_stream` also switches the current device: the copy must put both back
    (offloading to cuda:1 must not move the caller to cuda:1). Stands in for torch.accelerator."""
    state = {"device": 0, "stream": {0: (0, "default"), 1: (1, "default")}}
    seen = []

    def set_stream(stream):
        device, _ = stream
        state["device"] = device
        state["stream"][device] = stream

    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: state["device"])
    monkeypatch.setattr(torch.accelerator, "set_device_index", lambda i: state.__setitem__("device", i))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda d: state["stream"][d.index])
    monkeypatch.setattr(torch.accelerator, "set_stream", set_stream)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda dst, src, non_blocking=False: seen.append(
        (state["device"], state["stream"][1], non_blocking)))
    streams = TorchStreams(torch.device("cuda", 1))
    streams.copy(torch.empty(1), torch.empty(1), (1, "side"))
    assert seen == [(1, (1, "side"), True)]  # issued on the side stream of cuda:1
    assert state["device"] == 0 and state["stream"] == {0: (0, "default"), 1: (1, "default")}
