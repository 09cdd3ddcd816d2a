"""Forward hooks on offloaded layers, and the `OffloadHandle` that owns them and undoes everything.

Hooks are instances of `LayerHook`, registered with handles: ``forward`` is never reassigned, and a
model is recognised as offloaded by finding them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import ops
from .drift import Holder, drifted, holders, put_back, refuse_lazy
from .errors import OffloadError
from .graphs import Graphs
from .occupancy import Occupancy
from .ops import eagerly, first_tensor
from .pool import DevicePool, HostArena
from .report import DeviceClock, OffloadReport, Timeline
from .schedule import Prefetcher
from .storage import HostMaster
from .streams import Streams
from .tensors import relocation

log = logging.getLogger(__name__)


def _requires_grad(values: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


class LayerHook:
    """Pre- and post-forward hook of one offloaded layer at ``position`` in the schedule."""

    def __init__(
        self, prefetcher: Prefetcher, position: int, layer: OffloadedLayer, timeline: Timeline, graphs: Graphs,
        occupancy: Occupancy,
    ) -> None:  # fmt: skip
        self.prefetcher = prefetcher
        self.occupancy = occupancy  # one thread at a time inside the handle's offloaded layers
        self.graphs = graphs  # refuses captures it does not manage; keeps replays safe after eager work
        self.timeline = timeline
        self.started: Any = None
        self.running = False  # between `wait` and `prefetch`: a layer that raised leaves it set
        self.position = position
        self.last = position == len(prefetcher.schedule.offloaded) - 1
        self.name = layer.name
        self.layer = layer
        self.weights = [e.tensor for e in layer.master.layout.entries]
        # tensors moved with ``.data =`` and where their slot view starts: a format that replaces one
        # during a forward (repacking on first use) is detected after the layer runs
        self.watch = [
            (e, e.tensor.data_ptr())
            for e in layer.master.layout.entries
            if e.parts.kind == "plain" or e.parts.kind.startswith("storage subclass")
        ]
        layer.holders = holders(layer)  # who holds each offloaded tensor: a conversion since is refused
        self.key = ops.register(self)  # how the compiled ops find this hook

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and (
            _requires_grad(self.weights) or _requires_grad(args) or _requires_grad(kwargs.values())
        ):
            raise OffloadError(
                f"`{self.name}` is offloaded and weightlift is inference-only: its slot is reused by other "
                "layers, so autograd would read the wrong weights. Run the model under "
                "`torch.inference_mode()` or `torch.no_grad()`"
            )
        compiling = torch.compiler.is_compiling()
        x = first_tensor(*args, *kwargs.values()) if compiling else None
        if x is not None:  # traced: an op ordered before every read of the input (see `weightlift.ops`)
            torch.ops.weightlift.wait(x, self.key)
        elif compiling:  # no activation to order an op on: run it eagerly (a graph break here)
            eagerly(self.wait)
        else:
            self.wait()

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        compiling = torch.compiler.is_compiling()
        if not compiling:
            refuse_lazy(self.name, output)
        x = first_tensor(output) if compiling else None
        if x is not None:  # traced: ordered after the compute that produced the output
            torch.ops.weightlift.prefetch(x, self.key)
        elif compiling:
            eagerly(self.prefetch)
        else:
            self.prefetch()

    def finished(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Runs after every forward, also one that raised (``always_call``): then release the slot."""
        if torch.compiler.is_compiling() or not self.running:
            return
        self.running = False
        self.occupancy.leave()
        self.prefetcher.aborted(self.position, every_slot=self.graphs.active)
        self.graphs.ready(self.prefetcher)

    def wait(self) -> None:
        """Before the layer runs (eagerly, or inside the compiled ``weightlift::wait``)."""
        self.refuse_drift()
        self.graphs.check()
        self.occupancy.enter(self.name)
        start = self.timeline.mark()
        try:
            self.prefetcher.before(self.position)
        except BaseException:
            self.occupancy.leave()
            raise
        self.started = self.timeline.mark()
        self.timeline.span("compute", "wait", self.name, start, self.started)
        self.running = True

    def prefetch(self) -> None:
        """After the layer ran (eagerly, or inside the compiled ``weightlift::prefetch``)."""
        self.graphs.check()
        self.running = False
        self.occupancy.leave()
        self.timeline.span("compute", "compute", self.name, self.started, self.timeline.mark())
        self.prefetcher.after(self.position, every_slot=self.graphs.active)
        if self.last:
            self.graphs.ready(self.prefetcher)
        if any(e.tensor.data_ptr() != ptr for e, ptr in self.watch):
            self._replaced()

    def refuse_drift(self) -> None:
        """`OffloadError` when an offloaded tensor no longer reads its slot since offload (see `drifted`)."""
        name = drifted(self.layer, self.watch)
        if name is not None:
            raise OffloadError(
                f"`{self.name}.{name}` no longer reads the slot weightlift streams it into: it was converted "
                "(`model.to(...)`, `.half()`, `.float()`, `.cuda()`), set or replaced while the model is "
                "offloaded, so it holds bytes that are not its weights. Call `handle.remove()` first (it puts "
                "the offloaded tensors back as they were at offload), then convert the model, then offload again"
            )

    def _replaced(self) -> None:
        for entry, ptr in list(self.watch):
            if entry.tensor.data_ptr() != ptr:
                self.watch.remove((entry, ptr))
                self.layer.replaced.append(entry)
                log.warning(
                    "`%s.%s` was replaced during a forward (a format repacking its weights on first use): it now "
                    "stays resident and keeps its new contents after remove(). Run one forward before offload() "
                    "so that weightlift streams the repacked form",
                    self.name, entry.qualname,
                )  # fmt: skip


def is_offloaded(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries weightlift's hooks."""
    return any(
        isinstance(getattr(h, "__self__", None), LayerHook)
        for m in model.modules()
        for h in m._forward_pre_hooks.values()
    )


@dataclass
class OffloadedLayer:
    """One offloaded layer: its module, the schedule position, its master copy."""

    index: int
    name: str
    module: nn.Module
    master: HostMaster
    hooks: list[RemovableHandle] = field(default_factory=list)
    replaced: list = field(default_factory=list)  # entries a format replaced after offload: left as they are
    holders: list[Holder] = field(default_factory=list)  # where each offloaded parameter and buffer is held


class OffloadHandle:
    """Returned by `weightlift.offload`: `report()`, `remove()`, and a context manager that removes."""

    def __init__(
        self, model: nn.Module, device: torch.device, stack: str, n_layers: int, step: int, streams: Streams | None
    ) -> None:
        self.model = model
        self.streams = streams  # the accelerator's stream operations (None on a CPU target)
        self.device = device
        self._stack = stack
        self._n_layers = n_layers
        self._step = step
        self.layers: list[OffloadedLayer] = []
        self.moved: list[tuple[torch.Tensor, torch.device]] = []  # resident tensors and their old device
        self.resident_bytes = 0
        self.in_file_bytes = 0  # resident weights computed on in their file (`files.in_file`): in no budget
        self.pool: DevicePool | None = None
        self.engine: Any = None
        self.prefetcher: Prefetcher | None = None
        self.cache: Any = None  # the disk tier's open cache file, if any
        self.timeline = Timeline(DeviceClock(streams) if streams is not None else None)
        self.graphs = Graphs(streams, type(model).__name__)
        self.occupancy = Occupancy(type(model).__name__)  # one thread at a time inside the offloaded layers
        self.arena: HostArena | None = None  # host memory of the masters (accelerator targets)
        self.ring: Any = None  # the host staging ring of a disk source on an accelerator
        self.plan: Any = None  # the `Plan` applied, if any
        self.experts: Any = None  # the `expert_streams.ExpertStreams` of MoE layers streamed expert by expert
        self.removed = False
        self._final: OffloadReport | None = None  # the report as it stood when removed
        self._guarded: dict[int, RemovableHandle] = {}  # modules above offloaded layers: load_state_dict refused

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self.layers)} layers offloaded to {self.device}"
        return f"<OffloadHandle {type(self.model).__name__}: {state}>"

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install_hooks(self, layer: OffloadedLayer, hook: LayerHook) -> None:
        module = layer.module
        layer.hooks += [
            module.register_forward_pre_hook(hook.before, with_kwargs=True),
            module.register_forward_hook(hook.after),
            module.register_forward_hook(hook.finished, always_call=True),
            module.register_state_dict_pre_hook(lambda *_: self._before_state_dict(hook)),
            module.register_state_dict_post_hook(self._state_dict_hook(layer)),
            module.register_load_state_dict_pre_hook(self._refuse_load),
        ]
        # a load through any module above the layer is refused on entry, before it writes anything of its own
        parts = layer.name.split(".")
        for depth in range(len(parts)):
            above = self.model.get_submodule(".".join(parts[:depth]))
            if id(above) not in self._guarded:
                self._guarded[id(above)] = above.register_load_state_dict_pre_hook(self._refuse_load)

    def _before_state_dict(self, hook: LayerHook) -> None:
        """Before a layer's state_dict: refuse tensors that left their slot (it would mix what was done to them
        with the true weights of the rest), then load the layer into its slot (see `_state_dict_hook`)."""
        hook.refuse_drift()
        self.prefetcher.ensure(hook.position)

    def _state_dict_hook(self, layer: OffloadedLayer):
        """Replace what the layer's state_dict read from its slot by the true tensors from the host master.

        A pre-hook has loaded the layer into its slot first, so whatever a format computes while saving
        (packed metadata, say) is computed from this layer's bytes.

        Keys named like an offloaded tensor get the rebuilt true tensor; other values that are one of its
        leaves in the slot (formats that save their parts under extra keys) get the matching master leaf.
        Anything else read from the pool cannot be mapped back and raises rather than return another
        layer's bytes.
        """

        def hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
            master = layer.master
            by_name = {prefix + e.qualname: e for e in master.layout.entries}
            true_leaves: dict[int, list[torch.Tensor]] = {}  # read once per entry (from disk, for disk sources)

            def leaves(e):
                if id(e) not in true_leaves:
                    true_leaves[id(e)] = master.leaves(e)
                return true_leaves[id(e)]

            slot_leaves, slot = {}, self._slot_of(layer)
            for e in master.layout.entries if slot is not None else ():  # mapped layers read their true bytes
                for view, true in zip(e.views(slot), leaves(e)):
                    slot_leaves[(view.data_ptr(), view.dtype, view.shape, view.stride())] = true
            for key in [k for k in state_dict if k.startswith(prefix)]:
                value = state_dict[key]
                if key in by_name:
                    state_dict[key] = by_name[key].parts.build(leaves(by_name[key]))
                elif isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
                    found = slot_leaves.get((value.data_ptr(), value.dtype, value.shape, value.stride()))
                    if found is not None:
                        state_dict[key] = found
                    elif self._in_pool(value):
                        raise OffloadError(
                            f"`{key}` of offloaded layer `{layer.name}` is saved in a form weightlift cannot map "
                            "back to its true weights: call `handle.remove()` before `state_dict()`"
                        )
            self.graphs.ready(self.prefetcher)  # the pre-hook may have loaded this layer over another

        return hook

    def _slot_of(self, layer: OffloadedLayer) -> torch.Tensor | None:
        assert self.pool is not None and self.prefetcher is not None
        if not self.pool.slots:
            return None
        position = self.prefetcher.schedule.offloaded.index(layer.index)
        return self.pool.slots[self.prefetcher.schedule.slot_of[position]]

    def _in_pool(self, value: torch.Tensor) -> bool:
        ptr = value.untyped_storage().data_ptr()
        return self.pool is not None and any(ptr == s.untyped_storage().data_ptr() for s in self.pool.slots)

    def _refuse_load(self, module: nn.Module, *args: Any) -> None:
        raise OffloadError(
            f"`load_state_dict` on {type(self.model).__name__} while it is offloaded would write into shared "
            "device slots: call `handle.remove()` first, load, then offload again"
        )

    @contextmanager
    def cuda_graph(self, graph: torch.cuda.CUDAGraph, **kwargs: Any) -> Iterator[None]:
        """``torch.cuda.graph(graph, **kwargs)`` around one offloaded step (eager or compiled), so that each
        ``graph.replay()`` makes the same copies into the same slots.

        Before the capture every copy in flight lands; inside it the copy stream forks from the compute
        stream by an event before each prefetch and joins it by an event at each wait, and the copies
        still in flight at the end (the next step's first layers) are joined before the capture ends. The
        step must leave the slots as it found them (one full forward through the offloaded layers, in
        order): otherwise the next replay would read the wrong weights, and this raises `OffloadError`.
        Replay on the stream that runs the eager forwards: each eager forward (also one that raised in an
        offloaded layer) leaves the slots as a replay expects, with every copy joined (see `weightlift.graphs`).
        ``remove()`` resets the graphs captured here. Counters in `report()` count the captured step once;
        replays run no Python and are not counted.
        """
        if self.removed or self.prefetcher is None:
            raise OffloadError("`cuda_graph` on a removed handle: offload the model again")
        if self.streams is None or not self.streams.can_capture:
            raise OffloadError(f"`cuda_graph` needs a CUDA target; this model is offloaded to `{self.device}`")
        if self.experts is not None:
            raise OffloadError(
                "`cuda_graph`: experts are moved as the router chooses them, which a replay would not repeat; "
                "offload with OffloadConfig(experts=None) to capture whole layers"
            )
        if self.ring is not None or self.cache is not None or not isinstance(self.prefetcher, Prefetcher):
            raise OffloadError(
                "`cuda_graph`: the disk tier cannot be captured (its reads run on a host thread, outside any "
                "graph). Offload from host RAM (OffloadConfig(source='host')) to capture, or run without a graph"
            )
        with self.graphs.capture(graph, self.prefetcher, self.timeline, **kwargs):
            yield

    def report(self) -> OffloadReport:
        """Exact bytes and counters so far; on accelerators the times are device times (this waits for the
        timing events of work already issued). After ``remove()``: the report as it stood then."""
        if self._final is not None:
            return self._final
        self.timeline.resolve()
        prefetcher = self.prefetcher
        pool = self.pool
        experts_cache = self.experts.cache if self.experts is not None else None
        cache_bytes = experts_cache.nbytes if experts_cache is not None else 0  # the device expert cache
        window = getattr(prefetcher, "window", None)  # the mapped tier's (`weightlift.window`)
        return OffloadReport(
            device=str(self.device),
            source=(
                f"{self.cache.path}{' (mapped)' if window is not None else ''}" if self.cache is not None else "host"
            ),
            stack=self._stack,
            layers=self._n_layers,
            layers_offloaded=len(self.layers),
            offloaded_bytes=sum(layer.master.layout.data_bytes for layer in self.layers),
            resident_bytes=self.resident_bytes,
            in_file_bytes=self.in_file_bytes,
            pool_bytes=(pool.nbytes if pool is not None else 0) + (window.nbytes if window is not None else 0)
            + cache_bytes,
            slots=(len(pool) if pool is not None else 0) + (window.layers if window is not None else 0),
            slot_bytes=pool.slot_bytes if pool is not None else 0,
            host_bytes=(self.arena.nbytes if self.arena else 0) + (self.ring.nbytes if self.ring else 0),
            prefetch_step=self._step,
            copies=prefetcher.copies if prefetcher else 0,
            prefetch_hits=prefetcher.hits if prefetcher else 0,
            prefetch_misses=prefetcher.misses if prefetcher else 0,
            replaced=sum(len(layer.replaced) for layer in self.layers),
            copy_seconds=sum(t["copy"] for t in self.timeline.totals.values()),
            exposed_copy_seconds=sum(t["wait"] for t in self.timeline.totals.values()),
            compute_seconds=sum(t["compute"] for t in self.timeline.totals.values()),
            experts=self.experts.report() if self.experts is not None else None,
        )

    def timings(self) -> list[dict]:
        """Per offloaded layer, seconds so far: copying it, compute waiting for it, and its forward."""
        self.timeline.resolve()
        return [{"layer": layer.name, **self.timeline.totals.get(layer.name, {"copy": 0.0, "wait": 0.0,
                 "compute": 0.0})} for layer in self.layers]  # fmt: skip

    def trace(self, path: str) -> None:
        """Write the recent timeline as a Chrome/Perfetto trace: a compute lane and a copy lane."""
        self.timeline.trace(path)

    def _restored(self) -> list[tuple[Any, list[torch.Tensor]]]:
        """Every offloaded entry (but those replaced during a forward) and its original leaves, on its device
        (read back from the file on the disk and checkpoint tiers; views of one storage stay views)."""
        out = []
        for layer in self.layers:
            try:
                restored = layer.master.restored()  # none for entries that came without data (on meta)
            except OffloadError as err:
                raise OffloadError(
                    f"cannot remove the offloading: the weights of `{layer.name}` could not be read back ({err}); "
                    "the model is still offloaded and working: fix the file and call remove() again"
                ) from None
            out += [(e, restored.get(id(e), list(e.specs))) for e in layer.master.layout.entries
                    if not any(e is r for r in layer.replaced)]  # fmt: skip
        return out

    def _moved_back(self) -> list[Callable[[], None]]:
        """The resident tensors `offload` moved to the device, each copied back to where it was (not yet in
        place: `tensors.relocation`)."""
        out = []
        for tensor, device in self.moved:
            try:
                out.append(relocation(tensor, device))
            except Exception as err:  # whatever failed, the model stays as it is
                raise OffloadError(
                    f"cannot remove the offloading: a resident {type(tensor).__name__} of shape {tuple(tensor.shape)} "
                    f"could not be moved back to `{device}` ({type(err).__name__}: {err}); the model is still "
                    "offloaded and working: free memory there and call remove() again"
                ) from err
        return out

    @torch.inference_mode(False)  # the restored tensors are normal tensors, as they were
    def remove(self) -> None:
        """Undo everything: hooks gone, every tensor back on its device with its original bytes, each in
        ordinary memory of its own; the pool, host masters, staging ring and graphs are let go (freed as
        soon as the caller holds nothing of them)."""
        if self.removed:
            return
        if self.engine is not None:
            self.engine.synchronize()  # every copy has landed
        restored = self._restored()  # first: a read that fails here leaves the handle as it was, still working
        moved_back = self._moved_back()  # likewise: every copy back made before anything is put in place
        self.graphs.close()
        if self.engine is not None:
            self.engine.close()
        if self.prefetcher is not None:
            self._final = self.report()
        if self.experts is not None:
            self.experts.remove()
        for guard in self._guarded.values():
            guard.remove()
        self._guarded = {}
        for layer in self.layers:
            for h in layer.hooks:
                h.remove()
            put_back(layer)
        for entry, leaves in restored:
            entry.parts.install(entry.tensor, leaves)
        for install in moved_back:
            install()
        if self.cache is not None:
            self.cache.close()
        self.layers, self.moved, self.pool, self.engine, self.cache, self.ring = [], [], None, None, None, None
        self.prefetcher, self.arena, self.experts = None, None, None
        self.removed = True
        log.info("weightlift: removed offloading from %s", type(self.model).__name__)
