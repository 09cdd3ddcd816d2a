"""The mapped tier's window: which offloaded layers stay mapped after they run, and when they are given back.

On a CPU target the mapped tier computes on the file's pages in place. Giving a layer's pages back after
it runs (``MADV_DONTNEED``) bounds the process's resident set to about one layer, but on a warm page cache
every token then faults every page in again: SmolLM2's decode step took 59 ms mapped against 50 ms
resident, 1,161 minor faults per token. So layers stay mapped as far as the window allows:

- the window is ``host_budget`` when one is given, else the RAM the kernel says is available when the
  model is offloaded, less a margin (`machine.margin`);
- the first offloaded positions that fit in it, leaving room for the largest of the others, are *kept*:
  once they have run, their pages stay mapped and nothing is asked of the kernel for them again; the other
  positions stream as before (read ahead, given back after they run). A fixed set, not the least recently
  used ones: in a cyclic scan through the layers LRU would give back the very layer needed next;
- under memory pressure the kernel takes pages back even while they are mapped. Every `CHECK_SECONDS` one
  kept layer that ran is asked of the kernel (``mincore``); when it lost pages, the kept set is halved and
  the positions dropped stream from then on, so that the page cache is not thrashed by a set it cannot hold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config import format_size

log = logging.getLogger(__name__)

CHECK_SECONDS = 0.5  # how often one kept layer's pages are checked against the page cache
LOST = 0.9  # a kept layer with less than this fraction of its pages in the page cache was taken back


@dataclass
class MappedWindow:
    """The kept positions (they stay mapped once they ran), the ones among them mapped now, and the watch."""

    sizes: Sequence[int]  # bytes of each offloaded position's pages
    kept: set[int] = field(default_factory=set)
    held: set[int] = field(default_factory=set)  # kept positions that ran since they were last given back
    clock: Callable[[], float] = time.monotonic
    _checked: float = 0.0
    _next: int = 0  # which held position the next check looks at

    @classmethod
    def within(cls, sizes: Sequence[int], limit: int | None, clock: Callable[[], float] = time.monotonic):
        """Keep the first positions while they and the largest position not kept fit in ``limit`` bytes
        (None: keep none, stream every layer)."""
        kept: set[int] = set()
        if limit is not None:
            total = 0
            for p, size in enumerate(sizes):
                rest = max(sizes[p + 1 :], default=0)
                if total + size + rest > limit:
                    break
                total += size
                kept.add(p)
        return cls(sizes, kept, clock=clock)

    @property
    def nbytes(self) -> int:
        """The most this window holds mapped: the kept positions and the largest streamed one."""
        return sum(self.sizes[p] for p in self.kept) + max(
            (s for p, s in enumerate(self.sizes) if p not in self.kept), default=0
        )

    @property
    def layers(self) -> int:
        """How many layers this window holds mapped at most."""
        return len(self.kept) + (len(self.kept) < len(self.sizes))

    def ran(self, position: int) -> bool:
        """``position`` has run: True when it stays mapped, False when its pages are to be given back."""
        if position in self.kept:
            self.held.add(position)
            return True
        return False

    def given_back(self, position: int) -> None:
        self.held.discard(position)

    def pressed(self, cached: Callable[[int], float]) -> list[int]:
        """At most every `CHECK_SECONDS`, ask the kernel whether one held position still has its pages
        (``cached(position)``: the fraction in the page cache). When it lost some, halve the kept set and
        return the positions to give back now; else nothing."""
        now = self.clock()
        if not self.held or now - self._checked < CHECK_SECONDS:
            return []
        self._checked = now
        order = sorted(self.held)
        position = order[self._next % len(order)]
        self._next += 1
        if cached(position) >= LOST:
            return []
        keep = sorted(self.kept)[: len(self.kept) // 2]
        dropped = sorted(self.kept - set(keep))
        log.info(
            "weightlift: memory is short (the kernel took back pages of a kept layer): %d of %d kept layers now "
            "stream, %s stays mapped", len(dropped), len(self.kept), format_size(sum(self.sizes[p] for p in keep)),
        )  # fmt: skip
        self.kept = set(keep)
        gone = [p for p in dropped if p in self.held]
        self.held -= set(dropped)
        return gone
