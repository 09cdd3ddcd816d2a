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
