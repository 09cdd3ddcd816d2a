"""Which layers are offloaded, the fixed slot of each, and the prefetch state machine.

Slots are fixed per layer, so a parameter points into the same device memory for the life of the
handle (needed for tensor subclasses built once, for `torch.compile` and for CUDA graphs). The copy of
the layer ``step`` positions ahead (cyclically: the last layer's successor is the first layer of the
next forward) must go into a slot that none of the ``step - 1`` layers in between uses. That is a
colouring of a cycle of ``n`` layers where any ``step`` consecutive layers differ. vLLM used
``slot = position % step``, which collides at the wrap when ``step`` does not divide ``n``. Here the
cycle is cut into ``m = n // step`` blocks of nearly equal size (each ``>= step``), numbered
``0, 1, ...`` inside each block: ``ceil(n / m)`` slots, which is ``step`` when ``step`` divides ``n``
and the fewest possible otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import OffloadError
from .window import MappedWindow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Offloaded stack indices in execution order, their slots and the prefetch distance."""

    offloaded: tuple[int, ...]
    step: int
    slot_of: tuple[int, ...]

    @property
    def n_slots(self) -> int:
        return max(self.slot_of) + 1 if self.slot_of else 0

    def ahead(self, position: int) -> int:
        """Position whose copy starts when ``position`` finishes."""
        return (position + self.step) % len(self.offloaded)


def cyclic_slots(n: int, step: int) -> tuple[int, ...]:
    """Slot of each of ``n`` positions so that any ``step`` cyclically consecutive ones differ."""
    if n == 0:
        return ()
    step = min(step, n)
    blocks = n // step
    base, extra = divmod(n, blocks)
    slots: list[int] = []
    for b in range(blocks):
        slots.extend(range(base + (1 if b < extra else 0)))
    return tuple(slots)


def spread_order(n: int) -> list[int]:
    """Positions 0..n-1 ordered so that every prefix is spread evenly along the stack (van der Corput)."""
    order, seen = [], set()
    k = 1
    while len(order) < n:
        for j in range(1, 2 * k, 2):
            p = min(n - 1, int(j * n / (2 * k)))
            if p not in seen:
                seen.add(p)
                order.append(p)
        k *= 2
    return order


def make_schedule(offloaded: Sequence[int], prefetch_step: int) -> Schedule:
    """Schedule for the stack indices ``offloaded`` (in execution order) and the requested step."""
    offloaded = tuple(offloaded)
    if prefetch_step == 0:  # no prefetch: one slot, each layer loaded when it runs
        return Schedule(offloaded, 0, (0,) * len(offloaded))
    step = min(prefetch_step, len(offloaded))
    if len(offloaded) > 1 and prefetch_step >= len(offloaded):
        log.warning(
            "prefetch_step=%d >= %d offloaded layers: the pool holds every offloaded layer, so no device "
            "memory is saved; lower `prefetch_step` or offload more layers",
            prefetch_step,
            len(offloaded),
        )
    return Schedule(offloaded, step, cyclic_slots(len(offloaded), step))


@dataclass
class _Slot:
    position: int | None = None  # which layer's weights the slot holds or is receiving
    ticket: Any = None  # engine ticket of the copy in flight, None once waited on


@dataclass
class Prefetcher:
    """The run-time side of a `Schedule`: keeps every slot's content right, whatever order layers run in.

    ``jobs[p]`` is the transfer of offloaded position ``p`` into its slot, run by ``engine`` (an
    `engine.Engine`). After a layer runs, its slot is released (later copies into it wait for that
    compute) and the copy ``step`` positions ahead starts.
    """

    schedule: Schedule
    engine: Any
    jobs: Sequence[Any]
    loaded: Callable[[int], None] | None = None  # told each time a position's transfer is issued (experts)
    slots: list[_Slot] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    copies: int = 0

    def __post_init__(self) -> None:
        self.slots = [_Slot() for _ in range(self.schedule.n_slots)]

    def prime(self) -> None:
        """Start the copies of the first ``step`` layers, as if the last layers had just run."""
        for position in range(self.schedule.step):
            self._issue(position)

    def before(self, position: int) -> None:
        if self.slots[self.schedule.slot_of[position]].position == position:
            self.hits += 1
        else:  # not prefetched: a layer ran out of the planned order, twice, or after an aborted forward
            self.misses += 1
            log.debug("prefetch miss at offloaded position %d: loading synchronously", position)
        self.ensure(position)

    def ensure(self, position: int) -> None:
        """Make ``position``'s slot hold its weights for compute issued from now on."""
        index = self.schedule.slot_of[position]
        slot = self.slots[index]
        if slot.position != position:
            self.copies += 1
            pending, slot.position, slot.ticket = slot.ticket, None, None  # nothing trusted there until it lands
            self._landed(position, lambda: self.engine.load_now(self.jobs[position], index, pending))
            slot.position = position
            if self.loaded is not None:
                self.loaded(position)
        elif slot.ticket is not None:
            ticket, slot.ticket = slot.ticket, None
            slot.position = None  # until the wait says the bytes landed
            self._landed(position, lambda: self.engine.wait(ticket))
            slot.position = position

    def _landed(self, position: int, transfer: Callable[[], None]) -> None:
        """Run ``transfer`` of ``position``; a failure (a read error on the disk tier) leaves its slot empty,
        so the next forward loads it again, and is an `OffloadError` naming the layer."""
        try:
            transfer()
        except Exception as err:
            name = getattr(self.jobs[position], "name", f"offloaded position {position}")
            if isinstance(err, OffloadError):
                raise OffloadError(f"`{name}` could not be loaded: {err}") from None
            raise OffloadError(f"`{name}` could not be loaded: {type(err).__name__}: {err}") from err

    def after(self, position: int, every_slot: bool = False) -> None:
        """``position`` has run: release its slot (``every_slot``: all slots, after all compute so far) and
        start the copy ``step`` ahead."""
        self.engine.release(None if every_slot else self.schedule.slot_of[position])
        if self.schedule.step:
            self._issue(self.schedule.ahead(position))

    def aborted(self, position: int, every_slot: bool = False) -> None:
        """The layer at ``position`` raised: what it issued may still read its slot; nothing is prefetched."""
        self.engine.release(None if every_slot else self.schedule.slot_of[position])

    def contents(self) -> tuple[int | None, ...]:
        """Which position each slot holds or is receiving."""
        return tuple(slot.position for slot in self.slots)

    def settle(self) -> None:
        """Every copy in flight has landed (the engine synchronises): no ticket is left open."""
        self.engine.synchronize()
        for slot in self.slots:
            slot.ticket = None

    def restore(self, contents: Sequence[int | None]) -> None:
        """The slots hold ``contents`` (from `contents`), every copy landed: after a capture, which ran nothing."""
        for slot, position in zip(self.slots, contents):
            slot.position, slot.ticket = position, None

    def refill(self, contents: Sequence[int | None]) -> None:
        """Start the copies that make the slots hold ``contents`` again (positions, or None for any)."""
        for position in contents:
            if position is not None:
                self._issue(position)

    def join(self) -> None:
        """Compute issued from now on waits for every copy in flight (the copy stream joins back)."""
        for slot in self.slots:
            if slot.ticket is not None:
                self.engine.wait(slot.ticket)
                slot.ticket = None

    def _issue(self, position: int) -> None:
        slot = self.slots[self.schedule.slot_of[position]]
        if slot.position == position:
            return  # already there or on its way
        slot.position = position
        slot.ticket = self.engine.start(self.jobs[position], self.schedule.slot_of[position])
        self.copies += 1
        if self.loaded is not None:
            self.loaded(position)


@dataclass
class MappedPrefetcher:
    """The run-time side of a mapped disk source: every layer is always addressable (its pages come from
    the page cache or fault in from disk), so nothing can be out of place. After layer ``k`` runs, its
    pages are given back unless the window keeps it (`weightlift.window`), and the layer ``step`` ahead is
    read ahead by the kernel, unless it is a kept layer still mapped."""

    schedule: Schedule
    willneed: Callable[[int], None]
    release: Callable[[int], None]
    check: Callable[[], None]  # refuses a file changed after setup before its pages are touched
    loaded: Callable[[int], None] | None = None  # told each time a position is read ahead (experts)
    again: Callable[[int], None] | None = None  # before a layer runs: asks for its read-ahead once more
    window: MappedWindow | None = None  # which layers stay mapped after they run (None: none do)
    cached: Callable[[int], float] = lambda p: 0.0  # the fraction of a position's pages in the page cache
    hits: int = 0
    misses: int = 0  # a layer ran whose read-ahead was not asked for (out of order, step 0, after an abort)
    copies: int = 0
    pending: set[int] = field(default_factory=set)  # read ahead, not run yet
    _next: int = -1  # the position expected to run next (the files are checked at any other)

    def __post_init__(self) -> None:
        if self.window is None:
            self.window = MappedWindow.within([0] * len(self.schedule.offloaded), None)

    def _ahead(self, position: int) -> None:
        if position not in self.window.held:  # a kept layer that ran is mapped: nothing to ask
            self.willneed(position)
            self.copies += 1
        self.pending.add(position)
        if self.loaded is not None:
            self.loaded(position)

    def _give_back(self, position: int) -> None:
        self.window.given_back(position)
        self.release(position)

    def prime(self) -> None:
        for position in range(self.schedule.step):
            self._ahead(position)

    def before(self, position: int) -> None:
        if position != self._next:  # once per pass through the layers (each check is a system call per file)
            self.check()
        self._next = position + 1
        if position in self.pending:
            self.pending.discard(position)
            self.hits += 1
        else:  # its pages fault in from wherever they are while it computes
            self.misses += 1
            log.debug("read-ahead miss at offloaded position %d: its pages fault in as it runs", position)
        if not self.schedule.step and self.loaded is not None:  # nothing read ahead: its pages fault in now
            self.loaded(position)
        if self.again is not None:
            self.again(position)

    def ensure(self, position: int) -> None:
        self.check()

    def aborted(self, position: int, every_slot: bool = False) -> None:
        self._next = -1
        self._give_back(position)

    def after(self, position: int, every_slot: bool = False) -> None:
        if not self.window.ran(position):
            self.release(position)
        for dropped in self.window.pressed(self.cached):
            self.release(dropped)
        if self.schedule.step:
            self._ahead(self.schedule.ahead(position))
