"""The static device buffer pool (a fixed number of equal slots, allocated once at setup), and host
buffers counted as the allocator really takes them."""

from __future__ import annotations

import torch


def _pinned_bytes() -> int | None:
    """Bytes of pinned host blocks the CUDA host allocator has handed out (rounded as it rounds them)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return None
    try:
        return int(stats().get("active_bytes.current"))
    except (RuntimeError, TypeError, ValueError):
        return None


def pinned_size(nbytes: int, pin: bool) -> int:
    """Host bytes a block of ``nbytes`` takes where the backend does not report it: a pinned block is
    rounded up to a power of two by caching host allocators, a pageable one is what was asked."""
    return 1 << max(nbytes - 1, 0).bit_length() if pin and nbytes > 0 else nbytes


def pinned_empty(nbytes: int, pin: bool) -> tuple[torch.Tensor, int]:
    """A uint8 host buffer (pinned if ``pin``) and the host bytes it really took: caching host allocators
    round a pinned block up to a power of two. Where the backend reports its pinned bytes (CUDA, ROCm)
    the real growth is counted; elsewhere a pinned block counts as the power of two it may be rounded to."""
    before = _pinned_bytes() if pin else None
    buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    after = _pinned_bytes() if pin else None
    measured = before is not None and after is not None
    taken = after - before if measured else pinned_size(nbytes, pin)
    return buffer, max(taken, buffer.untyped_storage().nbytes())


ARENA_PARTS = 32  # the arena granule is at most 1/32 of the total: at most ~3% rounding


def arena_sizes(total: int, align: int = 512) -> list[int]:
    """Sizes of the host blocks that hold ``total`` bytes of layers: powers of two, largest first, so that
    an allocator rounding up to a power of two takes exactly what is asked. Their sum exceeds ``total``
    by less than one granule (a power of two, at most ``total / ARENA_PARTS``, at least ``align``)."""
    if total <= 0:
        return []
    granule = max(align, 1 << max((total // ARENA_PARTS).bit_length() - 1, 0))
    units = -(-total // granule)
    return [granule << bit for bit in range(units.bit_length() - 1, -1, -1) if units >> bit & 1]


class HostArena:
    """Host memory for every offloaded layer's master, in a few blocks (`arena_sizes`), so that no
    per-layer block is rounded up. Layers are laid end to end; a layer may span two blocks."""

    def __init__(self, total: int, pin: bool) -> None:
        allocated = [pinned_empty(size, pin) for size in arena_sizes(total)]
        self.blocks = [block for block, _ in allocated]
        self.nbytes = sum(taken for _, taken in allocated)  # host bytes really taken
        self._used = 0

    def take(self, nbytes: int) -> list[tuple[int, torch.Tensor]]:
        """The next ``nbytes``: ``(offset in the request, uint8 view)`` per block they fall in."""
        chunks, done, start = [], 0, self._used
        for block in self.blocks:
            size = block.numel()
            if start < size and done < nbytes:
                end = min(size, start + nbytes - done)
                chunks.append((done, block[start:end]))
                done += end - start
                start = end
            start -= size
        if done < nbytes:
            raise AssertionError(f"host arena exhausted: {nbytes - done} bytes short")
        self._used += nbytes
        return chunks


class DevicePool:
    """``n_slots`` uint8 buffers of ``slot_bytes`` each on ``device``; never grows."""

    def __init__(self, n_slots: int, slot_bytes: int, device: torch.device) -> None:
        self.device = device
        self.slot_bytes = slot_bytes
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(n_slots)]

    @property
    def nbytes(self) -> int:
        return sum(s.untyped_storage().nbytes() for s in self.slots)

    def __len__(self) -> int:
        return len(self.slots)
