"""The memory and prefetch report of an offloaded model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import format_size


@dataclass(frozen=True)
class OffloadReport:
    """Exact figures for one `OffloadHandle`. Bytes are storage bytes (quantized as stored)."""

    device: str
    source: str  # where the offloaded layers' true weights live: "host" (RAM) or the cache file's path
    stack: str  # dotted path of the offloaded layer stack
    layers: int  # layers in the stack
    layers_offloaded: int
    offloaded_bytes: int  # weights of the offloaded layers, as stored
    resident_bytes: int  # parameters and buffers kept on the device (everything not offloaded)
    pool_bytes: int  # device memory of the slot pool
    slots: int
    slot_bytes: int
    host_bytes: int  # host RAM allocated for master copies (0 when the originals serve as masters)
    prefetch_step: int
    copies: int  # layer copies issued so far (prefetches and synchronous loads)
    prefetch_hits: int
    prefetch_misses: int  # layers that ran before their copy was started: loaded synchronously
    replaced: int = 0  # offloaded tensors a format replaced during a forward: now resident, see the log

    @property
    def saved_bytes(self) -> int:
        """Device memory saved by offloading: offloaded weights minus the pool that replaces them."""
        return self.offloaded_bytes - self.pool_bytes

    @property
    def device_bytes(self) -> int:
        """Device memory held by weights: resident plus pool."""
        return self.resident_bytes + self.pool_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "saved_bytes": self.saved_bytes, "device_bytes": self.device_bytes}

    def __str__(self) -> str:
        rows = [
            ("device", self.device),
            ("weights streamed from", self.source),
            ("layer stack", f"{self.stack} ({self.layers_offloaded} of {self.layers} layers offloaded)"),
            ("offloaded weights", format_size(self.offloaded_bytes)),
            ("resident weights", format_size(self.resident_bytes)),
            ("device pool", f"{format_size(self.pool_bytes)} ({self.slots} slots x {format_size(self.slot_bytes)})"),
            ("device memory saved", format_size(self.saved_bytes)),
            ("host RAM for masters", format_size(self.host_bytes)),
            ("prefetch", f"step {self.prefetch_step}: {self.copies} copies, "
                         f"{self.prefetch_hits} hits, {self.prefetch_misses} misses"),
            *([("replaced after offload", f"{self.replaced} tensors (now resident; see the log)")]
              if self.replaced else []),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
