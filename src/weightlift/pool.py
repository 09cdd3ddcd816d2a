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


def pinned_empty(nbytes: int, pin: bool) -> tuple[torch.Tensor, int]:
    """A uint8 host buffer (pinned if ``pin``) and the host bytes it really took: the caching host
    allocator may round a pinned block up (to a power of two); where it reports that, it is counted."""
    before = _pinned_bytes() if pin else None
    buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    after = _pinned_bytes() if pin else None
    taken = after - before if before is not None and after is not None else 0
    return buffer, max(taken, buffer.untyped_storage().nbytes())


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
