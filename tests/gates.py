"""Delay injection for the CPU copy engine (`weightlift.engine.ThreadEngine`), held by gates.

Every copy started in the background waits, held, until its ticket is waited on, and lands only then,
however fast the copy would have been:

- a layer that reads its slot without waiting for the copy into it sees the slot's old bytes, certainly
  (its copy has not run yet);
- a synchronous load (`load_now`) that does not wait for the copy still in flight into its slot has that
  copy land over it before `load_now` returns (the gate lands every copy issued before the load), so the
  layer computes on another layer's bytes, certainly;
- waiting on a ticket releases every earlier one too (the engine's one thread runs them in order), and
  `synchronize`/`close` release them all, so correct code never waits forever; a copy held for
  `HOLD_AT_MOST_S` (its test failed, leaving the handle open) lands anyway, so the run can end.

`hold(monkeypatch)` installs it for one test and returns the `Gates`, which count what was held.
"""

from __future__ import annotations

import threading
from typing import Any

import weightlift.engine as engine

# A copy still held after this long lands anyway: a test that failed while holding one must not leave its
# copy thread waiting forever (the interpreter joins that thread at exit, so the suite would never end).
HOLD_AT_MOST_S = 30.0


class _Ticket:
    """A gated copy: its future, and the gate its background run waits behind."""

    def __init__(self, gates: Gates, seq: int) -> None:
        self.gates, self.seq = gates, seq
        self.gate = threading.Event()
        self.future: Any = None

    def result(self) -> None:
        self.gates.release_through(self.seq)
        return self.future.result()

    def exception(self) -> BaseException | None:
        self.gates.release_through(self.seq)
        return self.future.exception()


class Gates:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[_Ticket] = []  # held, in issue order
        self._seq = 0
        self.held = 0  # copies that waited behind a gate
        self.expired = 0  # copies nobody waited for within HOLD_AT_MOST_S (their test had failed)

    @property
    def in_flight(self) -> int:
        """Copies started and still held (nobody waited for them yet)."""
        with self._lock:
            return len(self._open)

    def issue(self) -> _Ticket:
        with self._lock:
            self._seq += 1
            ticket = _Ticket(self, self._seq)
            self._open.append(ticket)
            self.held += 1
        return ticket

    def release_through(self, seq: int) -> list[_Ticket]:
        with self._lock:
            released = [t for t in self._open if t.seq <= seq]
            self._open = [t for t in self._open if t.seq > seq]
        for t in released:
            t.gate.set()
        return released

    def release_all(self) -> None:
        self.release_through(self._seq)


def hold(monkeypatch) -> Gates:
    """Gate every `ThreadEngine` made from now on in this test."""
    gates = Gates()
    load_now, close = engine.ThreadEngine.load_now, engine.ThreadEngine.close

    def gated_start(self, job, slot):
        ticket = gates.issue()

        def run() -> None:
            if not ticket.gate.wait(timeout=HOLD_AT_MOST_S):  # a test that failed holding it: let it go
                gates.expired += 1
            self._run(job)

        ticket.future = self._pool.submit(run)
        self._last = ticket
        return ticket

    def gated_load_now(self, job, slot, after):
        issued = gates._seq
        load_now(self, job, slot, after)
        # what was issued before this load and is still held lands now, over the load if the load did not
        # wait for it (correct code waited: nothing is left)
        for t in gates.release_through(issued):
            t.future.result()

    def gated_close(self):
        gates.release_all()
        close(self)

    monkeypatch.setattr(engine.ThreadEngine, "start", gated_start)
    monkeypatch.setattr(engine.ThreadEngine, "load_now", gated_load_now)
    monkeypatch.setattr(engine.ThreadEngine, "close", gated_close)
    return gates


def slow(monkeypatch, seconds: float) -> None:
    """Make every `ThreadEngine` copy on its background thread take ``seconds`` longer, inside the span the
    timeline records for it (synchronous loads on the caller's thread keep their speed)."""
    import dataclasses
    import time

    run = engine.ThreadEngine._run

    def slowed(self, job):
        if not threading.current_thread().name.startswith("weightlift-copy"):
            return run(self, job)

        def read(dst, job=job):
            time.sleep(seconds)
            if job.read is not None:
                job.read(dst)
            for a, b in job.pairs:
                a.copy_(b)

        return run(self, dataclasses.replace(job, pairs=(), read=read))

    monkeypatch.setattr(engine.ThreadEngine, "_run", slowed)
