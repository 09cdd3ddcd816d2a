"""Exact byte sizes for every torch dtype, without `finfo`/`iinfo`/bit widths.

vLLM's offloader sized parameters with ``torch.finfo(dtype).bits // 8``, which raises on every integer
dtype that quantized checkpoints use. Sizes here come from the dtype's storage element and from the
tensor's storage, so packed and sub-byte dtypes (``quint4x2``, ``float4_e2m1fn_x2``, ``uint4`` ...) are
counted as stored.
"""

from __future__ import annotations

import torch


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes of one storage element of ``dtype`` (what ``Tensor.element_size()`` returns)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {dtype!r}")
    return dtype.itemsize


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` of the storage that ``tensor`` can read."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    if tensor.numel() == 0:
        return start, start
    last = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()) if n > 0)
    return start, start + (last + 1) * size


def leaf_span(tensor: torch.Tensor) -> int:
    """Bytes from ``tensor``'s element 0 to the end of its last element (meta tensors too)."""
    start, end = _span(tensor)
    return end - start


def storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range of ``tensor``'s storage that it covers. Packed quantized dtypes cover their storage."""
    if tensor.is_quantized:
        return 0, tensor.untyped_storage().nbytes()
    start, end = _span(tensor)
    return start, min(end, tensor.untyped_storage().nbytes())


def nbytes(tensor: torch.Tensor) -> int:
    """Bytes that ``tensor`` occupies in its storage: what must travel to move it."""
    start, end = storage_span(tensor)
    return end - start
