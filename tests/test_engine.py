"""Overlap is structural: the copy of layer k + step is issued before layer k + 1 starts."""

from __future__ import annotations

import threading

import pytest
import torch

import weightlift
from conftest import prompt, run, tiny
from weightlift import OffloadConfig
from weightlift.engine import ThreadEngine, Transfer
from weightlift.report import Timeline


@pytest.mark.parametrize("group,num,step", [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 1), (3, 2, 2)])
def test_copy_of_k_plus_step_is_issued_before_layer_k_plus_1_starts(group, num, step):
    model = tiny("llama", layers=7)
    events: list[tuple[str, int]] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)))
    config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=step)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        schedule, engine = handle.prefetcher.schedule, handle.prefetcher.engine
        position_of = {id(job): p for p, job in enumerate(handle.prefetcher.jobs)}
        start = engine.start

        def recording_start(job, slot):
            events.append(("copy", schedule.offloaded[position_of[id(job)]]))
            return start(job, slot)

        engine.start = recording_start
        events.clear()
        run(model, prompt(), new_tokens=3)
        assert handle.report().prefetch_misses == 0
    offloaded = schedule.offloaded
    n = len(offloaded)
    checked = 0
    for pos, index in enumerate(offloaded):
        target = offloaded[(pos + step) % n]
        runs = [j for j, e in enumerate(events) if e == ("run", index)]
        for j in runs:
            nxt = next((k for k in range(j + 1, len(events)) if events[k][0] == "run"), None)
            if nxt is None:
                continue
            copies = [e for e in events[j + 1 : nxt] if e[0] == "copy"]
            target_slot = schedule.slot_of[(pos + step) % n]
            if copies:
                assert copies == [("copy", target)]
            else:  # no copy needed only when the target has a slot to itself and so never left it
                assert schedule.slot_of.count(target_slot) == 1
            checked += 1
    assert checked >= n


def _copy(dst: torch.Tensor, src: torch.Tensor) -> Transfer:
    return Transfer("layer", dst, dst.numel(), pairs=[(dst, src)])


def test_thread_engine_copies_on_its_own_thread_in_order():
    engine = ThreadEngine(Timeline())
    seen = []
    src = [torch.full((1 << 16,), float(i)) for i in range(5)]
    dst = [torch.empty(1 << 16) for _ in range(5)]

    def read(i):
        def fill(buffer):
            buffer.copy_(src[i])
            seen.append((i, threading.current_thread().name))  # recorded by the thread that ran the copy

        return Transfer("layer", dst[i], dst[i].numel(), read=fill)

    tickets = [engine.start(read(i), i) for i in range(5)]
    engine.wait(tickets[-1])
    engine.synchronize()
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("weightlift-copy") for _, name in seen)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    # load_now waits for the copy in flight into the same place before writing
    late = engine.start(_copy(dst[0], torch.full((1 << 16,), 7.0)), 0)
    engine.load_now(_copy(dst[0], src[1]), 0, after=late)
    assert torch.equal(dst[0], src[1])
    engine.close()


def test_copy_errors_surface_on_wait():
    engine = ThreadEngine(Timeline())
    ticket = engine.start(_copy(torch.empty(3), torch.empty(4)), 0)
    with pytest.raises(RuntimeError):
        engine.wait(ticket)
    engine.close()


class _Sleeper(torch.nn.Module):
    """A layer whose compute takes ``seconds`` of wall time (so a copy can be seen running beside it)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return self.fc(x)


@pytest.mark.parametrize("step", [1, 2])
def test_copies_run_beside_another_layers_compute_in_wall_time(monkeypatch, step):
    """The timeline's host times on the CPU: with copies and compute of 20 ms each, step 2 has the copies of
    the second forward running while another layer computes (but for the one or two that straddle its ends);
    step 1 (one slot) none."""
    import gates

    gates.slow(monkeypatch, 0.02)
    model = torch.nn.Sequential(torch.nn.Sequential(*[_Sleeper(0.02) for _ in range(6)])).eval()
    x = torch.randn(2, 64)
    with torch.inference_mode():
        ref = model(x)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=step)) as handle:
        with torch.inference_mode():
            model(x)
            handle.timeline.events.clear()
            out = model(x)
        events = list(handle.timeline.events)
    assert torch.equal(out, ref)
    computes = [(name, a, b) for lane, name, a, b in events if lane == "compute" and not name.startswith("wait")]
    copies = [(name.removeprefix("copy "), a, b) for lane, name, a, b in events if lane == "copy"]
    assert len(computes) == 6 and 5 <= len(copies) <= 7  # a copy at either end may land before or after
    beside = [c for c in copies if any(k[0] != c[0] and c[1] < k[2] and k[1] < c[2] for k in computes)]
    if step == 2:
        assert len(beside) >= 4, (beside, computes)
    else:
        assert not beside, (beside, computes)
