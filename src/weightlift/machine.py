"""What this machine has now: memory available to a run, read from the kernel (``/proc``)."""

from __future__ import annotations


def proc_kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``field: N kB`` line of a /proc file (``/proc/meminfo``, ``/proc/self/status``), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_ram() -> int | None:
    """The kernel's estimate of the RAM a new allocation can have without swapping (``MemAvailable``: free
    memory plus the page cache and slabs it can reclaim), or None where there is no ``/proc/meminfo``."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def margin(available: int) -> int:
    """What a budget found from ``available`` memory leaves to everything else (the OS, other programs, the
    page cache a read goes through, the allocator's slack): a sixth of it, at least 512 MiB and at most 2 GiB.
    An eighth (at least 256 MiB) left an 8B model with 3.7 GiB available killed by the kernel."""
    return min(max(available // 6, 512 << 20), 2 << 30)


def free_memory(device) -> tuple[int | None, str]:
    """Memory a run on ``device`` (a `torch.device`) can have now, and where the figure comes from: on a CPU,
    the kernel's ``MemAvailable``; on an accelerator, its free memory (``torch.cuda.mem_get_info`` or
    ``torch.accelerator``'s counters). None when it cannot be told."""
    import torch

    if device.type == "cpu":
        return available_ram(), "available RAM (MemAvailable)"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    return None, f"free memory of {device}"


def room(available: int) -> int:
    """What a run given no budget may hold where ``available`` bytes are free (`free_memory`): that less
    `margin`, rounded down (to 64 MiB from a GiB up, to a MiB from 64 MiB, else to 64 KiB: the same figure run
    after run, so that a plan saved for it is found again)."""
    left = max(available - margin(available), 0)
    step = 64 << 20 if left >= 1 << 30 else 1 << 20 if left >= 64 << 20 else 64 << 10
    return left // step * step
