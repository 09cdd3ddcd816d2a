"""`OffloadConfig` and size parsing: the only place where strings like "4GiB" become bytes."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .errors import OffloadError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512 MB"`` or ``"1.5g"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OffloadError(f"`{name}` must be an int of bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise OffloadError(f"`{name}` must be >= 0 bytes, got {value}")
        return value
    match = _SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise OffloadError(
            f"`{name}`={value!r} is not a size: write a number with an optional unit, e.g. '4GiB', '512MB', '100000'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: int) -> str:
    """Human-readable binary size, for logs and reports."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OffloadError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """Which layers of the stack to offload and how far ahead to prefetch them.

    Layer ``i`` of the stack is offloaded when ``i % group_size >= group_size - num_in_group``
    (vLLM's rule): ``group_size=1, num_in_group=1`` offloads every layer, ``group_size=4,
    num_in_group=1`` every fourth. After offloaded layer ``k`` runs, the copy of the
    ``prefetch_step``-th next offloaded layer starts (0: no prefetch, each layer is loaded synchronously when
    it runs and counted as a miss; for measurements). ``params`` restricts offloading to parameters
    whose dotted name (inside the layer) has one of the given segments, e.g. ``("mlp",)``.
    ``layers`` names the stack (``"model.layers"``), or several (``("encoder.block", "decoder.block")``, in
    execution order), instead of detecting them; several stacks are numbered as one list, in order; ``""``
    names the model itself (an ``nn.ModuleList`` or ``nn.Sequential`` of blocks, found without naming too).
    ``indices`` offloads exactly these positions of that list instead of the group rule (plans use it).

    ``source="disk"`` keeps the offloaded layers' true weights in a layer cache file under the folder
    ``disk_path`` instead of host RAM (written on first use, reused after), and reads each layer ahead
    straight into its slot; ``source="checkpoint"`` reads them in place from the safetensors checkpoint
    in the folder ``disk_path`` (nothing written). ``host_budget`` (bytes or "512MiB") caps the RAM the
    pool and staging may take; a plan that needs more is refused with the minimum. With ``source="disk"``
    on a CPU target the cache is mapped and layers are computed on in place, with no copy (``mmap=True``,
    the default); ``mmap=False`` reads each layer into a pool slot instead.

    Mixture-of-experts layers move at expert granularity (`weightlift.experts`): ``experts="auto"`` (the
    default) finds the expert stacks of each offloaded layer by structure and moves each layer's dense part
    ahead, and after its router runs only the experts it chose; ``experts=None`` moves whole layers;
    ``experts=True`` is "auto" that refuses a model without experts; a module path inside the layer (or
    a tuple of them, ``fnmatch`` patterns allowed, e.g. ``"mlp.experts"``) names the stacks. ``expert_lookahead``
    also moves ahead the experts a layer is predicted to use: ``"previous"`` (those of its last forward) or
    ``"router"`` (its router applied to the previous MoE layer's input); None (the default) predicts nothing.
    ``expert_cache`` keeps that many experts (an int), or as many as fit in that many bytes (``"2GiB"``), in
    a device cache beside the slots (`weightlift.expert_cache`): a chosen expert it holds is copied from
    device memory, not over the link; ``expert_cache_policy`` (``"lru"``, the default, or ``"lfu"``) says
    which expert leaves it for a new one. None (the default): no cache.
    """

    group_size: int = 1
    num_in_group: int = 1
    prefetch_step: int = 2
    params: tuple[str, ...] = ()
    layers: str | tuple[str, ...] | None = None
    indices: tuple[int, ...] | None = None
    source: str = "host"
    disk_path: str | os.PathLike | None = None
    host_budget: int | str | None = None
    mmap: bool = True
    experts: bool | str | tuple[str, ...] | None = "auto"
    expert_lookahead: str | None = None
    expert_cache: int | str | None = None
    expert_cache_policy: str = "lru"

    def __post_init__(self) -> None:
        _positive_int("group_size", self.group_size)
        _positive_int("num_in_group", self.num_in_group)
        if isinstance(self.prefetch_step, bool) or not isinstance(self.prefetch_step, int) or self.prefetch_step < 0:
            raise OffloadError(
                f"`prefetch_step` must be an int >= 0 (0 turns prefetch off), got {self.prefetch_step!r}"
            )
        if self.num_in_group > self.group_size:
            raise OffloadError(
                f"`num_in_group`={self.num_in_group} is larger than `group_size`={self.group_size}: "
                "at most every layer of a group can be offloaded; lower `num_in_group`"
            )
        params = self.params
        if isinstance(params, str):
            raise OffloadError(f"`params` must be a tuple of name segments, e.g. ({params!r},), not a string")
        try:
            params = tuple(params)
        except TypeError:
            raise OffloadError(f"`params` must be a tuple of name segments, got {self.params!r}") from None
        for segment in params:
            if not isinstance(segment, str) or not segment or segment.strip(".") != segment:
                raise OffloadError(
                    f"`params` entries must be non-empty dotted name segments like 'mlp' or 'self_attn.q_proj', "
                    f"got {segment!r}"
                )
        object.__setattr__(self, "params", params)
        if self.source not in ("host", "disk", "checkpoint"):
            raise OffloadError(
                "`source` must be 'host' (RAM), 'disk' (a layer cache file) or 'checkpoint' (the model's "
                f"safetensors files, read in place), got {self.source!r}"
            )
        if self.source != "host" and not self.disk_path:
            raise OffloadError(f"`source`={self.source!r} needs `disk_path`, a folder")
        if self.source == "host" and self.disk_path is not None:
            raise OffloadError("`disk_path` is given but `source`='host': pass source='disk' to stream from disk")
        if not isinstance(self.mmap, bool):
            raise OffloadError(f"`mmap` must be True or False, got {self.mmap!r}")
        if self.experts is False:
            object.__setattr__(self, "experts", None)
        elif self.experts is not None and self.experts is not True and self.experts != "auto":
            names = (self.experts,) if isinstance(self.experts, str) else self.experts
            try:
                names = tuple(names)
            except TypeError:
                names = (None,)
            if not names or any(not isinstance(n, str) or not n.strip(".") for n in names):
                raise OffloadError(
                    "`experts` must be 'auto', True, None, or a module path inside a layer like 'mlp.experts' "
                    f"(or a tuple of them), got {self.experts!r}"
                )
            object.__setattr__(self, "experts", names)
        if self.expert_lookahead not in (None, "previous", "router"):
            raise OffloadError(
                f"`expert_lookahead` must be None, 'previous' or 'router', got {self.expert_lookahead!r}"
            )
        if isinstance(self.expert_cache, str):
            parse_size(self.expert_cache, name="expert_cache")  # a size (bytes); `apply` counts the experts it holds
        elif self.expert_cache is not None and (isinstance(self.expert_cache, bool)
                                                or not isinstance(self.expert_cache, int) or self.expert_cache < 1):
            raise OffloadError(
                "`expert_cache` must be a number of experts (an int >= 1), a size like '2GiB', or None (no cache), "
                f"got {self.expert_cache!r}"
            )
        if self.expert_cache is not None and self.experts is None:
            raise OffloadError(
                "`expert_cache` is set but `experts`=None moves whole layers: keep experts='auto' (the default) "
                "to stream experts through the cache, or drop expert_cache"
            )
        if self.expert_cache_policy not in ("lru", "lfu"):
            raise OffloadError(f"`expert_cache_policy` must be 'lru' or 'lfu', got {self.expert_cache_policy!r}")
        if self.host_budget is not None:
            object.__setattr__(self, "host_budget", parse_size(self.host_budget, name="host_budget"))
        if self.layers is not None:
            paths = (self.layers,) if isinstance(self.layers, str) else self.layers
            try:
                paths = tuple(paths)
            except TypeError:
                paths = (None,)
            if paths != ("",) and (not paths or any(not isinstance(p, str) or not p.strip() for p in paths)):
                raise OffloadError(
                    "`layers` must be a dotted module path like 'model.layers' or a tuple of them ('' alone: the "
                    f"model itself, an nn.ModuleList or nn.Sequential of blocks), got {self.layers!r}"
                )
            object.__setattr__(self, "layers", self.layers if isinstance(self.layers, str) else paths)
        if self.indices is not None:
            try:
                indices = tuple(self.indices)
            except TypeError:
                indices = (None,)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                raise OffloadError(f"`indices` must be a tuple of layer positions (ints >= 0), got {self.indices!r}")
            object.__setattr__(self, "indices", tuple(sorted(set(indices))))

    def offloads_layer(self, index: int) -> bool:
        if self.indices is not None:
            return index in self.indices
        return index % self.group_size >= self.group_size - self.num_in_group

    def offloads_param(self, name: str) -> bool:
        """Whether the parameter at dotted ``name`` (relative to its layer) is selected by ``params``."""
        if not self.params:
            return True
        dotted = f".{name}."
        return any(f".{segment}." in dotted for segment in self.params)


def resolve_device(device: str | torch.device | int | None) -> torch.device:
    """The target device, checked against what this machine has."""
    if device is None:
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = acc if acc is not None else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OffloadError(
            f"`device`={device!r} is not a device torch knows: use 'cpu', 'cuda', 'cuda:1', 'xpu', 'mps' ..."
        ) from None
    if dev.type == "cpu":
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None or acc.type != dev.type:
        have = acc.type if acc is not None else "only the CPU"
        raise OffloadError(
            f"`device`={device!r} is not available on this machine (it has {have}): pass a device it has"
        )
    index = torch.accelerator.current_device_index() if dev.index is None else dev.index
    if index >= torch.accelerator.device_count():
        raise OffloadError(
            f"`device`={device!r}: this machine has {torch.accelerator.device_count()} {dev.type} device(s)"
        )
    return torch.device(dev.type, index)
