"""What a model's layers hold, touching nothing: every tensor by dotted name (parameters, buffers, and
tensors in plain attributes), the plain leaves behind each, which layers share a storage, and the entries
a config would offload per layer. `apply` offloads from it; `measure` sizes plans with it."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import OffloadConfig
from .dtypes import storage_span
from .errors import OffloadError
from .storage import Entry, Layout, storage_key
from .tensors import attribute_tensors, take_apart

log = logging.getLogger(__name__)


def tensors_of(root: nn.Module, with_attributes: bool = True) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(dotted name, tensor, persistent) for every parameter and buffer of ``root`` (shared ones repeated),
    and, ``with_attributes``, every tensor held in plain attributes (see `attribute_tensors`)."""
    for mname, m in root.named_modules(remove_duplicate=False):
        dot = f"{mname}." if mname else ""
        for attr, t in m._parameters.items():
            if t is not None:
                yield dot + attr, t, True
                if with_attributes:
                    yield from ((f"{dot}{attr}.{path}", a, True) for path, a in attribute_tensors(t))
        for attr, t in m._buffers.items():
            if t is not None:
                yield dot + attr, t, attr not in m._non_persistent_buffers_set
        if with_attributes:
            yield from ((dot + path, a, True) for path, a in attribute_tensors(m))


def leaves_of(name: str, t: torch.Tensor, adapters: Sequence) -> list[torch.Tensor] | None:
    """The plain tensors behind ``t``, or None for a type weightlift cannot take apart (harmless as long as
    it is not offloaded: it stays resident, and is neither counted nor streamed)."""
    try:
        return take_apart(name, t, adapters).leaves
    except OffloadError:
        return None


def _keys(name: str, t: torch.Tensor, adapters: Sequence) -> set[tuple]:
    """Storages a tensor reads; a tensor that cannot be taken apart is keyed by itself."""
    leaves = leaves_of(name, t, adapters)
    return {("object", id(t))} if leaves is None else {storage_key(leaf) for leaf in leaves}


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    spans: dict[tuple, list[int]] = {}
    for t in tensors:
        start, end = storage_span(t)
        span = spans.setdefault(storage_key(t), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return sum(end - start for start, end in spans.values())


def layer_list(stacks: Sequence[tuple[str, nn.Module]]) -> tuple[list[str], list[nn.Module]]:
    """The layers of one or several stacks as one list, in order: their dotted names and modules."""
    names = [f"{name}.{i}" if name else str(i) for name, stack in stacks for i in range(len(stack))]
    return names, [layer for _, stack in stacks for layer in stack]


def _owner(name: str, index_of: dict[str, int]) -> int:
    """Position of the layer whose subtree holds the tensor at dotted ``name``, or -1."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        found = index_of.get(".".join(parts[:end]))
        if found is not None:
            return found
    return -1


def _owners(model: nn.Module, names: list[str], adapters: Sequence) -> dict[tuple, set[int]]:
    """Per storage, the positions of the layers whose tensors read it (-1: outside every layer)."""
    index_of = {name: i for i, name in enumerate(names)}
    owners: dict[tuple, set[int]] = defaultdict(set)
    for name, t, _ in tensors_of(model):
        owner = _owner(name, index_of)
        if t.numel():
            for key in _keys(name, t, adapters):
                owners[key].add(owner)
    return owners


def layer_entries(
    index: int, layer: nn.Module, prefix: str, owners: dict, config: OffloadConfig, adapters: Sequence, quiet=False
) -> list[Entry]:
    """The entries of layer ``index`` that ``config`` selects; `OffloadError` for one that cannot travel."""
    entries: list[Entry] = []
    seen: set[int] = set()
    for qualname, t, persistent in tensors_of(layer):
        if id(t) in seen or not persistent or t.numel() == 0:
            continue
        seen.add(id(t))
        if not config.offloads_param(qualname):
            continue
        parts = take_apart(f"{prefix}.{qualname}", t, adapters)  # refuses what cannot travel
        if any(owners[storage_key(leaf)] != {index} for leaf in parts.leaves):
            if not quiet:
                log.info("keeping `%s.%s` resident: it is shared with other modules", prefix, qualname)
            continue
        entries.append(Entry(qualname, t, parts, t.device))
    return entries


def every_layout(model: nn.Module, names: list[str], layers: list[nn.Module], config: OffloadConfig,
                  adapters: Sequence, layouts: dict[int, Layout]) -> dict[int, Layout]:
    """The layouts of every layer that ``config`` would offload if it offloaded every layer (the same
    ``params``): what the model's one layer cache holds, whichever layers a plan offloads. ``layouts``
    (the offloaded ones) are taken as they are; a layer that cannot travel is left out. Touches nothing."""
    owners = _owners(model, names, adapters)
    every = {}
    for index, layer in enumerate(layers):
        if index in layouts:
            every[index] = layouts[index]
            continue
        try:
            entries = layer_entries(index, layer, names[index], owners, config, adapters, quiet=True)
        except OffloadError:
            continue
        if entries:
            every[index] = Layout.of(entries)
    return every


def collect(model: nn.Module, names: list[str], layers: list[nn.Module], config: OffloadConfig, adapters: Sequence):
    """Entries to offload per layer position, and the parameters and buffers kept resident. Touches nothing."""
    owners = _owners(model, names, adapters)
    entries: dict[int, list[Entry]] = {}
    chosen: set[int] = set()
    for index, layer in enumerate(layers):
        if not config.offloads_layer(index):
            continue
        found = layer_entries(index, layer, names[index], owners, config, adapters)
        if found:
            entries[index] = found
            chosen.update(id(e.tensor) for e in found)
    if config.params and not entries:
        raise OffloadError(
            f"`params`={config.params!r} matches no parameter of the offloaded layers; names inside a layer "
            f"look like {[q for q, *_ in tensors_of(layers[0], with_attributes=False)][:4]}"
        )
    resident = {}  # quantization state held in attributes too (HQQ's `meta`): it goes to the device as well
    for _, t, _ in tensors_of(model):
        if id(t) not in chosen:
            resident[id(t)] = t
    return entries, list(resident.values())
