"""The memory and prefetch report of an offloaded model."""

from __future__ import annotations

import json
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .streams import Streams

from .config import format_size


@dataclass(frozen=True)
class ExpertReport:
    """Expert-level streaming of mixture-of-experts layers (`weightlift.experts`), so far."""

    stacks: int  # expert stacks in the offloaded layers
    experts: int  # experts in them, all stacks together
    dense_bytes: int  # bytes of the offloaded MoE layers outside their experts (attention, norms, routers ...)
    expert_bytes: int  # bytes of their experts
    dense_moved: int  # bytes of dense parts moved (copied, read, or read ahead)
    experts_moved: int  # bytes of experts moved
    tokens: int  # tokens through the first expert stack
    routed: int  # stack forwards that moved only the chosen experts
    whole: int  # stack forwards that moved every expert (more than half were chosen)
    used: int  # experts computed on, per stack forward
    hits: int  # of those, already in place: moved ahead, or still in the layer's slot from its last run
    misses: int  # of those, moved after the router chose them
    predicted: int  # experts the lookahead moved ahead
    predicted_used: int  # of those, used
    cache_entries: int = 0  # experts the device expert cache holds (0: no cache)
    cache_bytes: int = 0  # its device memory (counted in the pool's)
    sought: int = 0  # of the misses in routed forwards (whole stacks bypass the cache), looked for in it
    cached: int = 0  # of those, copied from the cache instead of over the link
    cached_bytes: int = 0  # bytes copied from the cache into slots (not in experts_moved)
    evictions: int = 0  # experts that left the cache for another

    @property
    def precision(self) -> float | None:
        """Share of the experts moved ahead that were used (None without a lookahead)."""
        return self.predicted_used / self.predicted if self.predicted else None

    @property
    def cache_hit_rate(self) -> float | None:
        """Share of the experts looked for in the device cache that it held (None without one, or none sought)."""
        return self.cached / self.sought if self.sought else None

    @property
    def moved_per_token(self) -> float | None:
        return (self.dense_moved + self.experts_moved) / self.tokens if self.tokens else None

    def __str__(self) -> str:
        ahead = f", lookahead precision {self.precision:.0%}" if self.precision is not None else ""
        per = f", {format_size(int(self.moved_per_token))} per token" if self.moved_per_token is not None else ""
        return (
            f"{self.experts} experts in {self.stacks} stacks ({format_size(self.expert_bytes)}; dense parts "
            f"{format_size(self.dense_bytes)}): moved {format_size(self.dense_moved + self.experts_moved)}{per}; "
            f"{self.routed} routed and {self.whole} whole stack forwards; {self.used} experts used, "
            f"{self.hits} in place, {self.misses} moved on demand{ahead}{self._cache()}"
        )

    def _cache(self) -> str:
        if not self.cache_entries:
            return ""
        rate = f" ({self.cache_hit_rate:.0%})" if self.cache_hit_rate is not None else ""
        return (f"; device cache of {self.cache_entries} experts ({format_size(self.cache_bytes)}): {self.cached} of "
                f"{self.sought} looked for there found{rate}, {self.evictions} evicted")


@dataclass(frozen=True)
class OffloadReport:
    """Exact figures for one `OffloadHandle`. Bytes are storage bytes (quantized as stored)."""

    device: str
    source: str  # where the offloaded layers' true weights live: "host" (RAM) or the cache file's path
    stack: str  # dotted path of the offloaded layer stack
    layers: int  # layers in the stack
    layers_offloaded: int
    offloaded_bytes: int  # weights of the offloaded layers, as stored
    resident_bytes: int  # parameters and buffers kept on the device (everything not offloaded)
    pool_bytes: int  # device memory of the slot pool (and of the device expert cache, if any)
    slots: int
    slot_bytes: int
    host_bytes: int  # host RAM allocated for master copies (0 when the originals serve as masters)
    prefetch_step: int
    copies: int  # layer copies issued so far (prefetches and synchronous loads)
    prefetch_hits: int
    prefetch_misses: int  # layers that ran before their copy was started: loaded synchronously
    replaced: int = 0  # offloaded tensors a format replaced during a forward: now resident, see the log
    copy_seconds: float = 0.0  # time the copy engine spent transferring layers
    exposed_copy_seconds: float = 0.0  # time compute waited for a copy (or loaded one itself, on a miss)
    compute_seconds: float = 0.0  # time spent inside offloaded layers' forwards
    experts: ExpertReport | None = None  # MoE layers moved expert by expert (None: whole layers)
    in_file_bytes: int = 0  # resident weights computed on in their file (the input embedding on a CPU): in no budget

    @property
    def saved_bytes(self) -> int:
        """Device memory saved by offloading: offloaded weights minus the pool that replaces them (below zero
        when the pool holds more: a mapped window that keeps every layer, in its page-aligned layout, say)."""
        return self.offloaded_bytes - self.pool_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory held by weights: resident plus pool."""
        return self.resident_bytes + self.pool_bytes

    def _expert_cache(self) -> str:
        e = self.experts
        return f" + a cache of {e.cache_entries} experts, {format_size(e.cache_bytes)}" if e and e.cache_entries else ""

    def _pool_row(self) -> tuple[str, str]:
        if self.source.endswith("(mapped)"):
            return ("mapped window", f"{format_size(self.pool_bytes)} ({self.slots} of {self.layers_offloaded} layers "
                                     "stay mapped: page cache, which the kernel takes back when memory is short)")
        return ("device pool", f"{format_size(self.pool_bytes)} ({self.slots} slots x {format_size(self.slot_bytes)}"
                               f"{self._expert_cache()})")

    def to_dict(self) -> dict:
        out = {**asdict(self), "saved_bytes": self.saved_bytes, "device_bytes": self.device_bytes}
        if self.experts is not None:
            out["experts"].update(precision=self.experts.precision, moved_per_token=self.experts.moved_per_token,
                                  cache_hit_rate=self.experts.cache_hit_rate)
        return out

    def __str__(self) -> str:
        rows = [
            ("device", self.device),
            ("weights streamed from", self.source),
            ("layer stack", f"{self.stack} ({self.layers_offloaded} of {self.layers} layers offloaded)"),
            ("offloaded weights", format_size(self.offloaded_bytes)),
            ("resident weights", format_size(self.resident_bytes)),
            *([("in its file", f"{format_size(self.in_file_bytes)} (the input embedding, mapped: rows are read as "
                               "tokens use them)")] if self.in_file_bytes else []),
            self._pool_row(),
            ("device memory saved", format_size(self.saved_bytes)),
            ("host RAM for masters", format_size(self.host_bytes)),
            ("prefetch", f"step {self.prefetch_step}: {self.copies} copies, "
                         f"{self.prefetch_hits} hits, {self.prefetch_misses} misses"),
            ("time in offloaded layers", f"compute {self.compute_seconds:.3f} s, waited for copies "
                                         f"{self.exposed_copy_seconds:.3f} s, copying {self.copy_seconds:.3f} s"),
            *([("experts", str(self.experts))] if self.experts is not None else []),
            *([("replaced after offload", f"{self.replaced} tensors (now resident; see the log)")]
              if self.replaced else []),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


class HostClock:
    """Host time (``perf_counter``): on a CPU target compute and copies run when the host runs them."""

    def mark(self, stream: Any = None) -> float:
        return time.perf_counter()

    def resolve(self, start: float, end: float, block: bool) -> tuple[float, float]:
        return start, end


class DeviceClock:
    """Device time, from timing events recorded on the streams where the work runs: a mark costs one
    event record and never synchronises; a span is read back when its end event has completed."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self._origin = streams.new_event(timing=True)
        streams.record(self._origin, streams.current_stream())
        streams.sync_event(self._origin)
        self.host_origin = time.perf_counter()  # device time 0 is about this host time

    def mark(self, stream: Any = None) -> Any:
        event = self.streams.new_event(timing=True)
        self.streams.record(event, self.streams.current_stream() if stream is None else stream)
        return event

    def resolve(self, start: Any, end: Any, block: bool) -> tuple[float, float] | None:
        if not block and not self.streams.done(end):
            return None
        self.streams.sync_event(end)
        begin = self.host_origin + self.streams.elapsed(self._origin, start)
        return begin, begin + self.streams.elapsed(start, end)


class Intervals:
    """The last ``capacity`` intervals ``(lane, name, start, end)`` of a timeline, oldest first, in memory
    allocated (and touched) once: appending never allocates, so a long run's RSS does not creep up while
    the history fills (a deque of tuples took about 190 bytes per interval as it filled: 2.7 KiB per decode
    step of a 5-layer model, up to 36 MiB for its 200,000). Names are stored once each, as an index (a timeline's names
    are its lanes' kinds times its layers)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts = array("d", bytes(8 * capacity))
        self._ends = array("d", bytes(8 * capacity))
        self._codes = array("i", bytes(4 * capacity))
        self._keys: list[tuple[str, str]] = []  # (lane, name) of each code
        self._code: dict[tuple[str, str], int] = {}
        self._count = 0  # intervals appended since the last `clear`

    def append(self, interval: tuple[str, str, float, float]) -> None:
        lane, name, start, end = interval
        code = self._code.get((lane, name))
        if code is None:
            code = self._code[(lane, name)] = len(self._keys)
            self._keys.append((lane, name))
        i = self._count % self.capacity
        self._starts[i], self._ends[i], self._codes[i] = start, end, code
        self._count += 1

    def clear(self) -> None:
        self._count = 0

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    def __iter__(self) -> Iterator[tuple[str, str, float, float]]:
        for n in range(self._count - len(self), self._count):
            i = n % self.capacity
            yield (*self._keys[self._codes[i]], self._starts[i], self._ends[i])


class Timeline:
    """Where time goes, cheap enough to leave on: intervals per lane and per layer.

    Lanes: ``compute`` (each offloaded layer's forward, and the time compute waited for its copy before
    it, or loaded it itself on a miss) and ``copy`` (each layer's transfer; ``read``: a disk read into a
    staging slab, on the host). With a `HostClock` (CPU targets) intervals are host times; with a
    `DeviceClock` (accelerators) they are device times of the streams, read back lazily: `resolve` (called
    by the report, `timings` and `trace`) turns the spans whose events have completed into intervals.
    Totals per layer are kept for the report (``copy`` includes disk reads); the last ``keep`` intervals
    for `trace` (`Intervals`: 20 bytes each, 1.25 MiB for the default 65,536, allocated
    once). While ``paused`` (inside a graph capture, whose events mean nothing to eager code)
    nothing is recorded.
    """

    def __init__(self, clock: HostClock | DeviceClock | None = None, keep: int = 65_536) -> None:
        self.clock = clock or HostClock()
        self.host = HostClock()
        self.events = Intervals(keep)
        self.totals: dict[str, dict[str, float]] = {}
        self.paused = False
        self._lock = threading.Lock()
        self._pending: deque[tuple[Any, str, str, str, Any, Any]] = deque()
        self.origin = getattr(self.clock, "host_origin", time.perf_counter())  # trace time 0

    def mark(self, stream: Any = None) -> Any:
        """A point in time on ``stream`` (the current one by default), or None while paused."""
        return None if self.paused else self.clock.mark(stream)

    def span(self, lane: str, kind: str, layer: str, start: Any, end: Any, clock: Any = None) -> None:
        """Record the interval between two marks of ``clock`` (this timeline's by default)."""
        if start is None or end is None:
            return
        clock = clock or self.clock
        if isinstance(clock, HostClock):  # nothing to read back
            with self._lock:
                self.add(lane, kind, layer, start, end)
            return
        self._pending.append((clock, lane, kind, layer, start, end))
        if len(self._pending) > 4096:  # bound what is held: take in what has completed, without waiting
            self.resolve(block=False)

    def resolve(self, block: bool = True) -> None:
        """Turn recorded spans into intervals (``block``: wait for those still running on the device)."""
        with self._lock:  # spans come from the copy threads too
            while self._pending:
                clock, lane, kind, layer, start, end = self._pending[0]
                got = clock.resolve(start, end, block)
                if got is None:
                    return
                self._pending.popleft()
                self.add(lane, kind, layer, *got)

    def add(self, lane: str, kind: str, layer: str, start: float, end: float) -> None:
        self.events.append((lane, f"{kind} {layer}" if kind != "compute" else layer, start, end))
        sums = self.totals.setdefault(layer, {"copy": 0.0, "wait": 0.0, "compute": 0.0})
        sums["copy" if kind == "read" else kind] += end - start

    def timed(self, lane: str, kind: str, layer: str, job: Callable[[], Any]) -> Any:
        """Run ``job`` now, on this thread, and record its host time."""
        start = time.perf_counter()
        try:
            return job()
        finally:
            self.span(lane, kind, layer, start, time.perf_counter(), self.host)

    def trace(self, path: str | Path) -> None:
        """Write a Chrome / Perfetto trace (JSON, ``chrome://tracing`` or ui.perfetto.dev)."""
        self.resolve()
        lanes = {"compute": 1, "copy": 2, "read": 3}
        events: list[dict] = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": lane}}
            for lane, tid in lanes.items()
        ]
        origin = self.origin
        for lane, name, start, end in list(self.events):
            events.append({"name": name, "ph": "X", "pid": 1, "tid": lanes[lane], "cat": name.split()[0],
                           "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6})  # fmt: skip
        Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def plot_timeline(
    events: list[tuple[str, str, float, float]],
    runs: dict[str, dict[str, float]],
    path: str | Path,
    forwards: Sequence[tuple[str, float]] = (),
) -> None:
    """A PNG: the compute and copy lanes of the first forwards (each forward's start marked with its kind,
    from ``forwards``: ``(kind, start time)`` pairs on the events' clock), and a bar chart of milliseconds
    per forward of each workload (``runs``: run name -> workload name -> seconds), values written on the bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import OffloadError

        raise OffloadError("`--plot` needs matplotlib: `pip install 'weightlift[plot]'`") from None
    fig, (lanes, bars) = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 1.2]})
    ordered = sorted(forwards, key=lambda m: m[1])
    marks = ordered[:4]  # the prefill and the first decode steps, up to where the fifth forward starts
    if marks:
        end = ordered[4][1] if len(ordered) > 4 else float("inf")
        recent = [e for e in events if e[2] < end][:2000]  # with the copies primed before the first forward
    else:
        recent = events[-400:]
    origin = min([start for _, _, start, _ in recent] + [t for _, t in marks], default=0.0)
    colours = {"compute": "#4477aa", "wait": "#ee6677", "copy": "#228833"}
    for lane, name, start, end in recent:
        kind = "wait" if name.startswith("wait ") else ("copy" if lane == "copy" else "compute")
        row = 1 if lane == "compute" else 0
        lanes.broken_barh([((start - origin) * 1e3, (end - start) * 1e3)], (row - 0.4, 0.8), color=colours[kind],
                          edgecolor="white", linewidth=0.3)  # fmt: skip
    for kind, at in marks:
        x = (at - origin) * 1e3
        lanes.axvline(x, color="#222222", linestyle="--", linewidth=0.8)
        lanes.text(x, 1.95, f"{kind} ", fontsize=7, rotation=90, va="top", ha="right")
    lanes.set_ylim(-0.6, 2.0)
    lanes.set_yticks([0, 1], ["copy", "compute"])
    lanes.set_xlabel("ms")
    lanes.set_title("offloaded timeline (blue: layer forward, red: waiting for its copy, green: copy)", fontsize=9)
    workloads = list(dict.fromkeys(w for values in runs.values() for w in values))
    width = 0.8 / max(len(runs), 1)
    palette = ["#777777", "#4477aa", "#228833", "#ee6677"]
    for r, (run, values) in enumerate(runs.items()):
        xs = [i + (r - (len(runs) - 1) / 2) * width for i in range(len(workloads))]
        drawn = bars.bar(xs, [values.get(w, 0.0) * 1e3 for w in workloads], width, label=run,
                         color=palette[r % len(palette)])  # fmt: skip
        bars.bar_label(drawn, fmt="%.1f", fontsize=8)
    bars.set_xticks(range(len(workloads)), workloads)
    bars.set_ylabel("ms per forward")
    bars.set_title("prefill and decode step", fontsize=9)
    bars.margins(y=0.15)
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
