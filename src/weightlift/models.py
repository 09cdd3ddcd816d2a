"""Finding the layer stacks of a model: the `nn.ModuleList`s of blocks to offload, in execution order.

`find_stacks` tries, in order:

1. the paths the user names (``OffloadConfig(layers=...)``), exactly those, in the order given;
2. known diffusers layouts whose blocks are not all declared (below): a UNet's ``down_blocks`` then
   ``up_blocks`` (``mid_block`` between them stays resident); a Flux-style ``transformer_blocks`` then
   ``single_transformer_blocks``; such a parent's subtree yields no other stack;
3. the blocks the model declares unsplittable (``_no_split_modules`` of transformers' `PreTrainedModel` and
   diffusers' `ModelMixin`, gathered from every submodule, so the vision tower of a VLM counts too): the
   outermost lists whose items are all of those classes, in registration order;
4. for any other module, the largest list of blocks of one class, refused when an unrelated list is close in size.

Stacks from 2 and 3 may hold blocks of different classes and sizes. Stacks never overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .config import format_size
from .dtypes import nbytes
from .errors import OffloadError

log = logging.getLogger(__name__)

_LISTS = (nn.ModuleList, nn.Sequential)

# Attribute names under one parent that are the stacks of a known layout, in execution order.
KNOWN_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("down_blocks", "up_blocks"),  # diffusers UNets: down blocks, resident mid_block, up blocks
    ("transformer_blocks", "single_transformer_blocks"),  # Flux-style: double-stream, then single-stream blocks
)


def _param_bytes(module: nn.Module) -> int:
    # a sparse or other non-strided parameter has no storage to measure: its dense size, enough to compare
    # stacks by (`take_apart` refuses to offload it, naming it)
    return sum(nbytes(p) if p.layout == torch.strided else p.numel() * p.element_size() for p in module.parameters())


def _within(name: str, parent: str) -> bool:
    """Whether module ``name`` is ``parent`` or inside it (``""`` is the model itself)."""
    return not parent or name == parent or name.startswith(parent + ".")


def _is_stack(module: nn.Module) -> bool:
    children = list(module.children())
    return isinstance(module, _LISTS) and len(children) >= 2 and len({type(c) for c in children}) == 1


def candidate_stacks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every list of >= 2 blocks of one class, with its parameter bytes, largest first (``""``: the model
    itself is one, an ``nn.ModuleList`` or ``nn.Sequential`` of blocks)."""
    found = [(name, m, _param_bytes(m)) for name, m in model.named_modules() if _is_stack(m)]
    return sorted(found, key=lambda c: -c[2])


def _known_layouts(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """(parent path, its stacks) for each outermost module laid out as one of `KNOWN_LAYOUTS`."""
    found: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for name, module in model.named_modules():
        if any(_within(name, parent) for parent, _ in found):
            continue
        for layout in KNOWN_LAYOUTS:
            lists = [getattr(module, attr, None) for attr in layout]
            if all(isinstance(m, _LISTS) and len(m) > 0 for m in lists):
                prefix = f"{name}." if name else ""
                found.append((name, [(prefix + attr, m) for attr, m in zip(layout, lists)]))
                break
    return found


def no_split_classes(model: nn.Module) -> set[str]:
    """Class names that ``model`` or any submodule declares in ``_no_split_modules`` (a list, set, tuple or None)."""
    names: set[str] = set()
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, str):
            names.add(declared)
        elif declared:
            names.update(str(n) for n in declared)
    return names


def _declared(module: nn.Module, names: set[str]) -> bool:
    return any(k.__name__ in names for k in type(module).__mro__)


def _discover(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Stacks from known layouts and ``_no_split_modules`` (rules 2 and 3), in execution order; [] if none."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = _known_layouts(model)
    claimed = [parent for parent, _ in groups]
    names = no_split_classes(model)
    if names:
        chosen: list[str] = []
        for name, module in model.named_modules():
            if any(_within(name, p) for p in claimed) or any(_within(name, c) for c in chosen):
                continue
            if isinstance(module, _LISTS) and len(module) > 0 and all(_declared(b, names) for b in module):
                chosen.append(name)
                groups.append((name, [(name, module)]))
    groups.sort(key=lambda g: min(order[n] for n, _ in g[1]))
    stacks = [stack for _, stacks in groups for stack in stacks]
    if stacks:
        _warn_undeclared(model, stacks)
    return stacks


def _warn_undeclared(model: nn.Module, stacks: list[tuple[str, nn.Module]]) -> None:
    """Log a list of identical blocks outside the stacks found that is as large as one of them: a sub-model
    that declares no ``_no_split_modules`` (its layers stay resident unless the user names them)."""
    largest = max(_param_bytes(m) for _, m in stacks)
    for name, _, size in candidate_stacks(model):
        if size >= largest / 2 and not any(_within(name, s) or _within(s, name) for s, _ in stacks):
            found = ", ".join(f"'{s}'" for s, _ in stacks)
            log.warning(
                "`model` (%s): '%s' (%s) looks like a layer stack but its blocks are not declared in "
                "_no_split_modules, so it stays resident; to offload it, name every stack in OffloadConfig, "
                "`layers=[...]` (found: %s)", type(model).__name__, name, format_size(size), found,
            )  # fmt: skip


def _largest(model: nn.Module) -> tuple[str, nn.Module]:
    """Rule 4: the largest list of identical blocks, unless an unrelated list is at least half its size."""
    candidates = candidate_stacks(model)
    if not candidates:
        raise OffloadError(
            f"`model` ({type(model).__name__}) has no detectable layer stack (an nn.ModuleList of at least two "
            "blocks of one class): pass `layers='dotted.path'` in OffloadConfig to name it"
        )
    best_name, best, best_bytes = candidates[0]
    rivals = [
        (name, size)
        for name, _, size in candidates[1:]
        if size >= best_bytes / 2 and not _within(name, best_name) and not _within(best_name, name)
    ]
    if rivals:
        found = [(best_name, best_bytes), *rivals]
        listed = ", ".join(f"'{n}'" for n, _ in found)
        sizes = ", ".join(format_size(s) for _, s in found)
        raise OffloadError(
            f"`model` ({type(model).__name__}) has several layer stacks of similar size ({listed}: {sizes} of "
            f"parameters): name the ones to offload in OffloadConfig, one path (`layers='{best_name}'`) or a list "
            f"of paths in execution order (`layers=[{listed}]`)"
        )
    return best_name, best


def _listing(model: nn.Module) -> str:
    """The stacks found in ``model``, for error messages."""
    found = [name for name, _ in _discover(model)]
    found += [name for name, _, _ in candidate_stacks(model) if name not in found]
    return ", ".join(f"'{n}'" for n in found[:6]) or "none found"


def _which(layers: str | Sequence[str], path: str) -> str:
    return f"`layers`={path!r}" if isinstance(layers, str) else f"`layers`={list(layers)!r}: {path!r}"


def _named(model: nn.Module, layers: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    paths = [layers] if isinstance(layers, str) else list(layers) if isinstance(layers, (list, tuple)) else None
    if not paths or not all(isinstance(p, str) and (p or len(paths) == 1) for p in paths):
        raise OffloadError(
            f"`layers`={layers!r} must be a dotted module path like 'model.layers' or a non-empty list of them"
        )
    stacks = []
    for path in paths:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            raise OffloadError(
                f"{_which(layers, path)} does not exist in {type(model).__name__}; layer stacks in this "
                f"model: {_listing(model)}"
            ) from None
        if not isinstance(stack, _LISTS) or len(stack) == 0:
            raise OffloadError(
                f"{_which(layers, path)} is a {type(stack).__name__}, not a non-empty nn.ModuleList or "
                f"nn.Sequential of layers: name the list that holds the blocks (layer stacks in this model: "
                f"{_listing(model)})"
            )
        stacks.append((path, stack))
    for i, (a, stack_a) in enumerate(stacks):
        for b, stack_b in stacks[i + 1 :]:
            if _within(a, b) or _within(b, a) or stack_a is stack_b:
                raise OffloadError(
                    f"`layers`={list(layers)!r}: {a!r} and {b!r} overlap (the same list, or one inside the other); a "
                    "layer can be offloaded once: name each stack once, and none inside another"
                )
    return stacks


def find_stacks(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The layer stacks to offload, as (dotted path, list module), in execution order.

    ``layers``, a dotted path or a list of them, names the stacks (in that order) instead of detecting them.
    Raises `OffloadError` when a named path is missing or not a non-empty list of modules, when named stacks
    overlap, when the model has no stack, or when a plain module has unrelated lists close in size.
    """
    if layers is not None:
        return _named(model, layers)
    return _discover(model) or [_largest(model)]
