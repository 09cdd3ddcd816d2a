"""Where offloaded layers' true weights live: the byte layout of a layer and its host-RAM master copy.

A layer's leaves (the plain tensors its parameters and buffers are made of, see `tensors.py`) are
grouped by storage; each storage contributes the byte span its leaves cover (a "piece"), placed at an
aligned offset. The same layout is used by the host master and by every device slot, so one layer
moves as one copy when its master is a single slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dtypes import storage_span
from .engine import Job, copy_job
from .pool import pinned_empty
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
            offset = _align(offset + span[1] - span[0])
        layout.nbytes = offset
        layout.data_bytes = sum(s.numel() for s in layout.sources)
        for e in entries:
            e.offsets = []
            for leaf in e.parts.leaves:
                start, _, index, _ = spans[storage_key(leaf)]
                e.offsets.append(layout.offsets[index] + leaf.storage_offset() * leaf.element_size() - start)
        return layout


@dataclass
class HostMaster:
    """The true bytes of one offloaded layer in host RAM.

    Either the original leaves themselves (CPU target, weights already in RAM: nothing is allocated),
    or one slab per layer holding the layout (pinned for accelerator targets), filled from the
    originals, which the caller then releases.
    """

    layout: Layout
    originals: dict[int, list[torch.Tensor]] | None  # id(entry) -> its original leaves, when no slab
    slab: torch.Tensor | None
    allocated: int  # host bytes this master allocated

    @classmethod
    def build(cls, layout: Layout, *, pin: bool) -> HostMaster:
        if not pin and all(s.device.type == "cpu" for s in layout.sources):
            originals = {id(e): list(e.parts.leaves) for e in layout.entries}
            return cls(layout, originals, None, 0)
        slab, taken = pinned_empty(layout.nbytes, pin)
        for source, offset in zip(layout.sources, layout.offsets):
            slab[offset : offset + source.numel()].copy_(source)
        return cls(layout, None, slab, taken)

    def release_originals(self) -> None:
        """Once the slab holds the bytes, drop our references so the original storages can be freed."""
        if self.slab is not None:
            for e in self.layout.entries:
                e.parts.leaves = []
            self.layout.sources = []

    def leaves(self, entry: Entry) -> list[torch.Tensor]:
        """The true leaves of ``entry``, in host RAM."""
        if self.originals is not None:
            return self.originals[id(entry)]
        return entry.views(self.slab)

    def job(self, slot: torch.Tensor, device: torch.device) -> Job:
        return copy_job(self.pairs(slot), device)

    def pairs(self, slot: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dst, src) byte pairs that copy this layer into ``slot``: one pair when there is a slab."""
        if self.slab is not None:
            return [(slot[: self.layout.nbytes], self.slab)]
        return [(slot[o : o + p.numel()], p) for o, p in zip(self.layout.offsets, self.layout.sources)]
