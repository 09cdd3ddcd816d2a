"""Overlap is structural: the copy of layer k + step is issued before layer k + 1 starts."""

from __future__ import annotations

import threading

import pytest
import torch

import weightlift
from conftest import prompt, run, tiny
from weightlift import OffloadConfig
from weightlift.engine import ThreadEngine, copy_job, make_engine

CPU = torch.device("cpu")


@pytest.mark.parametrize("group,num,step", [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 1), (3, 2, 2)])
def test_copy_of_k_plus_step_is_issued_before_layer_k_plus_1_starts(group, num, step):
    model = tiny("llama", layers=7)
    events: list[tuple[str, int]] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", i)))
    config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=step)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        schedule = handle.prefetcher.schedule
        start = handle.prefetcher.start

        def recording_start(position, slot):
            events.append(("copy", schedule.offloaded[position]))
            return start(position, slot)

        handle.prefetcher.start = recording_start
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


def test_thread_engine_copies_on_its_own_thread_in_order():
    engine = ThreadEngine()
    seen = []
    src = [torch.full((1 << 16,), float(i)) for i in range(5)]
    dst = [torch.empty(1 << 16) for _ in range(5)]

    def job(i):
        copy_job([(dst[i], src[i])], CPU)()
        seen.append((i, threading.current_thread().name))  # recorded by the thread that ran the copy

    tickets = [engine.start(lambda i=i: job(i)) for i in range(5)]
    engine.wait(tickets[-1])
    engine.synchronize()
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("weightlift-copy") for _, name in seen)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    # load_now waits for the copy in flight into the same place before writing
    late = engine.start(copy_job([(dst[0], torch.full((1 << 16,), 7.0))], CPU))
    engine.load_now(copy_job([(dst[0], src[1])], CPU), after=late)
    assert torch.equal(dst[0], src[1])
    engine.close()


def test_copy_errors_surface_on_wait():
    engine = ThreadEngine()
    ticket = engine.start(copy_job([(torch.empty(3), torch.empty(4))], CPU))
    with pytest.raises(RuntimeError):
        engine.wait(ticket)
    engine.close()


def test_make_engine_picks_by_device():
    assert isinstance(make_engine(torch.device("cpu")), ThreadEngine)
