"""What travels for one parameter or buffer, and how to put it back around other memory.

`take_apart` turns a tensor into its *leaves*, the plain tensors that hold its bytes, plus a way to
install new leaves in place:

- a plain tensor of any dtype is its own leaf (installed with ``.data =``);
- a traceable tensor subclass (torchao, optimum-quanto, DTensor and any class implementing
  ``__tensor_flatten__``/``__tensor_unflatten__``) is taken apart recursively and rebuilt around the new
  leaves, then swapped in with `torch.utils.swap_tensors` (``param.data = ...`` does not work for them);
- anything else (a ``Tensor`` subclass carrying quantization state on attributes) needs an adapter:
  see `weightlift.adapters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .errors import OffloadError


@dataclass
class Parts:
    """The leaves of one tensor and how to rebuild or reinstall it around other leaves."""

    leaves: list[torch.Tensor]
    build: Callable[[Sequence[torch.Tensor]], torch.Tensor]  # a new tensor over the given leaves
    install: Callable[[torch.Tensor, Sequence[torch.Tensor]], None]  # make the held tensor use them
    kind: str  # "plain", "subclass <name>" or "adapter <name>", for messages and reports


def _plain(tensor: torch.Tensor) -> Parts:
    def install(held: torch.Tensor, leaves: Sequence[torch.Tensor]) -> None:
        held.data = leaves[0]

    return Parts([tensor.detach()], lambda leaves: leaves[0], install, "plain")


def _flatten(name: str, tensor: torch.Tensor) -> tuple[list[torch.Tensor], Callable]:
    """Leaves of a traceable wrapper subclass (recursively) and a function rebuilding it from new leaves."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return [tensor.detach()], lambda leaves: leaves[0]
    if not is_traceable_wrapper_subclass(tensor):
        raise _unsupported(name, tensor)
    attrs, ctx = tensor.__tensor_flatten__()
    children = [_flatten(f"{name}.{a}", getattr(tensor, a)) for a in attrs]
    counts = [len(leaves) for leaves, _ in children]
    cls, size, stride = type(tensor), tensor.size(), tensor.stride()

    def rebuild(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        inner, start = {}, 0
        for attr, (_, child), count in zip(attrs, children, counts):
            inner[attr] = child(leaves[start : start + count])
            start += count
        return cls.__tensor_unflatten__(inner, ctx, size, stride)

    return [leaf for leaves, _ in children for leaf in leaves], rebuild


def _subclass(name: str, tensor: torch.Tensor) -> Parts:
    leaves, rebuild = _flatten(name, tensor)

    def build(new: Sequence[torch.Tensor]) -> torch.Tensor:
        out = rebuild(new)
        if isinstance(tensor, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        return out

    def install(held: torch.Tensor, new: Sequence[torch.Tensor]) -> None:
        torch.utils.swap_tensors(held, build(new))

    return Parts(leaves, build, install, f"subclass {type(tensor).__name__}")


def _unsupported(name: str, tensor: torch.Tensor) -> OffloadError:
    return OffloadError(
        f"`{name}` is a {type(tensor).__module__}.{type(tensor).__name__}, which weightlift cannot take apart: "
        "it neither implements __tensor_flatten__/__tensor_unflatten__ nor matches an adapter. Implement the "
        "weightlift.adapters.Adapter protocol for it and pass it as offload(..., adapters=[...]), or keep it "
        "resident by narrowing OffloadConfig(params=...)"
    )


def take_apart(name: str, tensor: torch.Tensor, adapters: Sequence = ()) -> Parts:
    """The leaves of ``tensor`` (a parameter or buffer called ``name``), or `OffloadError` naming it."""
    for adapter in adapters:
        if adapter.matches(tensor):
            parts = adapter.take_apart(tensor)
            parts.kind = f"adapter {adapter.name}"
            break
    else:
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            parts = _plain(tensor)
        elif is_traceable_wrapper_subclass(tensor):
            parts = _subclass(name, tensor)
        else:
            raise _unsupported(name, tensor)
    for leaf in parts.leaves:
        if leaf.is_quantized or leaf.layout != torch.strided or type(leaf) is not torch.Tensor:
            raise OffloadError(
                f"`{name}` holds a {'legacy quantized' if leaf.is_quantized else str(leaf.layout)} tensor, which "
                "cannot be streamed as bytes; keep it resident by narrowing OffloadConfig(params=...)"
            )
    return parts


def byte_view(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A uint8 tensor over bytes ``[start, end)`` of ``tensor``'s storage."""
    whole = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    whole.set_(tensor.untyped_storage(), 0, (tensor.untyped_storage().nbytes(),))
    return whole[start:end]


def typed_view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor with ``like``'s dtype, shape and strides whose element 0 sits ``offset`` bytes into the
    uint8 tensor ``buffer``."""
    itemsize = like.element_size()
    start = buffer.storage_offset() + offset
    if start % itemsize:
        raise AssertionError(f"misaligned view: byte {start} for itemsize {itemsize}")
    out = torch.empty(0, dtype=like.dtype, device=buffer.device)
    return out.set_(buffer.untyped_storage(), start // itemsize, like.shape, like.stride())
