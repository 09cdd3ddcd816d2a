"""The static device buffer pool: a fixed number of equal slots, allocated once at setup."""

from __future__ import annotations

import torch


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
