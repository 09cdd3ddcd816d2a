"""Timing and trace: where time goes, per layer, with a compute lane and a copy lane."""

from __future__ import annotations

import json
import time

import pytest
import torch

import weightlift
from conftest import prompt, run, tiny
from weightlift import OffloadConfig


@pytest.mark.parametrize("source", ["host", "disk"])
def test_trace_has_one_compute_event_per_layer_per_forward(tmp_path, source):
    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)
    disk = {"source": "disk", "disk_path": str(tmp_path / "cache")} if source == "disk" else {}
    config = OffloadConfig(group_size=5, num_in_group=4, prefetch_step=2, **disk)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        handle.timeline.events.clear()  # keep only the forwards below
        handle.timeline.totals.clear()
        began = time.perf_counter()
        out = run(model, ids, new_tokens=4)
        wall = time.perf_counter() - began
        handle.trace(tmp_path / "trace.json")
        report = handle.report()
        timings = handle.timings()
    # timing is always on: outputs are the resident ones all the same
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1][:, : ids.shape[1] + 4], ref[1][:, : ids.shape[1] + 4])
    trace = json.loads((tmp_path / "trace.json").read_text())
    events = trace["traceEvents"]
    lanes = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M"}
    assert set(lanes) == {"compute", "copy", "read"}  # read: disk reads into staging slabs (accelerators)
    forwards = 1 + 4  # the logits forward, then generate's four
    offloaded = [f"model.layers.{i}" for i in (1, 2, 3, 4)]
    compute = [
        e for e in events if e["ph"] == "X" and e["tid"] == lanes["compute"] and not e["name"].startswith("wait")
    ]
    assert sorted(e["name"] for e in compute) == sorted(offloaded * forwards)
    waits = [e for e in events if e["ph"] == "X" and e["name"].startswith("wait ")]
    assert len(waits) == len(compute)
    copies = [e for e in events if e["ph"] == "X" and e["tid"] == lanes["copy"]]
    assert copies and all(e["name"].startswith("copy model.layers.") for e in copies)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
    assert [t["layer"] for t in timings] == offloaded
    assert report.compute_seconds > 0 and report.copy_seconds > 0
    # against the wall clock, read outside: what the timeline says ran inside the forwards fits in them
    assert report.compute_seconds + report.exposed_copy_seconds <= wall
    assert 0 < sum(t["compute"] for t in timings) <= wall


def test_report_prints_and_round_trips_to_a_dict():
    model = tiny("llama")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        run(model, prompt(), new_tokens=2)
        report = handle.report()
    text = str(report)
    assert "device pool" in text and "3 slots" in text and "time in offloaded layers" in text
    data = report.to_dict()
    # by hand (see test_offload.test_pool_bytes_derived_by_hand): 5 layers offloaded, 3 slots of 148480 bytes
    weights = sum(4 * p.numel() for p in tiny("llama").model.layers[0].parameters())
    assert data["saved_bytes"] == 5 * weights - 3 * 148_480 == report.saved_bytes
    assert json.loads(json.dumps(data)) == data


def test_the_timeline_history_does_not_grow_as_it_fills():
    """The timeline keeps its recent intervals in memory allocated once (`report.Intervals`): it held them as a
    deque of tuples, about 190 bytes more per interval until 200,000 were kept (2.7 KiB a decode step of this
    model; found by `benchmarks/soak.py`). Python allocations made in report.py, traced over 40 forwards after
    warm-up, do not grow (the deque: about 100 KiB more; what is left is CPython's free lists of tuples and
    floats); the history is the last ``capacity`` intervals, oldest first."""
    import tracemalloc

    from weightlift import report

    model = tiny("llama")
    ids = prompt()
    only_report = [tracemalloc.Filter(True, report.__file__)]
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        tracemalloc.start()
        try:
            with torch.inference_mode():
                for _ in range(3):
                    model(ids)
                before = tracemalloc.take_snapshot().filter_traces(only_report)
                for _ in range(40):
                    model(ids)
                after = tracemalloc.take_snapshot().filter_traces(only_report)
        finally:
            tracemalloc.stop()
        assert len(handle.timeline.events) > 40 * 5 * 2  # every layer's compute and wait, at least
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown < 4096, f"report.py holds {grown} bytes more after 40 forwards"
    from weightlift.report import Intervals

    history = Intervals(3)
    for i in range(5):
        history.append(("compute", f"layer {i % 2}", float(i), i + 0.5))
    assert list(history) == [("compute", f"layer {i % 2}", float(i), i + 0.5) for i in (2, 3, 4)]
    history.clear()
    assert list(history) == [] and len(history) == 0
