"""The `Plan`: what `plan()` chose and what it predicts, as plain data with a JSON form that is checked
field by field when read back (a plan saved, then edited by hand, names its first bad field). Kept apart
from the planner so that reading a saved plan needs none of the measuring machinery."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import forecast
from .config import OffloadConfig, format_size
from .errors import OffloadError

PLAN_VERSION = 1  # of the plan's JSON form: raise it when a field changes meaning or goes (one added with a
# default that keeps the old behaviour reads the same: plans without it still load)


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
    # the device expert cache (`OffloadConfig.expert_cache`): its entries (0: none), bytes (in ``pool_bytes``),
    # and the share of the experts decode tokens choose it is predicted to hold (replayed over the sample's
    # tokens; ``moved_bytes`` of the goal is net of it)
    expert_cache: int = 0
    expert_cache_bytes: int = 0
    expert_cache_hit_rate: float | None = None
    # what the run holds besides the weights, taken off ``budget`` before the weights were planned
    # (`weightlift.footprint`): the KV cache for ``context_tokens`` and the activations; 0 when not planned for
    kv_cache_bytes: int = 0
    activation_bytes: int = 0
    context_tokens: int = 0
    world_size: int = 1  # tensor parallel: the ranks it was made for (`distributed.slowest`: one plan for all)
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
            expert_cache=self.expert_cache or None,
        )

    def moved(self, workload: str | None = None) -> list[int]:
        """Bytes each layer moves per forward of ``workload`` (the goal's by default)."""
        return self.moved_bytes.get(workload or self.goal, self.layer_bytes)

    def copy_s(self, index: int, workload: str | None = None) -> float:
        return forecast.copy_seconds(self.moved(workload)[index], self.copy_bytes_per_s)

    def serial_s(self, index: int, workload: str | None = None) -> float:
        return self.moved(workload)[index] * self.serial_s_per_byte

    def predict(self, compute_s: Sequence[float], other_s: float, workload: str | None = None
                ) -> tuple[float, list[float]]:  # fmt: skip
        """Seconds per forward for these measured compute times under this plan, and each layer's wait."""
        return forecast.predict(compute_s, other_s, self.moved(workload), self.offloaded, self.prefetch_step,
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
        if self.kv_cache_bytes or self.activation_bytes:
            run = self.kv_cache_bytes + self.activation_bytes
            head[1:1] = [f"the run: KV cache {format_size(self.kv_cache_bytes)} for {self.context_tokens} tokens + "
                         f"activations {format_size(self.activation_bytes)}; the weights' budget is what is left: "
                         f"{format_size(self.budget - run)}; everything {format_size(self.device_bytes + run)} of "
                         f"{format_size(self.budget)}"]  # fmt: skip
        if self.moved_bytes and self.offloaded:
            whole = sum(self.layer_bytes[i] for i in self.offloaded)
            for name in self.moved_bytes:
                part = sum(self.moved(name)[i] for i in self.offloaded)
                head.append(f"expert level: a {name} forward moves {format_size(part)} of the {format_size(whole)} "
                            "offloaded (dense parts + the experts its tokens chose)")  # fmt: skip
        if self.expert_cache and self.offloaded:
            rate = self.expert_cache_hit_rate
            head.append(f"device expert cache: {self.expert_cache} experts ({format_size(self.expert_cache_bytes)}), "
                        + (f"predicted to hold {rate:.0%} of the experts a {self.goal} token chooses (replayed over "
                           "the sample's tokens)" if rate is not None else "no hit rate predicted"))  # fmt: skip
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
