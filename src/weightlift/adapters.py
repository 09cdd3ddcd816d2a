"""Adapters: how to take apart tensor types that carry their bytes somewhere `tensors.py` cannot see.

weightlift needs no adapter for plain tensors of any dtype or for traceable tensor subclasses
(``__tensor_flatten__``/``__tensor_unflatten__``: torchao, optimum-quanto, DTensor ...). A tensor type
that keeps quantization state elsewhere gets an adapter: an object with

- ``name``: a short label for reports and errors;
- ``matches(tensor) -> bool``: whether it handles this tensor (duck-type on attributes: no class-name
  checks);
- ``take_apart(tensor) -> weightlift.tensors.Parts``: the plain tensors holding its bytes (``leaves``),
  ``build(leaves)`` returning a tensor that reads the given leaves (used for ``state_dict``), and
  ``install(held, leaves)`` making the object the module holds read them, in place. ``build`` and
  ``install`` live as long as the offload: they must not capture the original leaves (keep shapes, counts
  and metadata only), or the original weights are never freed.

Pass your own as ``weightlift.offload(model, adapters=[MyAdapter()])``; they are tried before the
built-in ones.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .tensors import Parts


@runtime_checkable
class Adapter(Protocol):
    name: str

    def matches(self, tensor: torch.Tensor) -> bool: ...

    def take_apart(self, tensor: torch.Tensor) -> Parts: ...


BUILTIN_ADAPTERS: tuple[Adapter, ...] = ()
