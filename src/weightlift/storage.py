"""Where offloaded layers' true weights live: the byte layout of a layer and its host-RAM master copy.

A layer's leaves (the plain tensors its parameters and buffers are made of, see `tensors.py`) are
grouped by storage; each storage contributes the byte span its leaves cover (a "piece"), placed at an
aligned offset. The same layout is used by the host master and by every device slot, so one layer
moves as one copy (or two, where its host master spans two arena blocks).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .dtypes import leaf_span, storage_span
from .pool import HostArena
from .tensors import Parts, byte_view, typed_view

ALIGN = 512  # slot offsets: the CUDA caching allocator's alignment, so kernels see the same alignment
_SPAN_ALIGN = 64  # a piece starts on a multiple of this in its storage, so every dtype's views stay aligned


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def storage_key(t: torch.Tensor) -> tuple:
    if t.is_meta:  # no data pointer: the storage object itself tells storages apart
        return (t.device, t.untyped_storage()._cdata)
    return (t.device, t.untyped_storage().data_ptr())


@dataclass
class Entry:
    """One offloaded parameter or buffer: the object the module holds and the leaves it is made of."""

    qualname: str  # dotted name inside the layer, as in its state_dict
    tensor: torch.Tensor  # the object the module holds: kept, only its contents are swapped
    parts: Parts
    device: torch.device  # where it was before offloading
    specs: list[torch.Tensor] = field(default_factory=list)  # meta tensors: dtype, shape, strides of leaves
    offsets: list[int] = field(default_factory=list)  # byte offset of each leaf's element 0 in the layout

    def __post_init__(self) -> None:
        self.specs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in self.parts.leaves]

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """This entry's leaves as views into ``buffer`` laid out like the layer."""
        return [typed_view(buffer, o, spec) for o, spec in zip(self.offsets, self.specs)]


@dataclass
class Layout:
    """Byte layout of one layer: pieces (storage spans) at aligned offsets."""

    entries: list[Entry]
    sources: list[torch.Tensor] = field(default_factory=list)  # uint8 views of the original spans
    offsets: list[int] = field(default_factory=list)
    piece_bytes: list[int] = field(default_factory=list)  # bytes of each piece
    nbytes: int = 0  # with alignment padding: what a slot needs
    data_bytes: int = 0  # bytes of weights in the layer, as stored (quantized stays quantized)

    @classmethod
    def of(cls, entries: list[Entry]) -> Layout:
        layout = cls(entries)
        spans: dict[tuple, list] = {}  # storage -> [start, end, piece index, a leaf on it]
        for leaf in (leaf for e in entries for leaf in e.parts.leaves):
            start, end = storage_span(leaf)
            span = spans.setdefault(storage_key(leaf), [start, end, len(spans), leaf])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        offset = 0
        for span in spans.values():
            span[0] -= span[0] % _SPAN_ALIGN
            layout.sources.append(byte_view(span[3], span[0], span[1]))
            layout.offsets.append(offset)
            layout.piece_bytes.append(span[1] - span[0])
            offset = _align(offset + span[1] - span[0])
        layout.nbytes = offset
        layout.data_bytes = sum(s.numel() for s in layout.sources)
        for e in entries:
            e.offsets = []
            for leaf in e.parts.leaves:
                start, _, index, _ = spans[storage_key(leaf)]
                e.offsets.append(layout.offsets[index] + leaf.storage_offset() * leaf.element_size() - start)
        return layout

    def restored(self, fill: Callable[[torch.Tensor], None]) -> dict[int, list[torch.Tensor]]:
        """New leaves of every entry (by ``id``) from the layer's bytes, each on the device it came from, in
        ordinary memory: one storage per piece, so leaves that shared a storage before offloading (views of
        one another, within one parameter or across several) share one again. ``fill`` writes the layer,
        laid out like a slot, into the CPU uint8 tensor it is given. Entries that came on meta get none."""
        real = [e for e in self.entries if e.device.type != "meta"]
        if not real:
            return {}
        buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        fill(buffer)
        storages: dict[tuple[int, torch.device], torch.Tensor] = {}
        out = {}
        for e in real:
            out[id(e)] = []
            for offset, spec in zip(e.offsets, e.specs):
                piece = bisect.bisect_right(self.offsets, offset) - 1
                start = self.offsets[piece]
                if (piece, e.device) not in storages:
                    storages[piece, e.device] = buffer[start : start + self.piece_bytes[piece]].to(e.device, copy=True)
                out[id(e)].append(typed_view(storages[piece, e.device], offset - start, spec))
        return out


@dataclass
class HostMaster:
    """The true bytes of one offloaded layer in host RAM.

    Either the original leaves themselves (CPU target, weights already in RAM: nothing is allocated),
    or the layout copied into the handle's `HostArena` (pinned for accelerator targets), from the
    originals, which the caller then releases. ``chunks`` are the arena ranges holding the layout: one,
    or two where the layer spans two arena blocks.
    """

    layout: Layout
    originals: dict[int, list[torch.Tensor]] | None  # id(entry) -> its original leaves, when not copied
    chunks: list[tuple[int, torch.Tensor]]  # (offset in the layout, uint8 host view)

    @classmethod
    def in_place(cls, layout: Layout) -> HostMaster:
        """The original leaves serve as the master (they are in RAM already, on a CPU target)."""
        return cls(layout, {id(e): list(e.parts.leaves) for e in layout.entries}, [])

    @classmethod
    def copied(cls, layout: Layout, arena: HostArena) -> HostMaster:
        master = cls(layout, None, arena.take(layout.nbytes))
        for source, offset in zip(layout.sources, layout.offsets):
            for dst, src in master._spans(offset, source.numel()):
                dst.copy_(source[src : src + dst.numel()])
        return master

    def _spans(self, offset: int, nbytes: int) -> list[tuple[torch.Tensor, int]]:
        """The host views over layout bytes ``[offset, offset + nbytes)``, each with its start in that range."""
        out = []
        for begin, chunk in self.chunks:
            lo, hi = max(offset, begin), min(offset + nbytes, begin + chunk.numel())
            if lo < hi:
                out.append((chunk[lo - begin : hi - begin], lo - offset))
        return out

    def _bytes(self, offset: int, nbytes: int, device: torch.device | None = None) -> torch.Tensor:
        """Layout bytes ``[offset, offset + nbytes)``: a view of the arena when they lie in one chunk and no
        ``device`` is asked for, else a fresh uint8 tensor (on ``device``, in ordinary memory)."""
        spans = self._spans(offset, nbytes)
        if device is None and len(spans) == 1:
            return spans[0][0]
        out = torch.empty(nbytes, dtype=torch.uint8, device=device or "cpu")
        for view, start in spans:
            out[start : start + view.numel()].copy_(view)
        return out

    def release_originals(self) -> None:
        """Once the arena holds the bytes, drop our references so the original storages can be freed."""
        if self.originals is None:
            for e in self.layout.entries:
                e.parts.leaves = []
            self.layout.sources = []

    def leaves(self, entry: Entry) -> list[torch.Tensor]:
        """The true leaves of ``entry``, in host RAM (views of the arena, or copies where they span two blocks)."""
        if self.originals is not None:
            return self.originals[id(entry)]
        out = []
        for offset, spec in zip(entry.offsets, entry.specs):
            span = leaf_span(spec)
            begin = offset - offset % _SPAN_ALIGN
            out.append(typed_view(self._bytes(begin, offset - begin + span), offset - begin, spec))
        return out

    def restored(self) -> dict[int, list[torch.Tensor]]:
        """New leaves of every entry (by ``id``) on the device it came from (see `Layout.restored`); the
        originals themselves where they are the master (on their device already: nothing is copied)."""
        if self.originals is not None:
            return {id(e): [leaf.to(e.device) for leaf in self.originals[id(e)]] for e in self.layout.entries}

        def fill(buffer: torch.Tensor) -> None:
            for dst, src in self.pairs(buffer):
                dst.copy_(src)

        return self.layout.restored(fill)

    def pairs(self, slot: torch.Tensor, ranges: Sequence[tuple[int, int]] | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(dst, src) byte pairs that copy this layer into ``slot``: one per arena chunk (or piece), or with
        ``ranges`` (byte ranges of the layout) only the bytes inside them."""
        segments = self.chunks if self.originals is None else list(zip(self.layout.offsets, self.layout.sources))
        if ranges is None:
            return [(slot[o : o + c.numel()], c) for o, c in segments]
        out = []
        for a, b in ranges:
            for o, c in segments:
                lo, hi = max(a, o), min(b, o + c.numel())
                if lo < hi:
                    out.append((slot[lo:hi], c[lo - o : hi - o]))
        return out
