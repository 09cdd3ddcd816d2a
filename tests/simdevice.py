"""A simulated accelerator for the ordering checker: weightlift's accelerator engines run their own code
on the CPU against it, through the `weightlift.streams.Streams` seam.

- Every stream is a worker thread running its operations later, in order (copies after an injected
  delay; the compute stream lags: a layer's end is seen by it some time after the host ran the layer).
  Events complete when their stream reaches them; ``wait`` blocks a stream (never the host) until the
  event's latest record at the time of the call has completed. A logical clock ticks at every
  operation's start and end.
- The host runs a layer's real compute when the compute stream has reached the layer (the checker's
  pre-hook waits for it, as a kernel waits for the work before it in its stream), so real bytes are read
  exactly where the device would read them.
- The checker labels buffers with the offloaded position whose weights they hold: each host master,
  staging slabs as the reader fills them, slots as copies land (a copy takes its source's label when it
  runs). It records each slot read by a layer (from the compute stream reaching the layer to it seeing
  the layer's end) and each write into a slot or slab, and reports a hazard when a layer reads a slot
  that does not hold its weights or is being written, when a slot is written while a layer reads it, and
  when a staging slab is refilled while a copy reads it.
- Graph capture records the operations; a replay issues them again on fresh internal streams and
  events (its copies race eager copies exactly as a real graph's would); a reset graph refuses replay.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import weightlift.apply
from weightlift.disk import DiskMaster


class SimEvent:
    def __init__(self, sim: SimDevice, timing: bool) -> None:
        self.sim, self.timing = sim, timing
        self.recorded = 0  # records issued
        self.completed = 0  # records reached by their stream
        self.time = 0.0  # wall time of the latest completed record
        self.tick = 0

    def _complete(self, generation: int) -> None:
        with self.sim.cond:
            self.completed = max(self.completed, generation)
            self.time, self.tick = time.perf_counter(), self.sim.tick()
            self.sim.cond.notify_all()

    def _wait_for(self, generation: int) -> None:
        with self.sim.cond:
            while self.completed < generation:
                self.sim.cond.wait()


class SimStream:
    """A worker running operations in order; ``gate`` can be cleared to hold it."""

    def __init__(self, sim: SimDevice, name: str, delay: float) -> None:
        self.sim, self.name, self.delay = sim, name, delay
        self.gate = threading.Event()
        self.gate.set()
        self._ops: queue.Queue = queue.Queue()
        self._issued = 0
        self._done = 0
        self._thread = threading.Thread(target=self._run, name=f"sim-{name}", daemon=True)
        self._thread.start()

    def put(self, op) -> None:
        with self.sim.cond:
            self._issued += 1
        self._ops.put(op)

    def _run(self) -> None:
        while True:
            op = self._ops.get()
            if op is None:
                return
            self.gate.wait()
            try:
                op()
            except Exception as err:  # a broken operation is a finding, never a hung worker
                self.sim.hazard(f"{self.name}: operation failed: {err!r}")
            with self.sim.cond:
                self._done += 1
                self.sim.cond.notify_all()

    def drain(self) -> None:
        """The host waits for everything issued to this stream so far."""
        with self.sim.cond:
            target = self._issued
            while self._done < target:
                self.sim.cond.wait()

    def stop(self) -> None:
        self.gate.set()
        self._ops.put(None)


@dataclass
class SimGraph:
    """What a capture recorded: ``(kind, args)`` operations in issue order."""

    ops: list[tuple] = field(default_factory=list)
    stream: Any = None  # the capture stream
    valid: bool = False

    def reset(self) -> None:
        self.ops, self.valid = [], False


class SimDevice:
    """`weightlift.streams.Streams` on simulated streams, with the ordering checker built in."""

    pin = False
    can_capture = True

    def __init__(self, copy_delay: float = 0.002, compute_lag: float = 0.001, read_delay: float = 0.0) -> None:
        self.cond = threading.Condition()
        self.copy_delay, self.compute_lag, self.read_delay = copy_delay, compute_lag, read_delay
        self.compute = SimStream(self, "compute", 0.0)
        self.streams: list[SimStream] = [self.compute]
        self.hazards: list[str] = []
        self.counts: dict[str, int] = defaultdict(int)
        self._clock = itertools.count(1)
        self._graph: SimGraph | None = None  # capturing into it
        self._capture_stream: SimStream | None = None
        # the checker's picture, by storage address: label[storage] = {byte offset: what landed there},
        # readers and writers in progress
        self.label: dict[int, dict[int, Any]] = defaultdict(dict)
        self.reading: dict[int, int] = defaultdict(int)
        self.writing: dict[int, int] = defaultdict(int)
        self.filled: set[int] = set()  # staging slabs
        self.needs: dict[int, dict[int, Any]] = {}  # position -> the labels its slot must hold
        # experts (weightlift.experts): landed copies as byte spans, span[storage] = [(start, end, label, src)],
        # and per position the dense ranges its layer reads from entry on (its experts are checked apart)
        self.spans: dict[int, list[tuple[int, int, Any, int | None]]] = defaultdict(list)
        self.dense: dict[int, list[tuple[int, int]]] = {}
        self.reader: dict[int, int] = {}  # storage -> the position reading it
        self.read_ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)  # storage -> ranges read so far
        self.writes: dict[int, list[tuple[int, int]]] = defaultdict(list)  # storage -> copies landing now
        self.names: dict[int, str] = {}
        self.hooks: list = []  # the checker's hooks on watched layers
        self.entered: set[int] = set()  # positions whose read began (their pre-hook ran) and has not ended
        self.log: list[tuple[int, str, int, Any]] = []  # (tick, copy/copied/read/read_end, storage, what)

    # ---------------------------------------------------------------- Streams
    def tick(self) -> int:
        return next(self._clock)

    def new_stream(self) -> SimStream:
        stream = SimStream(self, f"copy{len(self.streams)}", self.copy_delay)
        self.streams.append(stream)
        return stream

    def current_stream(self) -> SimStream:
        return self._capture_stream if self._graph is not None else self.compute

    def new_event(self, timing: bool = False) -> SimEvent:
        return SimEvent(self, timing)

    def _issue(self, kind: str, *args: Any) -> None:
        with self.cond:
            self._issue_locked(kind, *args)

    def _issue_locked(self, kind: str, *args: Any) -> None:
        if self._graph is not None:
            self._graph.ops.append((kind, *args))
            return
        self.counts[kind] += 1
        if kind == "record":
            event, stream = args
            event.recorded += 1
            generation = event.recorded
            stream.put(lambda: event._complete(generation))
        elif kind == "wait":
            stream, event = args
            generation = event.recorded  # the latest record when the wait is issued
            stream.put(lambda: event._wait_for(generation))
        elif kind == "copy":
            dst, src, stream = args
            stream.put(lambda: self._copy(dst, src, stream))
        elif kind == "read":
            position, key, stream = args
            stream.put(lambda: self._read_start(position, key))
        elif kind == "read_end":
            position, key, stream = args
            stream.put(lambda: self._read_end(key, position))
        elif kind == "expert_read":
            position, key, checks, stream = args
            stream.put(lambda: self._expert_read(position, key, checks))
        else:
            raise AssertionError(kind)

    def record(self, event: SimEvent, stream: SimStream) -> None:
        self._issue("record", event, stream)

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        self._issue("wait", stream, event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        self._issue("copy", dst, src, stream)

    def sync_event(self, event: SimEvent) -> None:
        assert self._graph is None, "host synchronisation inside a capture"
        event._wait_for(event.recorded)

    def sync_stream(self, stream: SimStream) -> None:
        assert self._graph is None, "host synchronisation inside a capture"
        stream.drain()

    def done(self, event: SimEvent) -> bool:
        return event.completed >= event.recorded

    def elapsed(self, start: SimEvent, end: SimEvent) -> float:
        assert start.timing and end.timing and self.done(start) and self.done(end)
        return end.time - start.time

    @contextlib.contextmanager
    def capture(self, graph: SimGraph, **kwargs: Any) -> Iterator[None]:
        self.compute.drain()
        self._capture_stream = graph.stream = SimStream(self, "capture", 0.0)  # replays map it to theirs
        self.streams.append(graph.stream)
        graph.ops = []
        self._graph = graph
        try:
            yield
        finally:
            self._graph = None
        graph.valid = True

    def capturing(self) -> bool:
        return self._graph is not None

    def replay(self, graph: SimGraph) -> None:
        """Issue the recorded operations again, on this (the compute) stream and fresh internal streams."""
        if not graph.valid:
            raise RuntimeError("Called CUDAGraph::replay without a preceding successful capture.")
        streams: dict[int, SimStream] = {}
        events: dict[int, SimEvent] = {}

        def stream_of(s: SimStream) -> SimStream:
            if s is graph.stream:
                return self.compute
            if id(s) not in streams:
                streams[id(s)] = self.new_stream()
            return streams[id(s)]

        def event_of(e: SimEvent) -> SimEvent:
            return events.setdefault(id(e), SimEvent(self, False))

        for kind, *args in graph.ops:
            mapped = [stream_of(a) if isinstance(a, SimStream) else event_of(a) if isinstance(a, SimEvent) else a
                      for a in args]  # fmt: skip
            self._issue(kind, *mapped)
        self.counts["replays"] += 1

    def synchronize(self) -> None:
        for stream in list(self.streams):
            stream.drain()

    def close(self) -> None:
        self.synchronize()
        for hook in self.hooks:  # the model runs without the checker from now on
            hook.remove()
        for stream in self.streams:
            stream.stop()

    # ---------------------------------------------------------------- the checker
    def hazard(self, what: str) -> None:
        with self.cond:
            self.hazards.append(f"t={self.tick()}: {what}")

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        dkey, skey = dst.untyped_storage().data_ptr(), src.untyped_storage().data_ptr()
        offset, soffset, n = dst.data_ptr() - dkey, src.data_ptr() - skey, dst.numel()
        carried = None  # copied out of device memory (the expert cache, or a slot into it): the spans it carries
        with self.cond:
            if skey in self.filled:  # a staging slab: it holds what the reader last put there
                label = self.label[skey].get(0)
                if self.writing[skey]:
                    self.hazards.append(f"t={self.tick()}: copy out of a staging slab while it is being filled")
            elif skey in self.spans:  # device memory written by earlier copies: it holds what they brought
                label = ("device", skey)
                carried = [(max(a, soffset) - soffset + offset, min(b, soffset + n) - soffset + offset, lab,
                            None if p is None else p + max(a, soffset) - a)
                           for a, b, lab, p in self.spans[skey] if a < soffset + n and soffset < b]  # fmt: skip
                if any(a < soffset + n and soffset < b for a, b in self.writes[skey]):
                    self.hazards.append(f"t={self.tick()}: {self._name(skey)} copied out of while it is written")
            else:  # a host master: its bytes never change
                label = ("host", src.data_ptr())
            self.reading[skey] += 1
            if self.reading[dkey] and not self._beside_the_read(dkey, offset, dst.numel(), stream):
                self.hazards.append(f"t={self.tick()}: {self._name(dkey)} overwritten while a layer reads it")
            self.writing[dkey] += 1
            self.writes[dkey].append((offset, offset + dst.numel()))
            self.log.append((self.tick(), "copy", dkey, label))
        time.sleep(stream.delay)
        dst.copy_(src)
        with self.cond:
            self.reading[skey] -= 1
            self.writing[dkey] -= 1
            self.writes[dkey].remove((offset, offset + dst.numel()))
            self.label[dkey][offset] = label
            end = offset + dst.numel()
            kept = [sp for sp in self.spans[dkey] if sp[1] <= offset or sp[0] >= end]
            kept += [(a, min(b, offset), lab, p) for a, b, lab, p in self.spans[dkey] if a < offset < b]
            kept += [(end, b, lab, None if p is None else p + end - a)
                     for a, b, lab, p in self.spans[dkey] if a < end < b]  # fmt: skip
            host = label is not None and label[0] == "host"
            landed = carried if carried is not None else [
                (offset, end, "host" if host else label, src.data_ptr() if host else None)]
            self.spans[dkey] = [*kept, *landed]
            self.counts["copies"] += 1
            self.log.append((self.tick(), "copied", dkey, label))

    def _read_start(self, position: int, key: int) -> None:
        with self.cond:
            held = {o: self.label[key].get(o) for o in self.needs[position]}
            if held != self.needs[position]:
                self.hazards.append(f"t={self.tick()}: position {position} read {self._name(key)} holding "
                                    f"{sorted(map(str, held.values()))}, not its weights")  # fmt: skip
            dense = self.dense.get(position)
            if (dense is None and self.writing[key]) or (dense is not None and any(
                    a < wb and wa < b for a, b in dense for wa, wb in self.writes[key])):  # fmt: skip
                self.hazards.append(f"t={self.tick()}: position {position} read {self._name(key)} while it is written")
            self.reading[key] += 1
            self.reader[key] = position
            self.read_ranges[key] = list(dense or [])
            self.counts["reads"] += 1
            self.log.append((self.tick(), "read", key, position))

    def _beside_the_read(self, key: int, offset: int, n: int, stream) -> bool:
        """A copy into the slot a MoE layer reads, outside every byte that layer has read so far (its dense
        part, and the experts it computed on): experts moved while the layer runs."""
        if self.reader.get(key) not in self.dense:
            return False
        return all(offset + n <= a or offset >= b for a, b in self.read_ranges[key])

    def _expert_read(self, position: int, key: int, checks: list) -> None:
        """The experts chosen at ``position`` compute: each (offset, n, kind, source) must have landed."""
        with self.cond:
            for offset, n, kind, source in checks:
                self.read_ranges[key].append((offset, offset + n))
                if any(a < offset + n and offset < b for a, b in self.writes[key]):
                    self.hazards.append(f"t={self.tick()}: position {position}'s experts read {self._name(key)} "
                                        f"bytes {offset}-{offset + n} while they are written")  # fmt: skip
                ok = any(a <= offset and offset + n <= b and lab == kind and (p is None or p + offset - a == source)
                         for a, b, lab, p in self.spans[key])  # fmt: skip
                if not ok:
                    self.hazards.append(f"t={self.tick()}: position {position}'s experts read {self._name(key)} "
                                        f"bytes {offset}-{offset + n} that do not hold them")  # fmt: skip
            self.counts["expert_reads"] += 1

    def _read_end(self, key: int, position: int) -> None:
        time.sleep(self.compute_lag)
        with self.cond:
            self.reading[key] -= 1
            self.log.append((self.tick(), "read_end", key, position))

    def _name(self, key: int) -> str:
        return self.names.get(key, f"buffer {key:#x}")

    def fill(self, slab: torch.Tensor, index: int, read) -> None:
        """A reader fills a staging slab with stack layer ``index``'s bytes (a host write, checked)."""
        key = slab.untyped_storage().data_ptr()
        with self.cond:
            self.filled.add(key)
            if self.reading[key]:
                self.hazards.append(f"t={self.tick()}: a staging slab refilled while a copy reads it")
            if self.writing[key]:
                self.hazards.append(f"t={self.tick()}: a staging slab filled by two readers at once")
            self.writing[key] += 1
        try:
            time.sleep(self.read_delay)
            read(slab)
        finally:
            with self.cond:
                self.writing[key] -= 1
                self.label[key] = {0: ("disk", index)}
                if self.reading[key]:
                    self.hazards.append(f"t={self.tick()}: a staging slab copied out while being refilled")

    def watch(self, handle) -> None:
        """Learn what ``handle``'s layers must find in their slots, and follow their reads."""
        schedule = handle.prefetcher.schedule
        for i, s in enumerate(handle.pool.slots):
            self.names[s.untyped_storage().data_ptr()] = f"slot {i}"
        for position, layer in enumerate(handle.layers):
            slot = handle.pool.slots[schedule.slot_of[position]]
            base = slot.untyped_storage().data_ptr()
            dense = handle.experts.dense(position) if handle.experts is not None else None
            if dense is not None:
                self.dense[position] = [(slot.data_ptr() - base + a, slot.data_ptr() - base + b) for a, b in dense]
            if isinstance(layer.master, DiskMaster):
                first = dense[0][0] if dense else 0
                self.needs[position] = {slot.data_ptr() - base + first: ("disk", layer.index)}
            else:
                pairs = layer.master.pairs(slot, dense)
                self.needs[position] = {d.data_ptr() - base: ("host", s.data_ptr()) for d, s in pairs}
            if dense is not None:
                self._watch_experts(handle, position, layer, slot, base)

            def enter(module, args, position=position, key=base):
                self.entered.add(position)
                self._issue("read", position, key, self.current_stream())
                if self._graph is None:
                    self.compute.drain()  # the host computes where the stream has got to

            def leave(module, args, output, position=position, key=base):
                if position in self.entered:  # not when weightlift's pre-hook raised before `enter` ran
                    self.entered.discard(position)
                    self._issue("read_end", position, key, self.current_stream())

            self.hooks += [
                layer.module.register_forward_pre_hook(enter),  # runs after weightlift's wait
                layer.module.register_forward_hook(leave, prepend=True, always_call=True),
            ]

    def _watch_experts(self, handle, position: int, layer, slot: torch.Tensor, base: int) -> None:
        """Before each expert stack computes (after weightlift's hook moved what it chose), check its bytes."""
        from weightlift.experts import routing_of

        for units in handle.experts.units[position].stacks:
            module = layer.module.get_submodule(units.stack.path)

            def check(module, args, kwargs, units=units):
                index = routing_of(args, kwargs)
                chosen = sorted({e for e in index.reshape(-1).tolist() if 0 <= e < units.stack.count})
                checks = []
                for ranges in (units.experts[e] for e in chosen):
                    if isinstance(layer.master, DiskMaster):
                        checks += [(slot.data_ptr() - base + a, b - a, ("disk", layer.index), None) for a, b in ranges]
                    else:
                        checks += [(d.data_ptr() - base, d.numel(), "host", s.data_ptr())
                                   for d, s in layer.master.pairs(slot, ranges)]  # fmt: skip
                self._issue("expert_read", position, base, checks, self.current_stream())
                if self._graph is None:
                    self.compute.drain()

            assert units.stack.fused, "the checker follows fused experts"
            self.hooks.append(module.register_forward_pre_hook(check, with_kwargs=True))

    def assert_clean(self) -> None:
        self.synchronize()
        assert not self.hazards, "\n".join(self.hazards[:20])


def install(monkeypatch, **delays: float) -> SimDevice:
    """Make `weightlift.offload` drive ``device="cpu"`` through the accelerator engines on a `SimDevice`."""
    sim = SimDevice(**delays)
    monkeypatch.setattr(weightlift.apply, "streams_for", lambda device: sim)
    read = DiskMaster.read
    monkeypatch.setattr(DiskMaster, "read", lambda master, buffer, ranges=None: sim.fill(
        buffer, master.index, lambda b: read(master, b, ranges)))  # fmt: skip
    return sim
