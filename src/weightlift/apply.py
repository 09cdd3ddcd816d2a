"""`apply()`: validate everything first, then move weights and install hooks, rolling back on error."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import BUILTIN_ADAPTERS, Adapter
from .checkpoint import CheckpointFiles, CheckpointIndex
from .config import OffloadConfig, format_size
from .disk import DiskMaster, open_cache
from .distributed import cache_suffix, group_of
from .engine import StagedEngine, StagingRing, StreamEngine, ThreadEngine, Transfer
from .errors import OffloadError
from .expert_cache import ExpertCache, entries_for
from .expert_streams import ExpertStreams, Mover
from .experts import LayerExperts, find_experts, nbytes_of
from .files import in_file
from .hooks import LayerHook, OffloadedLayer, OffloadHandle, is_offloaded
from .inventory import collect, every_layout, layer_list, leaves_of, tensors_of, unique_bytes
from .machine import available_ram, margin
from .models import find_stacks
from .pool import DevicePool, HostArena
from .schedule import MappedPrefetcher, Prefetcher, make_schedule
from .storage import HostMaster, Layout
from .streams import streams_for
from .tensors import relocation
from .window import MappedWindow

log = logging.getLogger(__name__)


def _transfer(layer: OffloadedLayer, slot: torch.Tensor, ranges: list[tuple[int, int]] | None) -> Transfer:
    """The move of ``layer`` (or of the byte ranges ``ranges`` of its layout) into ``slot``."""
    master = layer.master
    nbytes = master.layout.nbytes if ranges is None else nbytes_of(ranges)
    if isinstance(master, HostMaster):
        return Transfer(layer.name, slot, nbytes, pairs=master.pairs(slot, ranges))
    return Transfer(layer.name, slot, nbytes, read=lambda buffer: master.read(buffer, ranges), ranges=ranges)


def _experts(config: OffloadConfig, names: list[str], layers: list[nn.Module], schedule, layouts: dict,
             stack_name: str) -> dict[int, LayerExperts]:  # fmt: skip
    """Per offloaded position, its expert units (`weightlift.experts`); empty for ``experts=None``."""
    if config.experts is None:
        return {}
    named = None if config.experts in ("auto", True) else config.experts
    units = {}
    for position, index in enumerate(schedule.offloaded):
        stacks = find_experts(layers[index], named, names[index])
        found = LayerExperts.of(layouts[index], stacks, names[index]) if stacks else None
        if found is not None:
            units[position] = found
    if not units and (config.experts is True or named is not None):
        what = f"`experts`={config.experts!r}" if named else "`experts`=True"
        raise OffloadError(
            f"{what}: no offloaded layer of `{stack_name}` has a stack of experts (a module whose parameters lead "
            "with the expert count, or a ModuleList of experts, beside a router): the model is dense, or its "
            "experts stay resident; pass experts=None to stream whole layers"
        )
    return units


def _routers(handle: OffloadHandle, units: dict[int, LayerExperts], dev: torch.device) -> dict:
    """For the router lookahead: per position and stack, a resident copy of the router's weight (or None)."""
    out = {}
    for position, layer in enumerate(handle.layers):
        if position not in units:
            continue
        weights = []
        for stack in units[position].stacks:
            name = f"{stack.stack.router}.weight" if stack.stack.router else None
            entry = next((e for e in layer.master.layout.entries if e.qualname == name), None)
            if entry is not None and entry.parts.kind == "plain":
                weight = layer.master.leaves(entry)[0]
            else:
                weight = layer.module.get_parameter(name) if name else None
            plain = weight is not None and type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point()
            weights.append(weight.detach().to(dev, copy=True) if plain and not weight.is_meta else None)
        out[position] = weights
    return out


def _engine_and_jobs(handle: OffloadHandle, schedule, ring_slabs: int, slot_bytes: int):
    """The copy engine and each offloaded position's transfer into its slot (its dense part, for MoE layers)."""
    jobs = []
    experts = handle.experts
    for position, layer in enumerate(handle.layers):
        slot = handle.pool.slots[schedule.slot_of[position]]
        jobs.append(_transfer(layer, slot, experts.dense(position) if experts is not None else None))
    streams = handle.streams
    if streams is None:
        return ThreadEngine(handle.timeline), jobs
    if ring_slabs:
        handle.ring = StagingRing(ring_slabs, slot_bytes, streams)
        return StagedEngine(streams, schedule.n_slots, handle.timeline, handle.ring), jobs
    return StreamEngine(streams, schedule.n_slots, handle.timeline), jobs


class _SlotMover:
    """`expert_streams.Mover` for slots: experts copied (or read) into a layer's slot by its copy engine."""

    def __init__(self, handle: OffloadHandle, schedule) -> None:
        self.handle, self.slot_of = handle, schedule.slot_of

    def _job(self, p: int, ranges: list) -> Transfer:
        return _transfer(self.handle.layers[p], self.handle.pool.slots[self.slot_of[p]], ranges)

    def ahead(self, p: int, ranges: list) -> object:
        return self.handle.engine.start(self._job(p, ranges), self.slot_of[p])

    def now(self, p: int, ranges: list, pending: object, present: list) -> None:
        if ranges:
            self.handle.engine.load_now(self._job(p, ranges), self.slot_of[p], pending)
        elif pending is not None:
            self.handle.engine.wait(pending)

    def slot(self, p: int) -> torch.Tensor:
        return self.handle.pool.slots[self.slot_of[p]]

    def copy_now(self, p: int, pairs: list) -> None:
        self.handle.engine.copy_now(self.handle.layers[p].name, pairs)


class _MappedMover:
    """`expert_streams.Mover` for a mapped file: experts read ahead by the kernel (compute faults on the rest)."""

    def __init__(self, mapping, indices: Sequence[int]) -> None:
        self.mapping, self.indices = mapping, indices

    def ahead(self, p: int, ranges: list) -> None:
        self.mapping.willneed(self.indices[p], ranges)

    def now(self, p: int, ranges: list, pending: object, present: list) -> None:
        if ranges or present:
            self.mapping.willneed(self.indices[p], sorted(ranges + present))

    def slot(self, p: int) -> torch.Tensor:
        raise AssertionError("a mapped file has no slots: `apply` refuses an expert cache there")

    def copy_now(self, p: int, pairs: list) -> None:
        raise AssertionError("a mapped file has no slots: `apply` refuses an expert cache there")


def _window(config: OffloadConfig, sizes: list[int], plan: Any) -> MappedWindow:
    """The mapped tier's window (`weightlift.window`): the smaller of ``host_budget`` and the pool of the plan
    this came from, when either is known, else the RAM available now less a margin."""
    given = [b for b in (config.host_budget, getattr(plan, "pool_bytes", None)) if b is not None]
    if given:
        limit, why = min(given), "the budget"
    else:
        available = available_ram()
        limit, why = None if available is None else available - margin(available), "the RAM available now"
    window = MappedWindow.within(sizes, limit)
    log.info(
        "weightlift: %d of %d mapped layers stay mapped once they ran (a %s window, from %s)", len(window.kept),
        len(sizes), format_size(window.nbytes), why,
    )  # fmt: skip
    return window


def _resident_bytes(resident: Sequence[torch.Tensor], adapters: Sequence[Adapter]) -> tuple[int, int]:
    """The bytes of the resident tensors, and of those among them computed on in their file (`files.in_file`)."""
    counted, mapped = [], []
    for t in resident:
        if in_file(t):
            mapped.append(t)
            continue
        leaves = leaves_of("resident tensor", t, adapters)
        if leaves is None:
            log.info("resident %s not counted in resident_bytes: weightlift cannot take it apart", type(t).__name__)
        counted += leaves or []
    return unique_bytes(counted), unique_bytes(mapped)


def _dropped_after_read(sizes: list[int], pool_bytes: int) -> set[int]:
    """The offloaded positions, read into slots from a file, whose pages the page cache is not to keep.

    Left to itself the page cache keeps every layer read; when it cannot hold them all, a cyclic scan through
    the layers evicts each one just before it is read again (no hits), and every read waits on the kernel
    reclaiming an older one. So the first positions that fit in the RAM available now (less a margin and the
    slots not yet touched) keep their pages, as `MappedWindow.within` keeps them mapped, and the others hand
    theirs back once read (`files.Stamped.drop`): none when everything fits."""
    available = available_ram()
    if available is None:
        return set()
    kept = MappedWindow.within(sizes, available - margin(available) - pool_bytes).kept
    if len(kept) < len(sizes):
        log.info(
            "weightlift: the page cache keeps %d of %d streamed layers (%s available); the others' pages are "
            "handed back once read", len(kept), len(sizes), format_size(available),
        )  # fmt: skip
    return set(range(len(sizes))) - kept


def move_to(handle: OffloadHandle, tensors: Sequence[torch.Tensor], dev: torch.device) -> None:
    """Move resident tensors to ``dev`` in place, recording where they were for `remove()`."""
    for t in tensors:
        if t.device != dev:
            install = relocation(t, dev)
            handle.moved.append((t, t.device))
            install()


def _out_of_memory(dev: torch.device, err: BaseException, pool_bytes: int) -> OffloadError:
    """What to say when the device had no room for the resident weights and the pool (the model is back)."""
    said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OffloadError(
        f"`device`={str(dev)!r} ran out of memory while offloading ({said[:300]}); the resident weights need room "
        f"beside a pool of {format_size(pool_bytes)}: pass a `budget` and weightlift plans what fits "
        "(resident weights and pool), or offload more layers and lower `prefetch_step`; the model is as it was"
    )


def refuse_offloaded(model: nn.Module) -> None:
    """`OffloadError` for a model that is offloaded already (its handle must be removed first)."""
    if is_offloaded(model):
        raise OffloadError(
            f"`model` ({type(model).__name__}) is already offloaded: call `remove()` on its handle before "
            "offloading it again"
        )


@torch.inference_mode(False)  # slots and masters must be normal tensors: the copy thread runs outside the mode
def apply(
    model: nn.Module, dev: torch.device, config: OffloadConfig, adapters: Sequence[Adapter] = (), plan: Any = None
) -> OffloadHandle:
    """Offload ``model`` to ``dev`` as ``config`` says (`weightlift.offload` without its ways of saying how:
    the config is known, the device resolved). ``plan``, the `Plan` it came from, is kept on the handle.
    Raises `OffloadError`, leaving the model as it was, for anything that cannot work."""
    refuse_offloaded(model)
    group = group_of(model)  # a tensor-parallel rank's shard: (rank, world size), else None
    stacks = find_stacks(model, config.layers)
    stack_name = "+".join(name for name, _ in stacks)
    names, layers = layer_list(stacks)
    if config.indices is not None and config.indices and config.indices[-1] >= len(layers):
        raise OffloadError(
            f"`indices`={config.indices!r} names position {config.indices[-1]}, but `{stack_name}` has "
            f"{len(layers)} layers (positions 0-{len(layers) - 1})"
        )
    adapters = (*adapters, *BUILTIN_ADAPTERS)
    entries, resident = collect(model, names, layers, config, adapters)
    kept = {id(t) for t in resident}
    for name, t, _ in tensors_of(model, with_attributes=False):
        if t.is_meta and id(t) in kept:
            raise OffloadError(
                f"`{name}` is on the meta device (no data) and is not offloaded: load the weights before "
                "offloading; only offloaded layers may stay on meta, streamed from a layer cache or a checkpoint"
            )
    meta = [f"{names[i]}.{e.qualname}" for i, es in entries.items() for e in es if e.tensor.is_meta]
    if meta and config.source == "host":
        raise OffloadError(
            f"`{meta[0]}` is on the meta device (no data): load the weights before offloading, or stream them "
            "from disk with OffloadConfig(source='disk' or 'checkpoint', disk_path=...)"
        )
    schedule = make_schedule(sorted(entries), config.prefetch_step)
    layouts = {i: Layout.of(entries[i]) for i in schedule.offloaded}
    units = _experts(config, names, layers, schedule, layouts, stack_name)
    slot_bytes = max((layout.nbytes for layout in layouts.values()), default=0)
    streams = streams_for(dev)  # None: a CPU target, where disk reads go straight into the slot
    mapped = config.source != "host" and config.mmap and streams is None  # compute on the mapped files
    if mapped and config.expert_cache is not None:
        raise OffloadError(
            f"`expert_cache`={config.expert_cache!r} needs slots, but source={config.source!r} with mmap=True on a "
            "CPU target computes on the mapped file (the page cache is its cache): pass mmap=False to read layers "
            "into slots, or drop expert_cache"
        )
    where = {p: layers[i] for p, i in enumerate(schedule.offloaded)}
    cache_entries, entry_bytes = entries_for(config, units, where, stack_name, getattr(model, "config", None))
    pool_bytes = slot_bytes if mapped else schedule.n_slots * slot_bytes + cache_entries * entry_bytes
    if config.host_budget is not None and streams is None and pool_bytes > config.host_budget:
        raise OffloadError(
            f"`host_budget`={config.host_budget} bytes is below the {pool_bytes} bytes this plan needs "
            f"({1 if mapped else schedule.n_slots} slots of {slot_bytes}"
            f"{f' and {cache_entries} cached experts of {entry_bytes}' if cache_entries else ''}); raise it or lower "
            "`prefetch_step`"
        )
    cache, ring_slabs = None, 0
    if config.source != "host" and streams is not None:  # disk -> host staging ring -> device
        ring_slabs = 2 if config.host_budget is None else min(2, config.host_budget // max(slot_bytes, 1))
        if ring_slabs < 1:
            raise OffloadError(
                f"`host_budget`={config.host_budget} bytes is below the {slot_bytes} bytes of one staging slab "
                "(the largest offloaded layer); raise it"
            )
    if config.source != "host":
        folder = Path(config.disk_path).expanduser()
        materialized = not any(e.tensor.is_meta for es in entries.values() for e in es)
        if config.source == "disk":
            every = every_layout(model, names, layers, config, adapters, layouts)
            cache = open_cache(folder, stack_name, layouts, materialized, every, type(model).__name__,
                               cache_suffix(group))
            del every  # the layers not offloaded stay resident; their layouts were needed for the write only
        else:
            cache = CheckpointFiles.open(CheckpointIndex(folder, model), names, layouts)
            try:
                if materialized:
                    cache.check_equal(layouts)
            except BaseException:
                cache.close()
                raise
    handle = OffloadHandle(model, dev, stack_name, len(layers), schedule.step, streams)
    handle.plan = plan
    handle.cache = cache
    try:
        mapping = cache.map() if mapped else None  # None: a checkpoint that cannot be mapped is read instead
        if units and cache is not None:  # a MoE's files: what a token chose is asked for, the kernel reads no more
            cache.read_exactly()
        handle.pool = DevicePool(0 if mapping else schedule.n_slots, slot_bytes, dev)
        sizes = [layouts[i].nbytes for i in schedule.offloaded]
        window = _window(config, sizes, plan) if mapping else None
        move_to(handle, resident, dev)
        read = cache is not None and mapping is None  # read into slots from a file
        dropped = _dropped_after_read(sizes, handle.pool.nbytes if dev.type == "cpu" else 0) if read else set()
        handle.resident_bytes, handle.in_file_bytes = _resident_bytes(resident, adapters)
        copied = streams is not None or any(s.device.type != "cpu" for lay in layouts.values() for s in lay.sources)
        if cache is None and copied:  # masters in host memory of their own (pinned for an accelerator)
            pin = streams is not None and streams.pin
            handle.arena = HostArena(sum(layouts[i].nbytes for i in schedule.offloaded), pin)
        for position, index in enumerate(schedule.offloaded):
            if cache is not None:
                master = DiskMaster(layouts[index], cache, index, drop=position in dropped)
            elif handle.arena is not None:
                master = HostMaster.copied(layouts[index], handle.arena)
            else:
                master = HostMaster.in_place(layouts[index])
            layer = OffloadedLayer(index, names[index], layers[index], master)
            handle.layers.append(layer)
            for entry in master.layout.entries:
                if mapping is not None:
                    views = mapping.views(index, entry)
                else:
                    views = entry.views(handle.pool.slots[schedule.slot_of[position]])
                entry.parts.install(entry.tensor, views)
            master.release_originals()  # with a copy, the original storages can now be freed
        experts = None
        if units:
            routers = _routers(handle, units, dev) if config.expert_lookahead == "router" else None
            copies = [w for ws in (routers or {}).values() for w in ws if w is not None]
            handle.resident_bytes += sum(w.numel() * w.element_size() for w in copies)  # the lookahead's routers
            modules = {p: layer.module for p, layer in enumerate(handle.layers)}
            detected = config.experts in ("auto", True)
            policy = config.expert_cache_policy
            on_device = ExpertCache(cache_entries, entry_bytes, dev, policy) if cache_entries else None
            handle.experts = experts = ExpertStreams(
                units, modules, config.expert_lookahead, routers, detected, on_device
            )
        if mapping is not None:
            handle.engine = None
            indices, timeline = schedule.offloaded, handle.timeline
            named = [layer.name for layer in handle.layers]
            dense = experts.dense if experts is not None else lambda p: None

            def willneed(p: int) -> None:
                timeline.timed("copy", "copy", named[p], lambda: mapping.willneed(indices[p], dense(p)))

            handle.prefetcher = prefetcher = MappedPrefetcher(
                schedule,
                willneed=willneed,
                release=lambda p: mapping.release(indices[p]),
                check=mapping.check,
                loaded=experts.loaded if experts is not None else None,
                # a MoE layer's pages faulting in would read the disk's read-ahead window around them, most
                # of it experts nobody chose; asked for once more, its dense part is read exactly
                again=(lambda p: mapping.willneed(indices[p], dense(p)) if dense(p) else None) if experts else None,
                window=window,
                cached=lambda p: mapping.cached(indices[p]),
            )
            mover: Mover = _MappedMover(mapping, indices)
        else:
            handle.engine, jobs = _engine_and_jobs(handle, schedule, ring_slabs, slot_bytes)
            handle.prefetcher = prefetcher = Prefetcher(
                schedule, handle.engine, jobs, loaded=experts.loaded if experts is not None else None
            )
            mover = _SlotMover(handle, schedule)
        if experts is not None:
            experts.install(mover)
        for position, layer in enumerate(handle.layers):
            hook = LayerHook(prefetcher, position, layer, handle.timeline, handle.graphs, handle.occupancy)
            handle.install_hooks(layer, hook)
        prefetcher.prime()
    except BaseException as err:
        handle.remove()
        if isinstance(err, torch.OutOfMemoryError):
            raise _out_of_memory(dev, err, pool_bytes) from err
        raise
    report = handle.report()
    log.info(
        "weightlift: %d of %d layers of `%s` offloaded to %s; %s of weights replaced by a %s pool (%d slots): "
        "%s of device memory saved",
        report.layers_offloaded, report.layers, stack_name, dev, format_size(report.offloaded_bytes),
        format_size(report.pool_bytes), report.slots, format_size(report.saved_bytes),
    )  # fmt: skip
    return handle
