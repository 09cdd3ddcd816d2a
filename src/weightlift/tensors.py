"""What travels for one parameter or buffer, and how to make a tensor over given bytes.

A plain tensor of any dtype travels as the bytes of its storage span. Tensor subclasses and
quantization state objects are not handled yet: they are refused with a clear error by `check_plain`.
"""

from __future__ import annotations

import torch

from .errors import OffloadError


def check_plain(name: str, tensor: torch.Tensor) -> None:
    """Refuse what cannot travel as plain bytes, naming the tensor and what to do instead."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor:
        raise OffloadError(
            f"`{name}` is a {type(data).__name__} tensor subclass, which this version cannot stream; keep it "
            "resident by narrowing OffloadConfig(params=...) to other parameters"
        )
    if tensor.is_quantized or tensor.layout != torch.strided:
        raise OffloadError(
            f"`{name}` is a {'legacy quantized' if tensor.is_quantized else str(tensor.layout)} tensor, which "
            "cannot be streamed; keep it resident by narrowing OffloadConfig(params=...)"
        )


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
