"""Offloaded tensors that no longer read their slots, and layer outputs computed too late.

A model converted while offloaded (``model.half()``, ``.to(dtype)``, ``.cuda()``: torch's ``Module._apply``)
gives each parameter a converted copy of whatever its shared slot held then, and puts new tensors in place
of buffers. torch has no per-module hook on ``_apply`` (only global ones, which weightlift does not use),
so the layer hooks look afterwards: `drifted` compares each offloaded tensor's data pointer, dtype, device
and holder with those at offload, and `put_back` holds the original tensors again before `remove()`
restores them. `refuse_lazy` refuses a layer output that would compute after the layer's slot moved on.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import OffloadError
from .storage import Entry

if TYPE_CHECKING:
    from .hooks import OffloadedLayer

log = logging.getLogger(__name__)


def refuse_lazy(name: str, output: Any) -> None:
    """`OffloadError` for a layer output computed later (a generator or another iterator, also inside a
    tuple, list or dict): it would read the layer's weights after its slot is given to the next layer."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in (output, *values):
        if isinstance(value, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType, Iterator)):
            raise OffloadError(
                f"`{name}` returned a {type(value).__name__}, computed after the layer returns, when weightlift has "
                "given its slot to the next layer: it would read other weights. Make its forward return tensors "
                "(collect the generator inside it, e.g. `return tuple(...)`), or keep the layer resident "
                "(OffloadConfig(indices=...) without it)"
            )


@dataclass
class Holder:
    """Where an offloaded tensor is held (``owner._parameters[attr]`` or ``owner._buffers[attr]``), and its
    dtype and device once it was installed in its slot."""

    entry: Entry
    owner: nn.Module
    attr: str
    table: str  # "_parameters" or "_buffers"
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        self._held_in: dict = getattr(self.owner, self.table)  # the module's own table (the same dict for life)

    def moved(self) -> bool:
        """Whether the module holds another tensor there now, or this one with another dtype or device."""
        held = self._held_in.get(self.attr)
        return held is not self.entry.tensor or held.dtype != self.dtype or held.device != self.device


def holders(layer: OffloadedLayer) -> list[Holder]:
    """A `Holder` for each offloaded parameter and buffer of ``layer`` (tensors in plain attributes are
    left out: no conversion reaches them)."""
    out = []
    for e in layer.master.layout.entries:
        path, _, attr = e.qualname.rpartition(".")
        try:
            owner = layer.module.get_submodule(path)
        except AttributeError:
            continue
        for table in ("_parameters", "_buffers"):
            if getattr(owner, table).get(attr) is e.tensor:
                out.append(Holder(e, owner, attr, table, e.tensor.dtype, e.tensor.device))
    return out


def drifted(layer: OffloadedLayer, watch: list) -> str | None:
    """The name of the first offloaded tensor of ``layer`` that no longer reads its slot, or None.

    torch has no per-module hook on ``Module._apply`` (what ``to``, ``half``, ``float``, ``cuda`` run): it
    sets ``param.data`` to a converted copy of what the slot held then, and puts a new tensor in place of
    each buffer. So this looks afterwards: a ``watch``ed tensor's data moved (``(entry, data_ptr)`` pairs),
    a tensor's dtype or device changed, or its module holds another tensor under its name."""
    for e, ptr in watch:
        if e.tensor.data_ptr() != ptr:
            return e.qualname
    return next((h.entry.qualname for h in layer.holders if h.moved()), None)


def put_back(layer: OffloadedLayer) -> None:
    """Before `remove()` restores ``layer``: each offloaded tensor its module no longer holds (a buffer
    converted by ``model.half()``, say, or replaced) is held again, so that its true weights come back
    where they were; logged, since what was done to it is undone."""
    moved = [h for h in layer.holders if h.moved()]
    if moved:
        log.warning("`%s.%s` (and %d more of the layer) was converted or replaced while offloaded: remove() puts "
                    "back the tensors as they were at offload", layer.name, moved[0].entry.qualname, len(moved) - 1)
    for h in moved:
        getattr(h.owner, h.table)[h.attr] = h.entry.tensor
