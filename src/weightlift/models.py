"""Finding the repeated layer stack of a model: the `nn.ModuleList` of identical blocks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .dtypes import nbytes
from .errors import OffloadError


def _param_bytes(module: nn.Module) -> int:
    return sum(nbytes(p) for p in module.parameters())


def _is_stack(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, (nn.ModuleList, nn.Sequential))
        and len(children) >= 2
        and len({type(c) for c in children}) == 1
    )


def candidate_stacks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """Every list of >= 2 blocks of one class, with its parameter bytes, largest first."""
    found = [(name, m, _param_bytes(m)) for name, m in model.named_modules() if name and _is_stack(m)]
    return sorted(found, key=lambda c: -c[2])


def find_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.Module]:
    """The stack to offload: ``path`` if given, else the largest list of identical blocks.

    Raises `OffloadError` when ``path`` does not name a list of modules, when the model has no such
    list, or when two unrelated lists are close in size (an encoder and a decoder, say).
    """
    if path is not None:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            names = ", ".join(f"'{n}'" for n, _, _ in candidate_stacks(model)[:5]) or "none found"
            raise OffloadError(
                f"`layers`={path!r} does not exist in {type(model).__name__}; layer stacks in this model: {names}"
            ) from None
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) == 0:
            raise OffloadError(
                f"`layers`={path!r} is a {type(stack).__name__}, not a non-empty nn.ModuleList or "
                "nn.Sequential of layers: name the list that holds the blocks"
            )
        return path, stack
    candidates = candidate_stacks(model)
    if not candidates:
        raise OffloadError(
            f"`model` ({type(model).__name__}) has no detectable layer stack (an nn.ModuleList of at least two "
            "blocks of one class): pass `layers='dotted.path'` in OffloadConfig to name it"
        )
    best_name, best, best_bytes = candidates[0]
    rivals = [
        name
        for name, _, size in candidates[1:]
        if size >= best_bytes / 2 and not name.startswith(best_name + ".") and not best_name.startswith(name + ".")
    ]
    if rivals:
        listed = ", ".join(f"'{n}'" for n in [best_name, *rivals])
        raise OffloadError(
            f"`model` ({type(model).__name__}) has several layer stacks of similar size ({listed}): "
            "pass `layers=` in OffloadConfig to choose one"
        )
    return best_name, best


def find_stacks(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The layer stacks to offload, as (dotted path, list module), in execution order."""
    if layers is None or isinstance(layers, str):
        return [find_stack(model, layers)]
    return [find_stack(model, path) for path in layers]
