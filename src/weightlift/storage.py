"""Where offloaded layers' true weights live: the byte layout of a layer and its host-RAM master copy.

A layer's tensors are grouped by storage; each storage contributes the byte span its tensors cover
(a "piece"), placed at an aligned offset. The same layout is used by the host master and by every
device slot, so one layer moves as one copy when its master is a single slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .dtypes import storage_span
from .tensors import byte_view, typed_view

ALIGN = 512  # slot offsets: the CUDA caching allocator's alignment, so kernels see the same alignment
_SPAN_ALIGN = 64  # a piece starts on a multiple of this in its storage, so every dtype's views stay aligned


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass
class Entry:
    """One offloaded parameter or buffer."""

    module: nn.Module
    attr: str
    qualname: str  # dotted name inside the layer, as in its state_dict
    tensor: torch.Tensor  # the object the module holds (kept; only its ``.data`` is swapped)
    original: torch.Tensor | None  # its original data, while that is also the master copy
    device: torch.device  # where it was before offloading
    piece: int = 0
    offset: int = 0  # byte offset of its storage_offset 0 ... in the layer layout, see `Layout`


@dataclass
class Layout:
    """Byte layout of one layer: pieces (storage spans) at aligned offsets."""

    entries: list[Entry]
    sources: list[torch.Tensor] = field(default_factory=list)  # uint8 views of the original spans
    offsets: list[int] = field(default_factory=list)
    nbytes: int = 0

    @classmethod
    def of(cls, entries: list[Entry]) -> Layout:
        layout = cls(entries)
        spans: dict[tuple, list[int]] = {}
        keys = []
        for e in entries:
            key = (e.tensor.device, e.tensor.untyped_storage().data_ptr())
            start, end = storage_span(e.tensor)
            if key not in spans:
                spans[key] = [start, end, len(keys)]
                keys.append((key, e.tensor))
            else:
                spans[key][0] = min(spans[key][0], start)
                spans[key][1] = max(spans[key][1], end)
        offset = 0
        for key, tensor in keys:
            start, end, _ = spans[key]
            start -= start % _SPAN_ALIGN
            spans[key][0] = start
            layout.sources.append(byte_view(tensor, start, end))
            layout.offsets.append(offset)
            offset = _align(offset + end - start)
        layout.nbytes = offset
        for e in entries:
            start, _, index = spans[(e.tensor.device, e.tensor.untyped_storage().data_ptr())]
            e.piece = index
            e.offset = layout.offsets[index] + e.tensor.storage_offset() * e.tensor.element_size() - start
        return layout

    @property
    def data_bytes(self) -> int:
        """Bytes of weights in the layer, without alignment padding."""
        return sum(s.numel() for s in self.sources)


@dataclass
class HostMaster:
    """The true bytes of one offloaded layer in host RAM.

    Either views of the original storages (CPU target, weights already in RAM: nothing is allocated),
    or one slab per layer holding the layout (pinned for accelerator targets), filled from the
    originals, which the caller then releases.
    """

    layout: Layout
    pieces: list[torch.Tensor]
    slab: torch.Tensor | None
    allocated: int  # host bytes this master allocated

    @classmethod
    def build(cls, layout: Layout, *, pin: bool) -> HostMaster:
        if not pin and all(s.device.type == "cpu" for s in layout.sources):
            return cls(layout, list(layout.sources), None, 0)
        slab = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        pieces = []
        for source, offset in zip(layout.sources, layout.offsets):
            piece = slab[offset : offset + source.numel()]
            piece.copy_(source)
            pieces.append(piece)
        return cls(layout, pieces, slab, slab.untyped_storage().nbytes())

    def view(self, entry: Entry) -> torch.Tensor:
        """The true tensor of ``entry``, in host RAM."""
        if self.slab is None:
            assert entry.original is not None
            return entry.original
        return typed_view(self.slab, entry.offset, entry.tensor)

    def pairs(self, slot: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dst, src) byte pairs that copy this layer into ``slot``: one pair when there is a slab."""
        if self.slab is not None:
            return [(slot[: self.layout.nbytes], self.slab)]
        return [(slot[o : o + p.numel()], p) for o, p in zip(self.layout.offsets, self.pieces)]
