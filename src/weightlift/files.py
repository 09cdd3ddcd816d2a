"""The files the disk tiers read (a layer cache, a safetensors checkpoint): their headers, reads straight
into memory, an open file remembered by size and mtime, and a private mapping of one.

Used by `disk` (the layer cache weightlift writes) and `checkpoint` (the model's own files); neither
knows the other. ``PAGE``: the page size that mapped layers are aligned to.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .dtypes import leaf_span
from .errors import OffloadError
from .storage import ALIGN

PAGE = 4096


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor``'s elements, in row-major order, as a flat memoryview of host memory: the
    tensor itself when it is a contiguous CPU tensor, else a host copy of this one tensor (a tensor in
    accelerator memory comes over with ``.to("cpu")``). Every reader of a model's bytes goes through here."""
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def read_header(path: Path, fix: str = "delete it to rebuild the cache") -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data starts; `OffloadError` naming what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise OffloadError(f"`{path}` is truncated ({size} bytes): {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise OffloadError(f"`{path}` has a corrupt header (length {n}): {fix}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OffloadError(f"`{path}` has a corrupt header (not JSON): {fix}") from None
    except OSError as err:
        raise OffloadError(f"cannot read `{path}`: {err.strerror}") from None
    if not isinstance(header, dict):
        raise OffloadError(f"`{path}` has a corrupt header: {fix}")
    return header, 8 + n


def pread_into(fd: int, view: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file or a failed read is an `OffloadError` naming
    ``what`` and the file."""
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise OffloadError(
                f"cannot read `{what}` from `{path}`: {err.strerror or err}; check the file and its disk (weightlift "
                "reads it again the next time it is needed)"
            ) from None
        if got <= 0:
            raise OffloadError(f"`{path}` ended while reading `{what}`: the file was truncated")
        done += got


IN_FILE = "_weightlift_in_file"  # set on a resident tensor that is a view of its file (see `map_range`)


def in_file(t: torch.Tensor) -> bool:
    """Whether ``t`` is a resident weight computed on in its file (`map_range`): its bytes are the page
    cache's, read as they are used, and held by no budget."""
    return bool(getattr(t, IN_FILE, False)) and t.device.type == "cpu"


def map_range(path: Path, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` whose bytes are ``path``'s from ``offset``, mapped privately (copy
    on write: the file is never written) and read only where used (MADV_RANDOM: a looked-up row reads its
    own pages, not the read-ahead window around them). ``offset`` must be a multiple of the element size."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mm.madvise(mmap.MADV_RANDOM)
    count = math.prod(shape)
    flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
    return flat.view(tuple(shape))


def fresh_leaf(spec: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """A new CPU tensor shaped like ``spec`` and a writable byte view over it."""
    span = leaf_span(spec)
    buffer = torch.empty(round_up(span, ALIGN), dtype=torch.uint8)
    out = torch.empty(0, dtype=spec.dtype).set_(buffer.untyped_storage(), 0, spec.shape, spec.stride())
    return out, memoryview(buffer.numpy()).cast("B")[:span]


class Stamped:
    """An open file remembered by size and mtime: reading it after it changed is an `OffloadError`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self._stamp = (st.st_size, st.st_mtime_ns)
        self.drop_calls = 0  # `drop`'s fadvise calls (counted by a test)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read_exactly(self) -> None:
        """Reads of this file read what they ask for, no further (POSIX_FADV_RANDOM instead of the sequential
        read-ahead it was opened with). For the files of a MoE, read expert by expert: the read-ahead after
        one expert's bytes reads the experts beside it, which nobody chose (a cold decode token read 1.5-1.9x
        its needs into slots, `tests/test_experts.py`)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def drop(self, spans: Sequence[tuple[int, int]]) -> None:
        """Hand the page cache's copies of ``spans`` (``(offset, length)`` pairs) back to the kernel
        (POSIX_FADV_DONTNEED; adjacent spans in one call). For layers read into slots from a file bigger than
        the page cache: left there, each one read makes the kernel reclaim an older one first. Reading 436 MiB
        layers of the 8B checkpoint with 3.7 GiB available and a thread computing beside (`make
        bench-read-paths`, 6 rounds): 0.50-0.91 GB/s left to the page cache, 0.93-1.49 handed back, 1.29-1.58
        with ``O_DIRECT`` (4 reads in flight, bounce buffers): within the noise of handed back, for a second read
        path, its buffers and its threads, so the read tiers hand pages back instead."""
        if not hasattr(os, "posix_fadvise"):
            return
        merged: list[list[int]] = []
        for at, n in sorted(spans):
            if merged and at <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], at + n)
            else:
                merged.append([at, at + n])
        for begin, end in merged:
            os.posix_fadvise(self.fd, begin, end - begin, os.POSIX_FADV_DONTNEED)
            self.drop_calls += 1

    def check(self) -> None:
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise OffloadError(
                f"`{self.path}` changed after setup (size or mtime): call `handle.remove()` and offload again"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# What one MADV_WILLNEED call reads at most, from the kernel's side: the larger of the device's read-ahead
# window and its largest IO. Asking for more in one call reads only the start; larger chunks are cut there.
WILLNEED_CHUNK = 128 * 1024


def _libc_mincore():
    """libc's ``mincore``, or None where there is none (then every page counts as absent)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int
    return fn


_MINCORE = _libc_mincore()


class MappedFile:
    """One file mapped privately (copy-on-write), as a uint8 tensor, with page-granular advice.

    ``advice_calls`` counts the madvise calls made, by advice (a test counts them: pages already in the page
    cache are never advised to be read)."""

    def __init__(self, file: Stamped) -> None:
        self.file = file
        self._mm = mmap.mmap(file.fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._willneed_chunk: int | None = None  # MADV_WILLNEED in calls of at most this many bytes
        self.advice_calls: Counter[int] = Counter()

    def cached(self, start: int, length: int) -> float:
        """The fraction of the pages of ``[start, start + length)`` that the page cache holds now (the kernel's
        ``mincore``: one call, no page touched); 0.0 where it cannot be asked."""
        begin, end = self._pages(start, length)
        if _MINCORE is None or end <= begin or self.bytes is None:
            return 0.0
        pages = np.zeros((end - begin + PAGE - 1) // PAGE, dtype=np.uint8)
        if _MINCORE(self.bytes.data_ptr() + begin, end - begin, pages.ctypes.data) != 0:
            return 0.0
        return float(np.count_nonzero(pages & 1)) / len(pages)

    def willneed(self, start: int, length: int) -> None:
        """Have the kernel read ``[start, start + length)`` ahead, unless the page cache holds all of it (then
        no call at all: on a warm page cache the advice itself cost a third of a SmolLM2 token)."""
        if self.cached(start, length) < 1.0:
            self.advise(mmap.MADV_WILLNEED, start, length)

    def read_exactly(self) -> None:
        """Pages are read only as asked: a fault reads its page alone (MADV_RANDOM), and MADV_WILLNEED is asked
        a read-ahead window per call, so that all of a range is read. For the files of a MoE: otherwise a
        dense layer's faults set the kernel reading on through the experts after it (a cold decode token read
        3.8-4.7x its needs on the mapped tier, `tests/test_experts.py`). Dense models keep the read-ahead:
        without it, SmolLM2's cold decode token took 2x as long."""
        self._mm.madvise(mmap.MADV_RANDOM)
        self._willneed_chunk = WILLNEED_CHUNK

    def _pages(self, start: int, length: int) -> tuple[int, int]:
        """The whole pages (``[begin, end)``, within the file) that hold ``[start, start + length)``."""
        return start - start % PAGE, min(round_up(start + length), len(self._mm))

    def advise(self, advice: int, start: int, length: int) -> None:
        begin, end = self._pages(start, length)
        step = (self._willneed_chunk if advice == mmap.MADV_WILLNEED else None) or max(end - begin, 1)
        for at in range(begin, end, step):
            self._mm.madvise(advice, at, min(step, end - at))
            self.advice_calls[advice] += 1

    def close(self) -> None:
        self.bytes = None
        with contextlib.suppress(BufferError):  # a tensor view is still held: the mapping goes when it does
            self._mm.close()
