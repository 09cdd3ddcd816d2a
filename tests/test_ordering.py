"""The ordering checker: the accelerator engines' own code, run on the CPU against a simulated device
(`simdevice`), whose streams run their work later. Every slot read must find its layer's weights, landed,
and no slot or staging slab may be overwritten while it is read. Each test also checks the output bit for
bit, and the last tests show the checker failing when one wait is taken out."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import simdevice
import weightlift
from conftest import FAMILIES, assert_same, prompt, run, snapshot, tiny
from test_offload import CONFIGS, _stack
from weightlift import OffloadConfig
from weightlift.engine import StagingRing, StreamEngine
from weightlift.graphs import Graphs


@pytest.fixture
def sim(monkeypatch):
    device = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005)
    yield device
    device.close()


def _offload(sim, model, **config) -> weightlift.OffloadHandle:
    handle = weightlift.offload(model, device="cpu", config=OffloadConfig(**config))
    sim.watch(handle)
    return handle


def _slot_bytes(model) -> int:
    with weightlift.offload(model, device="cpu") as handle:
        return handle.report().slot_bytes


def _forwards(model, x, n: int = 1) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(x) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_families_and_configs_are_bitwise_and_hazard_free(sim, family, cfg):
    model = tiny(family)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids)
    group, num, step = CONFIGS[cfg]
    with _offload(sim, model, group_size=group, num_in_group=num, prefetch_step=step) as handle:
        logits, tokens = run(model, ids)
        report = handle.report()
    sim.assert_clean()
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert sim.counts["reads"] == report.layers_offloaded * 9  # every layer read was checked
    assert report.prefetch_misses == (report.layers_offloaded * 9 if step == 0 else 0)


@pytest.mark.parametrize("order", [[5, 4, 3, 2, 1, 0], [0, 0, 1, 3, 2, 5, 5, 4]], ids=["reversed", "twice"])
@pytest.mark.parametrize("step", [1, 2, 4])
def test_misses_and_the_wrap_into_the_next_forward(sim, order, step):
    model = _stack()
    x = torch.randn(4, 32)
    model.order = order
    ref = _forwards(model, x, 3)
    with _offload(sim, model, prefetch_step=step) as handle:
        out = _forwards(model, x, 3)
        report = handle.report()
    sim.assert_clean()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    if report.slots < report.layers_offloaded:  # with a slot per layer nothing is ever evicted
        assert report.prefetch_misses >= 1


def test_an_exception_mid_forward_releases_the_slot_and_stays_correct(sim):
    model = _stack()
    x = torch.randn(4, 32)
    (ref,) = _forwards(model, x)

    def boom(module, args, output):
        raise RuntimeError("boom")

    with _offload(sim, model, prefetch_step=2) as handle:
        hook = model.layers[3].register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            _forwards(model, x)
        hook.remove()
        out = _forwards(model, x, 2)
        report = handle.report()
    sim.assert_clean()
    assert all(torch.equal(o, ref) for o in out)
    assert report.prefetch_misses >= 1


def test_state_dict_loads_under_the_checker(sim):
    model = tiny("llama")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompt()
    ref, _ = run(model, ids)
    with _offload(sim, model, prefetch_step=2):
        run(model, ids)
        got = model.state_dict()
        logits, _ = run(model, ids)
    sim.assert_clean()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("source", ["disk", "checkpoint"])
@pytest.mark.parametrize("slabs", [1, 2])
def test_staged_disk_path_with_one_and_two_slabs(monkeypatch, tmp_path, source, slabs):
    sim = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005, read_delay=0.005)
    model = _stack()
    x = torch.randn(4, 32)
    # layer 3 runs while the reader still fills a slab with layer 2: its miss loads on the compute thread
    model.order = [0, 3, 1, 2, 3, 4, 5, 5, 2]
    ref = _forwards(model, x, 3)
    if source == "checkpoint":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    slot = _slot_bytes(model)
    config = dict(source=source, disk_path=str(tmp_path), prefetch_step=2, host_budget=slabs * slot)
    with _offload(sim, model, **config) as handle:
        assert len(handle.ring.slabs) == slabs and handle.report().slot_bytes == slot
        out = _forwards(model, x, 3)
        report = handle.report()
    sim.assert_clean()
    sim.close()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert report.prefetch_misses >= 1


def test_failed_reads_on_the_staged_path_leave_no_slot_trusted_and_no_hazard(monkeypatch, tmp_path):
    """One read fails on the reader thread, after 0, 2, 5, 9 and 13 good ones of a forward run out of
    order: a failure that a layer waits on is an `OffloadError`; one whose slot another layer loads first
    (on the compute thread, after the failed copy) is no error and is overwritten. The forwards after each
    are bitwise right, with no slot read before its copy landed."""
    import errno
    import os

    from weightlift.engine import StagedEngine

    sim = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005, read_delay=0.005)
    model = _stack()
    x = torch.randn(4, 32)
    model.order = [0, 3, 1, 2, 3, 4, 5, 5, 2]
    (ref,) = _forwards(model, x)
    slot = _slot_bytes(model)
    real, armed, raised, overwritten = os.preadv, {"skip": -1, "struck": False}, 0, []

    def preadv(fd, buffers, offset):
        armed["skip"] -= 1
        if armed["skip"] == -1:
            armed["struck"] = True
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    def load_now(engine, job, index, after, load=StagedEngine.load_now):
        overwritten.append(after is not None and after.exception() is not None)
        return load(engine, job, index, after)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(StagedEngine, "load_now", load_now)
    config = dict(source="disk", disk_path=str(tmp_path), prefetch_step=2, host_budget=2 * slot)
    with _offload(sim, model, **config) as handle:
        for skip in (0, 2, 5, 9, 11, 13):
            handle.engine.synchronize()  # no read of the last forward is left to count
            armed["skip"], armed["struck"] = skip, False
            for _ in range(3):  # a read ahead into the next forward may be the one that fails: it raises there
                try:
                    _forwards(model, x)
                    break
                except weightlift.OffloadError as err:
                    assert "could not be loaded" in str(err) and "Input/output error" in str(err)
                    raised += 1
            handle.engine.synchronize()
            assert armed["struck"]
            assert all(torch.equal(out, ref) for out in _forwards(model, x, 2))
    sim.assert_clean()
    sim.close()
    assert raised >= 1 and any(overwritten)


def test_remove_while_copies_are_in_flight_frees_everything(sim):
    """The copy stream is held, so the next forward's copies are still queued when `remove()` runs."""
    model = _stack()
    x = torch.randn(4, 32)
    snap = snapshot(model)
    handle = _offload(sim, model, prefetch_step=2)
    _forwards(model, x)
    copy = sim.streams[-1]
    # the last layer has its weights; the copies its hooks and the one before start (the next forward's
    # first layers) queue behind the gate
    model.layers[-1].register_forward_pre_hook(lambda *_: copy.gate.clear())
    _forwards(model, x)
    assert not copy.gate.is_set()
    freed = [StorageWeakRef(t.untyped_storage()) for t in (*handle.pool.slots, *handle.arena.blocks)]
    threading.Timer(0.05, copy.gate.set).start()
    gc.disable()
    try:
        handle.remove()
        del handle
        assert all(r.expired() for r in freed)  # no cycle holds them: gone without a collection
    finally:
        gc.enable()
    sim.assert_clean()
    assert_same(model, snap)


def test_remove_frees_the_staging_ring_and_pool_of_the_disk_tier(sim, tmp_path):
    model = _stack()
    x = torch.randn(4, 32)
    (ref,) = _forwards(model, x)
    handle = _offload(sim, model, source="disk", disk_path=str(tmp_path), prefetch_step=2)
    (out,) = _forwards(model, x)
    freed = [StorageWeakRef(t.untyped_storage()) for t in (*handle.pool.slots, *handle.ring.slabs)]
    gc.disable()
    try:
        handle.remove()
        del handle
        assert all(r.expired() for r in freed)
    finally:
        gc.enable()
    sim.assert_clean()
    assert torch.equal(out, ref)


def test_a_restored_model_has_one_ordinary_storage_per_tensor(sim, tmp_path):
    """Masters on the accelerator path live in host arenas; `remove()` gives each tensor its own memory
    again, so nothing stays page-locked and the model saves as any model does."""
    from safetensors.torch import save_file

    model = tiny("llama")
    snap = snapshot(model)
    with _offload(sim, model, prefetch_step=2) as handle:
        run(model, prompt(), new_tokens=2)
        arena = {b.untyped_storage().data_ptr() for b in handle.arena.blocks}
    sim.assert_clean()
    assert_same(model, snap)
    tensors = [*model.parameters(), *model.buffers()]
    storages = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(storages)) == len(storages) and not set(storages) & arena
    assert not any(t.is_pinned() for t in tensors)
    save_file(model.state_dict(), str(tmp_path / "restored.safetensors"))  # refuses tensors sharing memory


# ------------------------------------------------------------------ graphs (simulated capture and replay)


def _captured(sim, model, x):
    handle = _offload(sim, model, prefetch_step=2)
    _forwards(model, x)
    graph = simdevice.SimGraph()
    with torch.inference_mode(), handle.cuda_graph(graph):
        model(x)
    return handle, graph


def test_replay_after_an_eager_forward_waits_for_its_copies(sim):
    model = _stack()
    x = torch.randn(4, 32)
    handle, graph = _captured(sim, model, x)
    for _ in range(3):
        _forwards(model, x)
        sim.replay(graph)  # at once: the eager forward's copies of the first layers may still be in flight
    sim.assert_clean()
    assert sim.counts["replays"] == 3
    handle.remove()


def test_replay_after_an_aborted_forward_finds_its_slots_refilled(sim):
    model = _stack()
    x = torch.randn(4, 32)
    (ref,) = _forwards(model, x)
    handle, graph = _captured(sim, model, x)

    def boom(module, args):  # inside layer 2, after weightlift made its weights ready
        raise RuntimeError("boom")

    hook = model.layers[2].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError):
        _forwards(model, x)  # leaves the slots of layers 0-1 holding layers 2-3
    hook.remove()
    sim.replay(graph)
    (out,) = _forwards(model, x)
    sim.replay(graph)
    sim.assert_clean()
    assert torch.equal(out, ref)
    handle.remove()


def test_replay_after_remove_raises():
    graph = simdevice.SimGraph()
    graphs = Graphs(None, "Stack")
    graph.valid = True
    graphs.captured.append(graph)
    graphs.close()
    sim = simdevice.SimDevice()
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        sim.replay(graph)
    sim.close()


def test_remove_resets_the_graphs_it_captured(sim):
    model = _stack()
    x = torch.randn(4, 32)
    handle, graph = _captured(sim, model, x)
    sim.replay(graph)
    handle.remove()
    with pytest.raises(RuntimeError, match="without a preceding successful capture"):
        sim.replay(graph)
    sim.assert_clean()


def test_a_capture_the_handle_does_not_manage_is_refused_at_the_first_layer(sim):
    """A graph captured around the offloaded model directly (as `torch.compile(mode="reduce-overhead")`'s
    graph trees do) is refused before the first layer computes; eager forwards afterwards are right."""
    model = _stack()
    x = torch.randn(4, 32)
    (ref,) = _forwards(model, x)
    ran = []
    with _offload(sim, model, prefetch_step=2):
        hooks = [layer.register_forward_hook(lambda m, a, out, i=i: ran.append(i))
                 for i, layer in enumerate(model.layers)]  # fmt: skip
        refused = pytest.raises(weightlift.OffloadError, match=r"outside `handle.cuda_graph\(graph\)`.*reduce-overhead")
        with refused, sim.capture(simdevice.SimGraph()):
            _forwards(model, x)
        assert ran == []
        (out,) = _forwards(model, x)
        for h in hooks:
            h.remove()
    sim.assert_clean()
    assert torch.equal(out, ref) and ran == list(range(len(model.layers)))


def test_the_report_counts_a_captured_step_once_and_no_replay(sim):
    model = _stack()
    x = torch.randn(4, 32)
    handle = _offload(sim, model, prefetch_step=2)
    _forwards(model, x)
    before = handle.report()
    graph = simdevice.SimGraph()
    with torch.inference_mode(), handle.cuda_graph(graph):
        model(x)
    captured = handle.report()
    for _ in range(3):
        sim.replay(graph)
    sim.synchronize()
    replayed = handle.report()
    n = len(model.layers)
    assert captured.prefetch_hits + captured.prefetch_misses - before.prefetch_hits - before.prefetch_misses == n
    counts = lambda r: (r.prefetch_hits, r.prefetch_misses, r.copies, r.copy_seconds)  # noqa: E731
    assert counts(replayed) == counts(captured) and sim.counts["replays"] == 3
    handle.remove()
    sim.assert_clean()


# ------------------------------------------------------------------ overlap and device timing


def test_a_copy_waits_for_its_slots_last_reader_not_the_latest_compute(monkeypatch):
    """5 layers, step 2: slots 0,1,2,0,1. The copy of layer 3 (slot 0) starts after layer 1 ran, but only
    layer 0 read slot 0: the copy must not wait for layer 1's end (the compute stream sees it late)."""
    sim = simdevice.install(monkeypatch, copy_delay=0.0002, compute_lag=0.02)
    model = _stack(n=5)
    x = torch.randn(4, 32)
    with _offload(sim, model, prefetch_step=2) as handle:
        assert handle.prefetcher.schedule.slot_of == (0, 1, 2, 0, 1)
        sim.log.clear()
        _forwards(model, x)
        sim.synchronize()
        slot0 = handle.pool.slots[0].untyped_storage().data_ptr()
        log = list(sim.log)
    sim.assert_clean()
    read_end_1 = next(t for t, kind, _, what in log if kind == "read_end" and what == 1)
    copies_into_0 = [t for t, kind, key, _ in log if kind == "copy" and key == slot0]
    assert copies_into_0 and copies_into_0[0] < read_end_1
    sim.close()


def _intervals(log, begin: str, end: str) -> list[tuple[int, int]]:
    """(start tick, end tick) of each operation of one kind in the simulator's log (per buffer, in order)."""
    open_at: dict[int, list[int]] = {}
    out = []
    for tick, kind, key, _ in log:
        if kind == begin:
            open_at.setdefault(key, []).append(tick)
        elif kind == end:
            out.append((open_at[key].pop(0), tick))
    return out


@pytest.mark.parametrize("step", [1, 2])
def test_the_default_step_overlaps_copies_with_compute(monkeypatch, step):
    """With one slot (step 1) no copy can run while a layer computes; the default (step 2) overlaps."""
    sim = simdevice.install(monkeypatch, copy_delay=0.004, compute_lag=0.004)
    assert OffloadConfig().prefetch_step == 2
    model = _stack()
    x = torch.randn(4, 32)
    with _offload(sim, model, prefetch_step=step):
        sim.log.clear()
        _forwards(model, x, 2)
        sim.synchronize()
        log = list(sim.log)
    sim.assert_clean()
    copies, reads = _intervals(log, "copy", "copied"), _intervals(log, "read", "read_end")
    overlapped = [(c, r) for c in copies for r in reads if c[0] < r[1] and r[0] < c[1]]
    assert bool(overlapped) == (step == 2)
    sim.close()


def test_report_and_trace_give_device_time(monkeypatch, tmp_path):
    """Copies take 5 ms on the simulated copy stream but are issued in microseconds: the report's copy time
    is the device's, and the trace shows copies running beside compute."""
    import json

    delay = 0.005
    sim = simdevice.install(monkeypatch, copy_delay=delay, compute_lag=0.001)
    model = _stack()
    x = torch.randn(4, 32)
    with _offload(sim, model, prefetch_step=2) as handle:
        _forwards(model, x, 2)
        report = handle.report()
        handle.trace(tmp_path / "t.json")
        copies = sim.counts["copies"]
    sim.assert_clean()
    assert copies >= report.copies
    assert report.copy_seconds >= 0.9 * delay * copies
    assert report.compute_seconds > 0
    events = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    copy = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["tid"] == 2]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["tid"] == 1 and not e["name"].startswith("wait")]
    assert any(a < d and c < b for a, b in copy for c, d in compute)  # some copy ran while a layer computed
    sim.close()


# ------------------------------------------------------------------ the checker catches a missing wait


def _broken_run(monkeypatch, model, x, **delays):
    sim = simdevice.install(monkeypatch, **delays)
    with _offload(sim, model, prefetch_step=2):
        out = _forwards(model, x, 2)
    sim.synchronize()
    found = list(sim.hazards)
    sim.close()
    return out, found


def test_the_checker_reports_a_copy_that_skips_its_slots_release(monkeypatch):
    monkeypatch.setattr(StreamEngine, "start", lambda self, job, slot: self._copy_on(self._copy, job.name, job.pairs))
    _, found = _broken_run(monkeypatch, _stack(), torch.randn(4, 32), copy_delay=0.0005, compute_lag=0.02)
    assert any("overwritten while a layer reads it" in h for h in found), found


def test_the_checker_reports_a_layer_that_does_not_wait_for_its_copy(monkeypatch):
    model = _stack()
    x = torch.randn(4, 32)
    ref = _forwards(model, x, 2)
    monkeypatch.setattr(StreamEngine, "wait", lambda self, ticket: None)
    out, found = _broken_run(monkeypatch, model, x, copy_delay=0.01, compute_lag=0.0)
    assert any("not its weights" in h for h in found), found
    assert not all(torch.equal(a, b) for a, b in zip(out, ref))  # and the bytes really were wrong


def test_the_checker_reports_a_load_that_ignores_the_copy_in_flight(monkeypatch):
    """A synchronous load (a miss) into a slot that still receives a prefetch must wait for it first."""
    load_now = StreamEngine.load_now
    monkeypatch.setattr(StreamEngine, "load_now", lambda self, job, slot, after: load_now(self, job, slot, None))
    model = _stack()
    model.order = [0, 0, 1, 2, 3, 4, 5]  # layer 0 again while the copy of layer 2 into its slot is in flight
    _, found = _broken_run(monkeypatch, model, torch.randn(4, 32), copy_delay=0.01, compute_lag=0.02)
    assert found, "a load racing the prefetch into the same slot went unseen"


def test_the_checker_reports_a_staging_slab_reused_before_its_copy_out(monkeypatch, tmp_path):
    def acquire(self):  # the ring as it was: no exclusive use, no wait for the copy out
        index, self._next = self._next, (self._next + 1) % len(self.slabs)
        return index

    monkeypatch.setattr(StagingRing, "acquire", acquire)
    sim = simdevice.install(monkeypatch, copy_delay=0.01, compute_lag=0.0)
    model = _stack()
    model.order = [0, 1, 2, 3, 5, 4]
    config = dict(source="disk", disk_path=str(tmp_path), prefetch_step=2, host_budget=_slot_bytes(model))
    with _offload(sim, model, **config):
        _forwards(model, torch.randn(4, 32), 2)
    sim.synchronize()
    assert sim.hazards
    sim.close()


def test_the_checker_reports_a_replay_racing_eager_copies(monkeypatch):
    # the eager forward's last copies must still be in flight when the replay starts: at 0.01 s a copy,
    # a host pause of ~20 ms under CI load let them land first and the race went unseen (seen once in CI);
    # at 0.05 s the window is 100 ms
    monkeypatch.setattr(Graphs, "ready", lambda self, prefetcher: None)
    sim = simdevice.install(monkeypatch, copy_delay=0.05, compute_lag=0.0)
    model = _stack()
    x = torch.randn(4, 32)
    handle, graph = _captured(sim, model, x)
    _forwards(model, x)
    sim.replay(graph)
    sim.synchronize()
    assert sim.hazards
    handle.remove()
    sim.close()


@pytest.mark.parametrize("source", ["host", "disk"])
def test_nothing_in_a_forward_makes_the_host_wait_for_the_device(monkeypatch, tmp_path, source):
    """Every host synchronisation goes through the `Streams` seam (`sync_event`, `sync_stream`): none is
    issued by the thread that runs the forwards (the disk tier's reader thread waits for its slab's copy
    out, off the forward's path); `report()` reads the timing events afterwards."""
    sim = simdevice.install(monkeypatch, copy_delay=0.002, compute_lag=0.001)
    waits: list[str] = []
    for name in ("sync_event", "sync_stream"):
        real = getattr(sim, name)

        def spy(*args, real=real, name=name):
            if threading.current_thread() is threading.main_thread():
                waits.append(name)
            return real(*args)

        monkeypatch.setattr(sim, name, spy)
    model = _stack()
    x = torch.randn(4, 32)
    ref = _forwards(model, x, 3)
    disk = {"source": "disk", "disk_path": str(tmp_path), "host_budget": 10**7} if source == "disk" else {}
    with _offload(sim, model, prefetch_step=2, **disk) as handle:
        waits.clear()
        out = _forwards(model, x, 3)
        assert waits == []
        handle.report()
    sim.assert_clean()
    sim.close()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
