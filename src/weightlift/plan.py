"""`plan()`: from a memory budget, the link and the model's per-layer compute (see `measure`) to an
offload config, and the `Plan` that says what it will cost.

The predicted time of a forward comes from a small simulation of the schedule (`forecast`): one copy
engine in FIFO order, the copy of offloaded position ``p + step`` issued when position ``p`` finishes,
a layer starting once the previous layer is done and its own copy has landed. `plan` tries every
number of offloaded layers (spread along the stack, largest layers first) and every prefetch step,
keeps those whose resident weights + pool (+ host staging) fit the budgets, and picks the fastest
predicted decode (the forward that hides copies worst); among plans within 2% of each other, the one
that offloads fewer layers and then uses the smaller step wins (nothing is offloaded when all fits).
Mixture-of-experts layers move expert by expert (`weightlift.experts`): their copy in each workload is
their dense part plus the experts that workload's tokens chose, counted on one run of it. They may also
be offloaded experts only (`Plan.params`), the dense parts resident: more memory, fewer bytes per token;
whole layers are tried first, so that must be predicted 2% faster to win.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import apply
from .checkpoint import CheckpointIndex, mappable
from .config import OffloadConfig, format_size, parse_size, resolve_device
from .errors import OffloadError
from .experts import find_experts, routed_bytes
from .forecast import copy_seconds, predict
from .measure import (
    analyse,
    available_ram,
    disk_read_rate,
    h2d_bandwidth,
    mapped_overhead,
    measure_layers,
    sample_workloads,
    streamed_overhead,
)
from .pool import arena_sizes, pinned_size
from .schedule import cyclic_slots, spread_order

log = logging.getLogger(__name__)

PLAN_VERSION = 1  # of the plan's JSON form: raise it when a field changes meaning, is added or goes
_TIE = 0.02  # a plan must be predicted 2% faster to beat one that offloads fewer layers or uses fewer slots


def default_cache_dir() -> Path:
    """Where plans put the layer cache when no ``disk_path`` is given: ``$WEIGHTLIFT_CACHE`` or
    ``~/.cache/weightlift``."""
    return Path(os.environ.get("WEIGHTLIFT_CACHE") or Path.home() / ".cache" / "weightlift")


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class Workload:
    """One kind of forward: measured compute per layer, and what the plan predicts for it."""

    name: str
    compute_s: list[float]  # per layer of the stack list, measured with every weight at hand
    other_s: float  # the rest of the forward
    predicted_s: float = 0.0
    wait_s: list[float] = field(default_factory=list)  # predicted exposed wait per layer
    bound: str = "compute"  # "compute" or "link": what the predicted time is mostly made of


@dataclass
class Plan:
    """Where every layer lives and what it will cost; plain data that round-trips through JSON."""

    model: str  # class name
    fingerprint: str  # of the model's tensor names, dtypes and shapes: a plan is refused for another model
    device: str
    budget: int
    host_budget: int | None
    stacks: list[str]
    layer_names: list[str]
    layer_bytes: list[int]  # bytes a slot needs to hold the layer's offloadable tensors
    offloaded: list[int]
    prefetch_step: int
    source: str  # "host", "disk" or "checkpoint"
    disk_path: str | None
    mmap: bool
    resident_bytes: int  # weights kept on the device
    pool_bytes: int  # device slots (or the mapped window on a CPU target)
    host_bytes: int  # host RAM the plan allocates: pinned masters, or the staging ring of the disk tier
    link: str  # what the copies go through
    copy_bytes_per_s: float  # overlappable transfer rate (0: nothing to overlap)
    serial_s_per_byte: float  # time per byte an offloaded layer adds inside compute (mapped page faults)
    workloads: dict[str, Workload]
    goal: str  # the workload the plan was chosen for
    # per workload, bytes each layer moves per forward when MoE layers move expert by expert (dense part +
    # the experts its tokens chose, measured on the sample input); absent: whole layers (``layer_bytes``)
    moved_bytes: dict[str, list[int]] = field(default_factory=dict)
    # what of each offloaded layer is offloaded (`OffloadConfig.params`): empty, all of it; ["experts"]: a
    # MoE layer's experts only, its dense part (attention, norms, router, shared experts) resident
    params: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION  # of this form; a plan saved before the field existed is version 1

    # -- derived

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.pool_bytes

    @property
    def predicted_s(self) -> float:
        return self.workloads[self.goal].predicted_s

    @property
    def bound(self) -> str:
        return self.workloads[self.goal].bound

    def config(self) -> OffloadConfig:
        """The `OffloadConfig` this plan applies."""
        return OffloadConfig(
            layers=tuple(self.stacks),
            indices=tuple(self.offloaded),
            prefetch_step=self.prefetch_step,
            source=self.source,
            disk_path=self.disk_path,
            host_budget=self.host_budget if self.source != "host" else None,
            mmap=self.mmap,
            params=tuple(self.params),
        )

    def moved(self, workload: str | None = None) -> list[int]:
        """Bytes each layer moves per forward of ``workload`` (the goal's by default)."""
        return self.moved_bytes.get(workload or self.goal, self.layer_bytes)

    def copy_s(self, index: int, workload: str | None = None) -> float:
        return copy_seconds(self.moved(workload)[index], self.copy_bytes_per_s)

    def serial_s(self, index: int, workload: str | None = None) -> float:
        return self.moved(workload)[index] * self.serial_s_per_byte

    def predict(self, compute_s: Sequence[float], other_s: float, workload: str | None = None
                ) -> tuple[float, list[float]]:  # fmt: skip
        """Seconds per forward for these measured compute times under this plan, and each layer's wait."""
        return predict(compute_s, other_s, self.moved(workload), self.offloaded, self.prefetch_step,
                       self.copy_bytes_per_s, self.serial_s_per_byte)  # fmt: skip

    # -- JSON

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """A plan from `to_dict`'s form (also one edited by hand): `OffloadError` naming the first field that
        is unknown, missing or of the wrong type, or a version this weightlift does not read."""
        if not isinstance(data, dict):
            raise OffloadError(
                f"`plan` is not a weightlift plan (a JSON object of its fields, got {type(data).__name__}): "
                "make one with weightlift.plan()"
            )
        version = data.get("version", 1)
        if type(version) is not int or version != PLAN_VERSION:
            raise OffloadError(
                f"`plan.version`={version!r}: this weightlift reads plans of version {PLAN_VERSION}. Make the plan "
                "again with weightlift.plan(), or load it with the weightlift that wrote it"
            )
        _check_fields(cls, data, "plan")
        workloads = {}
        for name, w in data["workloads"].items():
            _check_fields(Workload, w, f"plan.workloads.{name}")
            workloads[name] = Workload(**w)
        return cls(**{**data, "workloads": workloads})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OffloadError(f"`plan` is not valid JSON ({e}): save plans with `plan.to_json()`") from None
        return cls.from_dict(data)

    # -- text

    def summary(self) -> str:
        n = len(self.offloaded)
        head = [
            f"plan for {self.model} on {self.device}: {n} of {len(self.layer_names)} layers offloaded"
            + (f", prefetch step {self.prefetch_step}, from {self.source}" if n else " (everything fits)")
            + (f"; only their {', '.join(self.params)} (the rest of each stays resident)" if n and self.params else ""),
            f"device memory {format_size(self.device_bytes)} of {format_size(self.budget)} budget "
            f"(resident {format_size(self.resident_bytes)} + pool {format_size(self.pool_bytes)}); "
            f"host RAM allocated {format_size(self.host_bytes)}"
            + (f" of {format_size(self.host_budget)}" if self.host_budget is not None else ""),
            f"link: {self.link}",
        ]
        if self.moved_bytes and self.offloaded:
            whole = sum(self.layer_bytes[i] for i in self.offloaded)
            for name in self.moved_bytes:
                part = sum(self.moved(name)[i] for i in self.offloaded)
                head.append(f"expert level: a {name} forward moves {format_size(part)} of the {format_size(whole)} "
                            "offloaded (dense parts + the experts its tokens chose)")  # fmt: skip
        for w in self.workloads.values():
            head.append(f"predicted {w.name}: {w.predicted_s * 1e3:.2f} ms per forward ({w.bound}-bound) = "
                        + " + ".join(f"{ms:.2f} ms {what}" for what, ms in self.terms(w)))  # fmt: skip
        return "\n".join(head)

    def terms(self, workload: Workload) -> list[tuple[str, float]]:
        """What a workload's predicted time is made of, in milliseconds; the terms add up to it (the
        simulation spends exactly these: each layer's compute, the rest of the forward, the page faults
        of mapped offloaded layers inside their compute, and the exposed wait for copies)."""
        out = [("compute in layers", sum(workload.compute_s) * 1e3), ("elsewhere", workload.other_s * 1e3)]
        if self.offloaded and self.serial_s_per_byte:
            faults = sum(self.serial_s(i, workload.name) for i in self.offloaded)
            out.append(("mapped reads (page faults)", faults * 1e3))
        out.append(("exposed copy wait", sum(workload.wait_s) * 1e3))
        return out

    def __str__(self) -> str:
        goal = self.workloads[self.goal]
        rows = [("layer", "bytes", "lives", "copy ms", f"compute ms ({goal.name})", "wait ms")]
        chosen = set(self.offloaded)
        for i, name in enumerate(self.layer_names):
            rows.append((
                name, format_size(self.layer_bytes[i]), "offloaded" if i in chosen else "resident",
                f"{(self.copy_s(i) + self.serial_s(i)) * 1e3:.3f}" if i in chosen else "-",
                f"{goal.compute_s[i] * 1e3:.3f}", f"{goal.wait_s[i] * 1e3:.3f}" if goal.wait_s else "-",
            ))  # fmt: skip
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
        return f"{self.summary()}\n\n{table}"


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON has the type ``hint`` (a field's annotation) says; a dataclass (a
    `Workload`) is an object here, its own fields are checked by `_check_fields`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float)
    return type(value) is hint  # int, str, bool: a bool is not an int here


def _check_fields(cls: type, data: Any, where: str) -> None:
    """`OffloadError` naming the first field of ``data`` (for dataclass ``cls``, read from JSON) that is
    unknown, missing or of the wrong type."""
    fix = "correct it, or make the plan again with weightlift.plan()"
    if not isinstance(data, dict):
        raise OffloadError(f"`{where}` must be an object of fields, got {data!r}: {fix}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise OffloadError(
            f"`{where}` has an unknown field `{where}.{unknown[0]}`: its fields are {', '.join(fields)}; {fix}"
        )
    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise OffloadError(f"`plan` is not a weightlift plan: `{where}` has no field `{where}.{name}`; {fix}")
            continue
        if not _fits(data[name], hints[name]):
            hint = hints[name]
            want = hint.__name__ if typing.get_origin(hint) is None and isinstance(hint, type) else str(hint)
            raise OffloadError(f"`{where}.{name}` must be {want}, got {data[name]!r}: {fix}")


# ---------------------------------------------------------------------------------------------- identity


def fingerprint(model: nn.Module) -> str:
    """Of every parameter's and buffer's name, dtype and shape: what a saved plan must match."""
    items = [
        [name, str(t.dtype), list(t.shape)]
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    ]
    return hashlib.blake2b(json.dumps([type(model).__name__, items]).encode(), digest_size=10).hexdigest()


# ---------------------------------------------------------------------------------------------- choosing


def _too_small(model: nn.Module, budget: int, host_budget: int | None, minimum: int) -> None:
    what = f"`budget`={format_size(budget)}"
    if host_budget is not None:
        what += f" with `host_budget`={format_size(host_budget)}"
    raise OffloadError(
        f"{what} is too small for {type(model).__name__}: the smallest plan needs {format_size(minimum)} "
        f"({minimum} bytes) of device memory (the weights outside the layers plus one slot of the largest "
        "layer); raise the budget"
        + (" or `host_budget` (or give `disk_path` so layers stream from disk)" if host_budget is not None else "")
    )


def plan(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    budget: int | str,
    host_budget: int | str | None = None,
    sample: Any = None,
    disk_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    layers: str | Sequence[str] | None = None,
    adapters: Sequence = (),
    reps: int = 9,
) -> Plan:
    """Choose what to offload so the weights fit ``budget`` (device memory; on a CPU target, RAM) and a
    forward is predicted fastest; measure this machine and model to predict it. See the module docstring.

    ``host_budget`` caps the host RAM the plan allocates (pinned masters on an accelerator); when the
    offloaded layers do not fit it they stream from a layer cache under ``disk_path`` (default
    `default_cache_dir`), as they always do on a CPU target. ``sample`` is one forward's input; without
    it a language model is timed on a prefill and a decode step and the plan is chosen for decode.
    ``checkpoint``, the model's safetensors folder, makes offloaded layers stream from it
    (``source="checkpoint"``) instead of a layer cache, and lets the layers be on the meta device (weights
    not loaded: the model was built empty and only the rest was read, see `weightlift.hf.load_streaming`):
    they are then measured streamed from the checkpoint, a few at a time read into memory, so planning
    never holds more of them than ``budget``.
    Raises `OffloadError` when no plan fits, stating the minimum budget. Measuring runs the model; on a CPU
    target a few layers are also offloaded for a moment (they come back bitwise equal, in new storage).
    """
    if not isinstance(model, nn.Module):
        raise OffloadError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if type(model).forward is nn.Module.forward:  # an nn.ModuleList: the code that calls its blocks is elsewhere
        raise OffloadError(
            f"`model` ({type(model).__name__}) has no forward for plan() to time: plan the module that runs it, "
            "wrap its blocks in an nn.Sequential, or offload it with an explicit OffloadConfig"
        )
    dev = resolve_device(device)
    budget = parse_size(budget, name="budget")
    host_budget = None if host_budget is None else parse_size(host_budget, name="host_budget")
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else None
    if ckpt is None and any(t.is_meta for t in model.parameters()):
        raise OffloadError(
            "`model` has parameters on the meta device: plan() times the model's layers, so load its weights "
            "first, pass `checkpoint` (the folder its layers stream from), or offload with an explicit OffloadConfig"
        )
    info = analyse(model, layers, adapters)
    n = len(info.names)
    empty = any(t.is_meta for layer in info.layers for t in (*layer.parameters(), *layer.buffers()))
    in_place = True  # on a CPU target, offloaded layers are computed on in their mapped file
    if ckpt is not None:
        index = CheckpointIndex(ckpt, model)
        found = [index.locate(f"{name}.{key}") for name, layer in zip(info.names, info.layers)
                 for key in layer.state_dict(keep_vars=True)]  # fmt: skip
        in_place = all(loc is not None and mappable(loc) for loc in found)
    total = info.total_bytes
    if budget < info.minimum_bytes:  # refused before measuring anything
        _too_small(model, budget, host_budget, info.minimum_bytes)
    offloading = total > budget  # else nothing is offloaded (an offloaded layer never predicts faster)
    runners = sample_workloads(model, sample, dev)
    goal = "decode" if "decode" in runners else next(iter(runners))
    folder = Path(disk_path).expanduser() if disk_path is not None else default_cache_dir()
    cpu = dev.type == "cpu"

    # the link, for the tier the offloaded layers will come from: measured only when layers must move
    largest = max(info.nbytes, default=0)
    copy_rate, fault, link = 0.0, 0.0, ""
    if cpu and offloading:
        folder.mkdir(parents=True, exist_ok=True)
        available = available_ram()
        warm = available is None or total <= 0.8 * available  # the page cache can keep the layer cache
        if in_place:
            link = f"{'checkpoint' if ckpt else 'layer cache'} mapped in place from {ckpt or folder}"
            if warm:
                link += " (page cache: page faults only)"
            else:
                copy_rate = disk_read_rate(folder, largest)
                link += f" (disk reads at {copy_rate / 1e6:.0f} MB/s)"
        else:  # tensors built of several pieces of the checkpoint: read into slots
            copy_rate = disk_read_rate(folder, largest, cold=not warm)
            link = f"checkpoint {ckpt} read into slots at {copy_rate / 1e6:.0f} MB/s" + (" (page cache)" * warm)
    elif offloading:
        copy_rate = h2d_bandwidth(dev, largest)
        link = f"pinned host RAM -> {dev} at {copy_rate / 1e9:.1f} GB/s"

    # compute per layer: in place when the model already lives on the device (a CPU target), else under a
    # temporary offload of every layer with prefetch off (so it needs no more device memory than any plan)
    # (layers on the meta device: streamed from the checkpoint, mapped in place on a CPU target when it can be)
    measured: dict[str, tuple[list[float], float]] = {}
    probe = None
    if empty:
        probe = apply(model, dev, OffloadConfig(
            layers=tuple(info.stacks), source="checkpoint", disk_path=str(ckpt), prefetch_step=1 if cpu else 0))
    elif not all(t.device == dev for t in (*model.parameters(), *model.buffers())):
        probe = apply(model, dev, OffloadConfig(layers=tuple(info.stacks), prefetch_step=0))
    moved: dict[str, list[int]] = {}  # MoE layers: what each workload's tokens make them move
    try:
        for _ in range(2):  # two rounds, interleaved; per workload the one with the faster forward counts
            for name, run in runners.items():
                compute, other = measure_layers(info.layers, run, dev, reps)
                if name not in measured or sum(compute) + other < sum(measured[name][0]) + measured[name][1]:
                    measured[name] = (compute, other)
        if offloading:
            for name, run in runners.items():
                found = routed_bytes(info.layers, info.nbytes, run)
                if found is not None:
                    moved[name] = found
    finally:
        if probe is not None:
            probe.remove()
    if cpu and offloading and any(info.nbytes) and in_place:  # what computing on the mapped file adds per byte
        if empty:  # measured mapped: a few layers read into memory give what it added
            room = budget - info.other_bytes
            fault, alone = streamed_overhead(model, info, runners[goal], measured[goal][0], index, room, reps)
            for name, (c, o) in measured.items():
                c = [max(0.0, t - fault * b) for t, b in zip(c, info.nbytes)]
                measured[name] = ([alone.get(i, t) for i, t in enumerate(c)] if name == goal else c, o)
        else:
            fault = mapped_overhead(model, info, runners[goal], measured[goal][0], folder, reps)

    def memory(part: _Part, chosen: list[int], step: int, src: str) -> tuple[int, int, int]:
        slot = max((part.nbytes[i] for i in chosen), default=0)
        resident = total - sum(part.data_bytes[i] for i in chosen)
        if not chosen:
            return resident, 0, 0
        pool = (max(cyclic_slots(len(chosen), step)) + 1 if step else 1) * slot
        if cpu:
            return resident, slot if in_place else pool, 0  # in place: the mapped window of the layer computed
        if src == "host":
            return resident, pool, sum(arena_sizes(sum(part.nbytes[i] for i in chosen)))  # see pool.HostArena
        return resident, pool, 2 * pinned_size(slot, dev.type != "cpu")  # the staging ring

    # on an accelerator with a host budget, layers that do not fit host RAM come from a layer cache
    staged = not cpu and offloading and (host_budget is not None or ckpt is not None)
    staged_read = disk_read_rate(folder, largest) if staged else 0.0
    tiers = ["host"] if not staged_read else ["host", "checkpoint" if ckpt else "disk"]
    if cpu:
        tiers = ["checkpoint" if ckpt else "disk"]
    elif empty:
        tiers = ["checkpoint"]  # no weights in memory to make host masters of
    spread = {p: r for r, p in enumerate(spread_order(n))} if n else {}
    compute, other = measured[goal]
    parts = [_Part((), info.nbytes, info.data_bytes, moved)]
    if offloading and moved:  # MoE layers: their experts alone may be offloaded too, the dense parts resident
        parts += _experts_only(model, info, layers, adapters, moved)
    best: tuple | None = None
    minimum = None
    for part in parts:  # whole layers first: experts only must be predicted 2% faster to win
        order = sorted((i for i in range(n) if part.nbytes[i]), key=lambda i: (-part.nbytes[i], spread[i]))
        for k in range(len(order) + 1 if offloading else 1) if not part.params else range(1, len(order) + 1):
            chosen = sorted(order[:k])
            for step in range(1, max(1, min(k, 8)) + 1) if k else [1]:
                for src in tiers if k else ["host"]:
                    resident, pool, host = memory(part, chosen, step, src)
                    need = resident + pool
                    minimum = need if minimum is None else min(minimum, need)
                    if need > budget or (host_budget is not None and host > host_budget):
                        continue
                    rate = copy_rate if src == "host" or cpu else 1 / (1 / copy_rate + 1 / staged_read)
                    predicted, _ = predict(compute, other, part.moved.get(goal, part.nbytes), chosen, step, rate,
                                           fault)  # fmt: skip
                    if best is None or predicted < best[0] * (1 - _TIE):  # ties: fewer layers, smaller step
                        best = (predicted, need, chosen, step, src, resident, pool, host, rate, part)
    if best is None:
        _too_small(model, budget, host_budget, minimum or 0)
    predicted, need, chosen, step, src, resident, pool, host, rate, part = best
    moved = part.moved
    result = Plan(
        model=type(model).__name__, fingerprint=fingerprint(model), device=str(dev), budget=budget,
        host_budget=host_budget, stacks=info.stacks, layer_names=info.names, layer_bytes=part.nbytes,
        offloaded=chosen, prefetch_step=step if chosen else 1, source=src if chosen else "host",
        disk_path={"disk": str(folder), "checkpoint": str(ckpt)}.get(src) if chosen else None, mmap=True,
        resident_bytes=resident,
        pool_bytes=pool, host_bytes=host, link=link if chosen else "none (nothing offloaded)",
        copy_bytes_per_s=rate if chosen else 0.0, serial_s_per_byte=fault if chosen else 0.0,
        workloads={name: Workload(name, c, o) for name, (c, o) in measured.items()}, goal=goal,
        moved_bytes=moved if chosen else {}, params=list(part.params) if chosen else [],
    )  # fmt: skip
    for w in result.workloads.values():
        w.predicted_s, w.wait_s = result.predict(w.compute_s, w.other_s, w.name)
        exposed = sum(w.wait_s) + sum(result.serial_s(i, w.name) for i in result.offloaded)
        w.bound = "link" if exposed > 0.5 * (w.predicted_s - exposed) else "compute"
    log.info("weightlift plan:\n%s", result)
    return result


@dataclass
class _Part:
    """One way to offload the layers: what of each moves (`OffloadConfig.params`; empty: all of it), a slot's
    bytes and the weights' bytes per layer (0: nothing of the layer can go), and per workload what moves."""

    params: tuple[str, ...]
    nbytes: list[int]
    data_bytes: list[int]
    moved: dict[str, list[int]]


def _experts_only(model: nn.Module, info: Any, layers: Any, adapters: Sequence, moved: dict[str, list[int]]
                  ) -> list[_Part]:  # fmt: skip
    """The MoE layers' experts offloaded alone (their modules' names as `params`), the dense parts resident;
    what each workload moves of them is what it moved of the whole layer less the dense part."""
    names = sorted({s.path.rsplit(".", 1)[-1] for layer in info.layers for s in find_experts(layer)})
    if not names:
        return []
    try:
        part = analyse(model, layers, adapters, params=tuple(names))
    except OffloadError:  # experts that cannot go alone (shared with another layer, say): whole layers only
        return []
    if not any(part.nbytes):
        return []
    experts = [
        [max(0, m - (whole - e)) if e else 0 for m, whole, e in zip(per, info.nbytes, part.nbytes)]
        for per in moved.values()
    ]
    return [_Part(tuple(names), part.nbytes, part.data_bytes, dict(zip(moved, experts)))]


def check_plan(plan_: Plan, model: nn.Module, device: torch.device) -> None:
    """Refuse a plan made for another model or device."""
    if not isinstance(plan_, Plan):
        raise OffloadError(f"`plan` must be a weightlift.Plan (from weightlift.plan()), got {type(plan_).__name__}")
    if plan_.fingerprint != fingerprint(model):
        raise OffloadError(
            f"`plan` was made for another model ({plan_.model}, fingerprint {plan_.fingerprint}); this "
            f"{type(model).__name__} has other tensors: make a new plan with weightlift.plan(model, ...)"
        )
    try:
        planned = torch.device(plan_.device)
    except (RuntimeError, TypeError, ValueError):
        raise OffloadError(
            f"`plan.device`={plan_.device!r} is not a device torch knows: make the plan again with "
            "weightlift.plan(model, device=...)"
        ) from None
    if planned != device:
        raise OffloadError(
            f"`plan` was made for device {plan_.device}, not {device}: pass device={plan_.device!r} or plan again"
        )
