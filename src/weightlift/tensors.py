"""What travels for one parameter or buffer, and how to put it back around other memory.

`take_apart` turns a tensor into its *leaves*, the plain tensors that hold its bytes, plus a way to
install new leaves in place:

- a plain tensor of any dtype is its own leaf (installed with ``.data =``);
- a traceable tensor subclass (torchao, optimum-quanto, DTensor and any class implementing
  ``__tensor_flatten__``/``__tensor_unflatten__``) is taken apart recursively and rebuilt around the new
  leaves, then swapped in with `torch.utils.swap_tensors` (``param.data = ...`` does not work for them);
- a ``Tensor`` subclass that owns real storage (bitsandbytes ``Params4bit``/``Int8Params``) is moved
  with ``.data =`` like a plain tensor; the quantization state it carries on attributes (absmax, code,
  nested state, ``SCB`` ...) is found by `attribute_tensors` and streamed as separate plain tensors;
- modules that keep state outside parameters and buffers (HQQ's ``meta`` dict, bitsandbytes' int8
  ``state`` object) are walked by `attribute_tensors` too;
- anything else (a wrapper subclass without ``__tensor_flatten__``) needs an adapter: see
  `weightlift.adapters`.
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
        if held.is_meta == leaves[0].is_meta:
            held.data = leaves[0]
        else:  # ``.data =`` cannot cross between meta and real tensors: swap the whole object
            new = leaves[0]
            if isinstance(held, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=held.requires_grad)
            torch.utils.swap_tensors(held, new)

    leaf = tensor.detach()
    if type(leaf) is not torch.Tensor:
        leaf = leaf.as_subclass(torch.Tensor)  # same storage, seen as a plain tensor
    return Parts([leaf], lambda leaves: leaves[0], install, "plain")


def _flatten(name: str, tensor: torch.Tensor) -> tuple[list[torch.Tensor], Callable]:
    """Leaves of a traceable wrapper subclass (recursively) and a function rebuilding it from new leaves.

    The function keeps only the structure (attribute names, leaf counts, the children's rebuild functions,
    class, ``ctx``, size and stride, and inner objects that are not tensors, as torch 2.13's DTensor flattens
    its DeviceMesh), never a weight: `Parts.build` outlives the original leaves, which
    must be freed once the offloaded copy is installed. ``ctx`` is non-tensor metadata by the
    ``__tensor_flatten__`` contract (the compiler treats it as a constant)."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return [tensor.detach()], _first
    if not is_traceable_wrapper_subclass(tensor):
        raise _unsupported(name, tensor)
    attrs, ctx = tensor.__tensor_flatten__()
    leaves: list[torch.Tensor] = []
    rebuilds: list[Callable] = []
    counts: list[int] = []
    for attr in attrs:
        value = getattr(tensor, attr)
        if not isinstance(value, torch.Tensor):  # an opaque inner object (a DTensor's DeviceMesh): kept as it is
            rebuilds.append(lambda _, value=value: value)
            counts.append(0)
            continue
        child_leaves, child_rebuild = _flatten(f"{name}.{attr}", value)
        leaves += child_leaves
        rebuilds.append(child_rebuild)
        counts.append(len(child_leaves))
    cls, size, stride = type(tensor), tensor.size(), tensor.stride()

    def rebuild(new: Sequence[torch.Tensor]) -> torch.Tensor:
        inner, start = {}, 0
        for attr, child, count in zip(attrs, rebuilds, counts):
            inner[attr] = child(new[start : start + count])
            start += count
        return cls.__tensor_unflatten__(inner, ctx, size, stride)

    return leaves, rebuild


def _first(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    return leaves[0]


def _subclass(name: str, tensor: torch.Tensor) -> Parts:
    leaves, rebuild = _flatten(name, tensor)
    is_parameter, requires_grad = isinstance(tensor, torch.nn.Parameter), tensor.requires_grad

    def build(new: Sequence[torch.Tensor]) -> torch.Tensor:  # keeps no tensor: see `_flatten`
        out = rebuild(new)
        if is_parameter:
            out = torch.nn.Parameter(out, requires_grad=requires_grad)
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


def _owns_storage(tensor: torch.Tensor) -> bool:
    try:
        return tensor.untyped_storage().data_ptr() != 0 or tensor.numel() == 0
    except (RuntimeError, NotImplementedError, TypeError):
        return False


_LEAF_TYPES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def attribute_tensors(obj: object, depth: int = 3) -> list[tuple[str, torch.Tensor]]:
    """Plain tensors that ``obj`` (a module or a tensor) holds outside parameters and buffers.

    Walks public attributes (and ``meta``-style dicts, and plain state objects such as a QuantState or a
    MatmulLtState) up to ``depth`` levels, never into modules, parameters or buffers, nor into the inner
    tensors a traceable wrapper subclass names in ``__tensor_flatten__`` (they are its leaves already: an
    entry of their own would keep the original objects alive after the subclass is rebuilt around new
    leaves). Returns ``(dotted path, tensor)`` pairs; each tensor is swapped in place with ``.data =``, so
    every holder of the same object sees the new memory.
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()

    def walk(value: object, path: str, level: int) -> None:
        if id(value) in seen or isinstance(value, (*_LEAF_TYPES, torch.nn.Module)):
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if type(value) is torch.Tensor and value.numel() and _owns_storage(value):
                found.append((path, value))
            return
        if level >= depth or callable(value):
            return
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items() if isinstance(k, str)]
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            items = [(k, v) for k, v in vars(value).items() if not k.startswith("_")]
        else:
            return
        for key, child in items:
            walk(child, f"{path}.{key}" if path else key, level + 1)

    if isinstance(obj, torch.nn.Module):
        skip = {*obj._parameters, *obj._buffers, *obj._modules}
        roots = [(k, v) for k, v in vars(obj).items() if not k.startswith("_") and k not in skip]
    else:
        inner = set(obj.__tensor_flatten__()[0]) if is_traceable_wrapper_subclass(obj) else set()
        roots = [(k, v) for k, v in getattr(obj, "__dict__", {}).items() if k not in inner]
    seen.add(id(obj))
    for key, value in roots:
        walk(value, key, 1)
    return found


def take_apart(name: str, tensor: torch.Tensor, adapters: Sequence = ()) -> Parts:
    """The leaves of ``tensor`` (a parameter or buffer called ``name``), or `OffloadError` naming it."""
    for adapter in adapters:
        if adapter.matches(tensor):
            parts = adapter.take_apart(tensor)
            parts.kind = f"adapter {adapter.name}"
            break
    else:
        if is_traceable_wrapper_subclass(tensor):
            parts = _subclass(name, tensor)
        elif type(tensor) in (torch.Tensor, torch.nn.Parameter) or _owns_storage(tensor):
            parts = _plain(tensor)
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
                parts.kind = f"storage subclass {type(tensor).__name__}"
        else:
            raise _unsupported(name, tensor)
    for leaf in parts.leaves:
        if leaf.is_quantized or leaf.layout != torch.strided:
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


def relocation(tensor: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Moving ``tensor`` (a parameter or buffer of any type) to ``device`` in place, in two steps: its copy
    on ``device`` is made now (this can fail, and then nothing has changed); the call returned puts the
    copy in place. As `take_apart` moves bytes: a wrapper subclass (torchao, quanto: their dispatch may not
    know ``.data =`` across devices) is copied with its own ``to`` and swapped in whole with
    `torch.utils.swap_tensors`, a parameter staying a parameter; any other tensor, a subclass over a
    storage of its own included (bitsandbytes, GGUF), keeps its object, class and attributes and takes
    the copied bytes with ``.data =`` (its own ``to`` may do more: bitsandbytes' int8 ``to`` drops the
    scales its first forward moved to the module; the quantization state it keeps in attributes is moved
    as tensors of their own). One mechanism for both ways: `offload` moving resident tensors to the
    device, `remove` moving them back."""
    if not is_traceable_wrapper_subclass(tensor):
        moved = tensor.data.to(device)

        def install() -> None:
            tensor.data = moved

        return install
    moved = tensor.to(device)
    rewrap = isinstance(tensor, torch.nn.Parameter) and not isinstance(moved, torch.nn.Parameter)
    new = torch.nn.Parameter(moved, tensor.requires_grad) if rewrap else moved
    return lambda: torch.utils.swap_tensors(tensor, new)
