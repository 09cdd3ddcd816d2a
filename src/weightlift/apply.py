"""`offload()`: validate everything first, then move weights and install hooks, rolling back on error."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .adapters import BUILTIN_ADAPTERS, Adapter
from .checkpoint import CheckpointFiles, CheckpointIndex
from .config import OffloadConfig, format_size
from .disk import DiskMaster, open_cache
from .dtypes import storage_span
from .engine import StagedEngine, StagingRing, StreamEngine, ThreadEngine, Transfer
from .errors import OffloadError
from .expert_streams import ExpertStreams, Mover
from .experts import LayerExperts, find_experts, nbytes_of
from .hooks import LayerHook, OffloadedLayer, OffloadHandle, is_offloaded
from .models import find_stacks
from .plan import Plan, check_plan
from .plan import plan as make_plan
from .pool import DevicePool, HostArena
from .schedule import MappedPrefetcher, Prefetcher, make_schedule
from .storage import Entry, HostMaster, Layout, storage_key
from .streams import streams_for
from .tensors import attribute_tensors, take_apart

log = logging.getLogger(__name__)


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


def _tensors(root: nn.Module, with_attributes: bool = True) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(dotted name, tensor, persistent) for every parameter and buffer of ``root`` (shared ones repeated),
    and, ``with_attributes``, every tensor held in plain attributes (see `attribute_tensors`)."""
    for mname, m in root.named_modules(remove_duplicate=False):
        dot = f"{mname}." if mname else ""
        for attr, t in m._parameters.items():
            if t is not None:
                yield dot + attr, t, True
                if with_attributes:
                    yield from ((f"{dot}{attr}.{path}", a, True) for path, a in attribute_tensors(t))
        for attr, t in m._buffers.items():
            if t is not None:
                yield dot + attr, t, attr not in m._non_persistent_buffers_set
        if with_attributes:
            yield from ((dot + path, a, True) for path, a in attribute_tensors(m))


def _leaves(name: str, t: torch.Tensor, adapters: Sequence) -> list[torch.Tensor] | None:
    """The plain tensors behind ``t``, or None for a type weightlift cannot take apart (harmless as long as
    it is not offloaded: it stays resident, and is neither counted nor streamed)."""
    try:
        return take_apart(name, t, adapters).leaves
    except OffloadError:
        return None


def _keys(name: str, t: torch.Tensor, adapters: Sequence) -> set[tuple]:
    """Storages a tensor reads; a tensor that cannot be taken apart is keyed by itself."""
    leaves = _leaves(name, t, adapters)
    return {("object", id(t))} if leaves is None else {storage_key(leaf) for leaf in leaves}


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    spans: dict[tuple, list[int]] = {}
    for t in tensors:
        start, end = storage_span(t)
        span = spans.setdefault(storage_key(t), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    return sum(end - start for start, end in spans.values())


def layer_list(stacks: Sequence[tuple[str, nn.Module]]) -> tuple[list[str], list[nn.Module]]:
    """The layers of one or several stacks as one list, in order: their dotted names and modules."""
    names = [f"{name}.{i}" if name else str(i) for name, stack in stacks for i in range(len(stack))]
    return names, [layer for _, stack in stacks for layer in stack]


def _owner(name: str, index_of: dict[str, int]) -> int:
    """Position of the layer whose subtree holds the tensor at dotted ``name``, or -1."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        found = index_of.get(".".join(parts[:end]))
        if found is not None:
            return found
    return -1


def _owners(model: nn.Module, names: list[str], adapters: Sequence) -> dict[tuple, set[int]]:
    """Per storage, the positions of the layers whose tensors read it (-1: outside every layer)."""
    index_of = {name: i for i, name in enumerate(names)}
    owners: dict[tuple, set[int]] = defaultdict(set)
    for name, t, _ in _tensors(model):
        owner = _owner(name, index_of)
        if t.numel():
            for key in _keys(name, t, adapters):
                owners[key].add(owner)
    return owners


def _layer_entries(
    index: int, layer: nn.Module, prefix: str, owners: dict, config: OffloadConfig, adapters: Sequence, quiet=False
) -> list[Entry]:
    """The entries of layer ``index`` that ``config`` selects; `OffloadError` for one that cannot travel."""
    entries: list[Entry] = []
    seen: set[int] = set()
    for qualname, t, persistent in _tensors(layer):
        if id(t) in seen or not persistent or t.numel() == 0:
            continue
        seen.add(id(t))
        if not config.offloads_param(qualname):
            continue
        parts = take_apart(f"{prefix}.{qualname}", t, adapters)  # refuses what cannot travel
        if any(owners[storage_key(leaf)] != {index} for leaf in parts.leaves):
            if not quiet:
                log.info("keeping `%s.%s` resident: it is shared with other modules", prefix, qualname)
            continue
        entries.append(Entry(qualname, t, parts, t.device))
    return entries


def _every_layout(model: nn.Module, names: list[str], layers: list[nn.Module], config: OffloadConfig,
                  adapters: Sequence, layouts: dict[int, Layout]) -> dict[int, Layout]:
    """The layouts of every layer that ``config`` would offload if it offloaded every layer (the same
    ``params``): what the model's one layer cache holds, whichever layers a plan offloads. ``layouts``
    (the offloaded ones) are taken as they are; a layer that cannot travel is left out. Touches nothing."""
    owners = _owners(model, names, adapters)
    every = {}
    for index, layer in enumerate(layers):
        if index in layouts:
            every[index] = layouts[index]
            continue
        try:
            entries = _layer_entries(index, layer, names[index], owners, config, adapters, quiet=True)
        except OffloadError:
            continue
        if entries:
            every[index] = Layout.of(entries)
    return every


def _collect(model: nn.Module, names: list[str], layers: list[nn.Module], config: OffloadConfig, adapters: Sequence):
    """Entries to offload per layer position, and the parameters and buffers kept resident. Touches nothing."""
    owners = _owners(model, names, adapters)
    entries: dict[int, list[Entry]] = {}
    chosen: set[int] = set()
    for index, layer in enumerate(layers):
        if not config.offloads_layer(index):
            continue
        found = _layer_entries(index, layer, names[index], owners, config, adapters)
        if found:
            entries[index] = found
            chosen.update(id(e.tensor) for e in found)
    if config.params and not entries:
        raise OffloadError(
            f"`params`={config.params!r} matches no parameter of the offloaded layers; names inside a layer "
            f"look like {[q for q, *_ in _tensors(layers[0], with_attributes=False)][:4]}"
        )
    resident = {}
    for _, t, _ in _tensors(model, with_attributes=False):
        if id(t) not in chosen:
            resident[id(t)] = t
    return entries, list(resident.values())


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


class _MappedMover:
    """`expert_streams.Mover` for a mapped file: experts read ahead by the kernel (compute faults on the rest)."""

    def __init__(self, mapping, indices: Sequence[int]) -> None:
        self.mapping, self.indices = mapping, indices

    def ahead(self, p: int, ranges: list) -> None:
        self.mapping.willneed(self.indices[p], ranges)

    def now(self, p: int, ranges: list, pending: object, present: list) -> None:
        if ranges or present:
            self.mapping.willneed(self.indices[p], sorted(ranges + present))


def _move(handle: OffloadHandle, tensors: Sequence[torch.Tensor], dev: torch.device) -> None:
    """Move resident tensors to ``dev`` in place, recording where they were for `remove()`."""
    for t in tensors:
        if t.device != dev:
            handle.moved.append((t, t.device))
            moved = t.to(dev)
            if type(t) in (torch.Tensor, nn.Parameter):
                t.data = moved
            else:
                new = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
                torch.utils.swap_tensors(t, new)


DENOISERS = ("transformer", "unet", "prior", "decoder")


def _offload_pipeline(pipe, device, **how) -> OffloadHandle:
    """A diffusers pipeline: its denoiser (``transformer`` or ``unet``) is offloaded, its other modules
    (text encoders, VAE) go to the device whole; `remove()` puts every one back."""
    denoiser = next((getattr(pipe, n) for n in DENOISERS if isinstance(getattr(pipe, n, None), nn.Module)), None)
    if denoiser is None:
        names = ", ".join(f"`{k}`" for k, v in pipe.components.items() if isinstance(v, nn.Module)) or "none"
        raise OffloadError(
            f"`model` ({type(pipe).__name__}) is a pipeline without a `transformer` or `unet`: offload the component "
            f"that holds the layers (its modules: {names})"
        )
    handle = offload(denoiser, device=device, **how)
    try:
        others = {id(m): m for m in pipe.components.values() if isinstance(m, nn.Module) and m is not denoiser}
        tensors = {id(t): t for m in others.values() for t in (*m.parameters(), *m.buffers())}
        _move(handle, list(tensors.values()), handle.device)
        handle.resident_bytes += _unique_bytes([t for t in tensors.values() if type(t) in (torch.Tensor, nn.Parameter)])
    except BaseException:
        handle.remove()
        raise
    return handle


@torch.inference_mode(False)  # slots and masters must be normal tensors: the copy thread runs outside the mode
def offload(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    config: OffloadConfig | None = None,
    budget: int | str | None = None,
    plan: Plan | None = None,
    adapters: Sequence[Adapter] = (),
) -> OffloadHandle:
    """Stream ``model``'s layer stack through a fixed pool of device buffers; everything else goes to ``device``.

    Say how with one of: ``budget`` (device memory for weights, e.g. "6GiB": `weightlift.plan` measures
    and chooses), ``plan`` (a saved `Plan`, refused for another model or device) or ``config`` (explicit
    knobs; the default offloads every layer with prefetch step 1).
    Returns an `OffloadHandle`; ``handle.remove()`` (or leaving ``with offload(...)``) restores the model
    bit for bit. ``adapters`` teach it tensor types it cannot take apart by itself (`weightlift.adapters`).
    Raises `OffloadError`, leaving the model as it was, for anything that cannot work.
    May be called inside ``torch.inference_mode()``. A diffusers pipeline may be passed: its ``transformer``
    or ``unet`` is offloaded and its other modules go to ``device`` whole; for a budget, make the plan for
    the denoiser with a sample input (``plan(pipe.unet, budget=..., sample=...)``) and pass ``plan=``.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "components", None), dict):
        return _offload_pipeline(model, device, config=config, budget=budget, plan=plan, adapters=adapters)
    if not isinstance(model, nn.Module):
        raise OffloadError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    given = [name for name, v in (("config", config), ("budget", budget), ("plan", plan)) if v is not None]
    if len(given) > 1:
        raise OffloadError(f"pass one of `config`, `budget` or `plan`, not {' and '.join(f'`{g}`' for g in given)}")
    if config is not None and not isinstance(config, OffloadConfig):
        raise OffloadError(f"`config` must be a weightlift.OffloadConfig, got {type(config).__name__}")
    dev = resolve_device(device)
    if is_offloaded(model):
        raise OffloadError(
            f"`model` ({type(model).__name__}) is already offloaded: call `remove()` on its handle before "
            "offloading it again"
        )
    if budget is not None:
        plan = make_plan(model, device=dev, budget=budget, adapters=adapters)
    if plan is not None:
        check_plan(plan, model, dev)
        config = plan.config()
    if config is None:
        config = OffloadConfig()
    stacks = find_stacks(model, config.layers)
    stack_name = "+".join(name for name, _ in stacks)
    names, layers = layer_list(stacks)
    if config.indices is not None and config.indices and config.indices[-1] >= len(layers):
        raise OffloadError(
            f"`indices`={config.indices!r} names position {config.indices[-1]}, but `{stack_name}` has "
            f"{len(layers)} layers (positions 0-{len(layers) - 1})"
        )
    adapters = (*adapters, *BUILTIN_ADAPTERS)
    entries, resident = _collect(model, names, layers, config, adapters)
    kept = {id(t) for t in resident}
    for name, t, _ in _tensors(model, with_attributes=False):
        if t.is_meta and id(t) in kept:
            raise OffloadError(
                f"`{name}` is on the meta device (no data) and is not offloaded: load the weights before "
                "offloading; only offloaded layers may stay on meta, streamed from a layer cache or a checkpoint"
            )
    meta = [e.qualname for es in entries.values() for e in es if e.tensor.is_meta]
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
    pool_bytes = slot_bytes if mapped else schedule.n_slots * slot_bytes
    if config.host_budget is not None and streams is None and pool_bytes > config.host_budget:
        raise OffloadError(
            f"`host_budget`={config.host_budget} bytes is below the {pool_bytes} bytes this plan needs "
            f"({1 if mapped else schedule.n_slots} slots of {slot_bytes}); raise it or lower `prefetch_step`"
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
            every = _every_layout(model, names, layers, config, adapters, layouts)
            cache = open_cache(folder, stack_name, layouts, materialized, every, type(model).__name__)
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
        handle.pool = DevicePool(0 if mapping else schedule.n_slots, slot_bytes, dev)
        handle.mapped_window = slot_bytes if mapping else 0
        _move(handle, resident, dev)
        counted = []
        for t in resident:
            leaves = _leaves("resident tensor", t, adapters)
            if leaves is None:
                log.info("resident %s not counted in resident_bytes: weightlift cannot take it apart", type(t).__name__)
            counted += leaves or []
        handle.resident_bytes = _unique_bytes(counted)
        copied = streams is not None or any(s.device.type != "cpu" for lay in layouts.values() for s in lay.sources)
        if cache is None and copied:  # masters in host memory of their own (pinned for an accelerator)
            pin = streams is not None and streams.pin
            handle.arena = HostArena(sum(layouts[i].nbytes for i in schedule.offloaded), pin)
        for position, index in enumerate(schedule.offloaded):
            if cache is not None:
                master = DiskMaster(layouts[index], cache, index)
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
            handle.experts = experts = ExpertStreams(units, modules, config.expert_lookahead, routers, detected)
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
            handle.install_hooks(layer, LayerHook(prefetcher, position, layer, handle.timeline, handle.graphs))
        prefetcher.prime()
    except BaseException:
        handle.remove()
        raise
    report = handle.report()
    log.info(
        "weightlift: %d of %d layers of `%s` offloaded to %s; %s of weights replaced by a %s pool (%d slots): "
        "%s of device memory saved",
        report.layers_offloaded, report.layers, stack_name, dev, format_size(report.offloaded_bytes),
        format_size(report.pool_bytes), report.slots, format_size(report.saved_bytes),
    )  # fmt: skip
    return handle
