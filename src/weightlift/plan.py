"""`plan()`: from a memory budget, the link and the model's per-layer compute to an offload config.

What is measured (on this machine, for this model):

- each layer's compute time, and the rest of a forward (embeddings, head), on sample inputs: for a
  language model a prefill of 32 tokens and a decode step with its KV cache (medians of several runs,
  in two interleaved rounds of which the faster counts: other work on the machine during one round
  does not skew the plan). A model already on the
  target (a CPU target) runs as it is; otherwise under a temporary offload of every layer with prefetch
  off, so it needs no more device memory than the smallest plan, and the clock stops outside each
  layer's load (synchronising the device around each layer);
- the link: pinned host to device copies on an accelerator; on a CPU target, where offloaded layers are
  computed on in place from the mapped layer cache, what that adds to a layer's compute (page faults,
  advice, hooks: serial; measured with weightlift itself on a few of the model's layers, see
  `mapped_overhead`)
  and, when the offloaded bytes cannot stay in the page cache, the disk read (ahead, overlappable).

The predicted time of a forward comes from a small simulation of the schedule (`simulate`): one copy
engine in FIFO order, the copy of offloaded position ``p + step`` issued when position ``p`` finishes,
a layer starting once the previous layer is done and its own copy has landed. `plan` tries every
number of offloaded layers (spread along the stack, largest layers first) and every prefetch step,
keeps those whose resident weights + pool (+ host staging) fit the budgets, and picks the fastest
predicted decode (the forward that hides copies worst); among plans within 2% of each other, the one
that offloads fewer layers and then uses the smaller step wins (nothing is offloaded when all fits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OffloadConfig, format_size, parse_size
from .errors import OffloadError
from .schedule import cyclic_slots

log = logging.getLogger(__name__)

PAGE = 4096
PROMPT_TOKENS = 32
_WORKING_SET = 96 << 20  # bytes of probed layers: more than CPU caches hold
_TIE = 0.02  # a plan must be predicted 2% faster to beat one that offloads fewer layers or uses fewer slots


def default_cache_dir() -> Path:
    """Where plans put the layer cache when no ``disk_path`` is given: ``$WEIGHTLIFT_CACHE`` or
    ``~/.cache/weightlift``."""
    return Path(os.environ.get("WEIGHTLIFT_CACHE") or Path.home() / ".cache" / "weightlift")


# ---------------------------------------------------------------------------------------------- simulation


def simulate(
    compute: Sequence[float],
    other: float,
    offloaded: Sequence[int],
    copy: dict[int, float],
    serial: dict[int, float],
    step: int,
    forwards: int = 3,
) -> tuple[float, list[float]]:
    """Predicted seconds per forward in steady state, and each layer's exposed wait for its copy.

    ``compute[i]`` is layer ``i``'s compute; ``other`` the rest of a forward (placed after the last layer,
    where the copies of the first ``step`` offloaded layers overlap it); ``copy[i]`` the transfer time of an
    offloaded layer (overlappable); ``serial[i]`` extra time it costs inside compute (page faults of a
    mapped layer). ``step=0``: no prefetch, each offloaded layer is loaded when it runs.
    """
    order = list(offloaded)
    n = len(order)
    position = {index: p for p, index in enumerate(order)}
    keep_all = step and n and step >= n  # the pool holds every offloaded layer: copied once, then resident
    ready: dict[int, float] = {}
    engine = 0.0
    t = 0.0

    def issue(p: int, at: float) -> None:
        nonlocal engine
        start = max(at, engine)
        engine = start + copy[order[p]]
        ready[order[p]] = engine

    for p in range(min(step, n)):
        issue(p, 0.0)
    waits = [0.0] * len(compute)
    duration = 0.0
    for forward in range(forwards):
        begin = t
        last = forward == forwards - 1
        for i, c in enumerate(compute):
            wait = 0.0
            if i in position:
                if not step:
                    wait = copy[i]
                elif keep_all and forward:
                    wait = 0.0
                else:
                    wait = max(0.0, ready[i] - t)
                t += wait + serial.get(i, 0.0)
            t += c
            if i in position and step and not keep_all:
                issue((position[i] + step) % n, t)
            if last:
                waits[i] = wait
        t += other
        duration = t - begin
    return duration, waits


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
    source: str  # "host" or "disk"
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
        )

    def copy_s(self, index: int) -> float:
        return self.layer_bytes[index] / self.copy_bytes_per_s if self.copy_bytes_per_s else 0.0

    def serial_s(self, index: int) -> float:
        return self.layer_bytes[index] * self.serial_s_per_byte

    def predict(self, compute_s: Sequence[float], other_s: float) -> tuple[float, list[float]]:
        """Seconds per forward for these measured compute times under this plan, and each layer's wait."""
        return simulate(
            compute_s, other_s, self.offloaded, {i: self.copy_s(i) for i in self.offloaded},
            {i: self.serial_s(i) for i in self.offloaded}, self.prefetch_step,
        )  # fmt: skip

    # -- JSON

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        try:
            data = dict(data)
            data["workloads"] = {k: Workload(**w) for k, w in data["workloads"].items()}
            return cls(**data)
        except (KeyError, TypeError, AttributeError) as e:
            raise OffloadError(f"`plan` is not a weightlift plan ({e}): make one with weightlift.plan()") from None

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
            + (f", prefetch step {self.prefetch_step}, from {self.source}" if n else " (everything fits)"),
            f"device memory {format_size(self.device_bytes)} of {format_size(self.budget)} budget "
            f"(resident {format_size(self.resident_bytes)} + pool {format_size(self.pool_bytes)}); "
            f"host RAM allocated {format_size(self.host_bytes)}"
            + (f" of {format_size(self.host_budget)}" if self.host_budget is not None else ""),
            f"link: {self.link}",
        ]
        for w in self.workloads.values():
            head.append(
                f"predicted {w.name}: {w.predicted_s * 1e3:.2f} ms per forward ({w.bound}-bound; "
                f"compute {sum(w.compute_s) * 1e3:.2f} ms in layers + {w.other_s * 1e3:.2f} ms elsewhere, "
                f"exposed wait {sum(w.wait_s) * 1e3:.2f} ms)"
            )
        return "\n".join(head)

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


# ---------------------------------------------------------------------------------------------- analysis


def fingerprint(model: nn.Module) -> str:
    """Of every parameter's and buffer's name, dtype and shape: what a saved plan must match."""
    items = [
        [name, str(t.dtype), list(t.shape)]
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    ]
    return hashlib.blake2b(json.dumps([type(model).__name__, items]).encode(), digest_size=10).hexdigest()


@dataclass
class _Model:
    stacks: list[str]
    names: list[str]
    layers: list[nn.Module]
    nbytes: list[int]  # slot bytes per layer
    data_bytes: list[int]  # weights per layer, as stored
    other_bytes: int  # weights outside the offloadable tensors of the layers


def _analyse(model: nn.Module, layers: Any, adapters: Sequence) -> _Model:
    from .adapters import BUILTIN_ADAPTERS
    from .apply import _collect, _leaves, _unique_bytes, layer_list
    from .models import find_stacks
    from .storage import Layout

    stacks = find_stacks(model, layers)
    names, modules = layer_list(stacks)
    adapters = (*adapters, *BUILTIN_ADAPTERS)
    entries, resident = _collect(model, names, modules, OffloadConfig(), adapters)
    layouts = {i: Layout.of(es) for i, es in entries.items()}
    counted = [leaf for t in resident for leaf in (_leaves("resident tensor", t, adapters) or [])]
    return _Model(
        [name for name, _ in stacks], names, modules,
        [layouts[i].nbytes if i in layouts else 0 for i in range(len(modules))],
        [layouts[i].data_bytes if i in layouts else 0 for i in range(len(modules))],
        _unique_bytes(counted),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def h2d_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes per second of a pinned host to ``device`` copy of ``nbytes``."""
    nbytes = max(nbytes, 1 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    seconds = _time(lambda: dst.copy_(src, non_blocking=True), device, reps)
    return nbytes / max(seconds, 1e-9)


def disk_read_rate(folder: Path, nbytes: int) -> float:
    """Bytes per second of one cold read (page cache dropped) of a temporary file of ``nbytes`` (at most
    256 MiB) in ``folder``."""
    nbytes = min(max(nbytes, 1 << 20), 256 << 20)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".weightlift-probe-") as f:
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(f.tell())
        start = time.perf_counter()
        got = os.preadv(f.fileno(), [buffer], 0)
        return got / max(time.perf_counter() - start, 1e-9)


def mapped_overhead(
    model: nn.Module, info: _Model, run: Callable[[], Any], resident: Sequence[float], folder: Path, reps: int
) -> float:
    """Seconds per byte that computing on the mapped layer cache adds to a layer's compute on a CPU target
    (page faults, read-ahead and release advice, the hooks: serial, inside compute), measured on this
    model with weightlift itself: a few of its layers (spread along the stack, enough to hold 96 MiB, so
    that as in the real run nothing stays in the CPU caches) are offloaded from a temporary cache and
    their compute is compared with ``resident``, theirs without offloading."""
    from .apply import offload

    n = len(info.names)
    picks = sorted(_spread_order(n)[: min(n, max(2, -(-_WORKING_SET // max(max(info.nbytes), 1))))])
    picks = [i for i in picks if info.nbytes[i]]
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".weightlift-probe-") as tmp:
        config = OffloadConfig(layers=tuple(info.stacks), indices=tuple(picks), source="disk", disk_path=tmp)
        with offload(model, device=cpu, config=config):
            mapped, _ = measure_layers(info.layers, run, cpu, reps)
    rates = [max(0.0, mapped[i] - resident[i]) / info.nbytes[i] for i in picks]
    return statistics.median(rates) if rates else 0.0


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def language_model_workloads(model: nn.Module, device: torch.device, prompt_tokens: int = PROMPT_TOKENS):
    """Runners for a prefill of ``prompt_tokens`` and a decode step (with the prefill's KV cache) of a
    transformers-style language model, or None when the model does not look like one."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or not hasattr(model, "generate"):
        return None
    ids = torch.randint(3, max(vocab, 4), (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    state: dict = {}

    def prefill() -> None:
        state["cache"] = model(ids, use_cache=True).past_key_values

    def decode() -> None:
        if "cache" not in state:
            prefill()
        model(ids[:, -1:], past_key_values=state["cache"], use_cache=True)

    return {"prefill": prefill, "decode": decode}


def sample_workloads(model: nn.Module, sample: Any, device: torch.device) -> dict[str, Callable[[], Any]]:
    """The forwards to measure: the given ``sample`` (a tensor, a tuple of args or a dict of kwargs), or,
    for a language model, a prefill and a decode step."""
    if sample is None:
        found = language_model_workloads(model, device)
        if found is None:
            raise OffloadError(
                f"`sample` is needed for {type(model).__name__}: pass an input for one forward (a tensor, a tuple "
                "of arguments or a dict of keyword arguments) so weightlift can time its layers"
            )
        return found

    def to(x):
        return x.to(device) if isinstance(x, torch.Tensor) else x

    if isinstance(sample, torch.Tensor):
        return {"sample": lambda: model(to(sample))}
    if isinstance(sample, dict):
        return {"sample": lambda: model(**{k: to(v) for k, v in sample.items()})}
    if isinstance(sample, (tuple, list)):
        return {"sample": lambda: model(*[to(v) for v in sample])}
    raise OffloadError(
        f"`sample` must be a tensor, a tuple of arguments or a dict of keyword arguments, got {type(sample).__name__}"
    )


def measure_layers(
    layers: Sequence[nn.Module], run: Callable[[], Any], device: torch.device, reps: int = 5
) -> tuple[list[float], float]:
    """Median compute seconds of each layer, and of the rest of the forward, over ``reps`` runs of ``run``
    (after one warm-up). The clock of a layer starts after its other pre-hooks (a load by weightlift's
    own hook, say) and that load counts neither as the layer's compute nor as the rest of the forward."""
    marks: dict[int, list[float]] = {}
    starts: dict[int, float] = {}
    loads: list[float] = []
    handles = []
    for i, layer in enumerate(layers):

        def enter(module, args, i=i):
            _sync(device)
            starts[i] = time.perf_counter()

        def before(module, args, i=i):
            _sync(device)
            now = time.perf_counter()
            loads.append(now - starts[i])
            starts[i] = now

        def after(module, args, output, i=i):
            _sync(device)
            marks.setdefault(i, []).append(time.perf_counter() - starts.pop(i))

        handles += [
            layer.register_forward_pre_hook(enter, prepend=True),
            layer.register_forward_pre_hook(before),
            layer.register_forward_hook(after),
        ]
    try:
        with torch.inference_mode():
            run()
            totals = []
            per_run: list[list[float]] = []
            for _ in range(reps):
                marks.clear()
                loads.clear()
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                totals.append(time.perf_counter() - start - sum(loads))
                per_run.append([sum(marks.get(i, [])) for i in range(len(layers))])
    finally:
        for h in handles:
            h.remove()
    compute = [statistics.median(r[i] for r in per_run) for i in range(len(layers))]
    other = max(0.0, statistics.median(t - sum(r) for t, r in zip(totals, per_run)))
    return compute, other


def time_forwards(
    runners: dict[str, Callable[[], Any]], device: torch.device, reps: int = 9, rounds: int = 2
) -> dict[str, float]:
    """Seconds of one forward of each workload: the lower of ``rounds`` medians of ``reps`` runs (after one
    warm-up), the rounds interleaved across workloads, so that a burst of other work on the machine
    during one round does not count. For comparing with a plan, which measures the same way."""
    out: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runners.items():
                run()
                seconds = _time(run, device, reps)
                out[name] = min(out.get(name, seconds), seconds)
    return out


# ---------------------------------------------------------------------------------------------- choosing


def _spread_order(n: int) -> list[int]:
    """Positions 0..n-1 ordered so that every prefix is spread evenly along the stack (van der Corput)."""
    order, seen = [], set()
    k = 1
    while len(order) < n:
        for j in range(1, 2 * k, 2):
            p = min(n - 1, int(j * n / (2 * k)))
            if p not in seen:
                seen.add(p)
                order.append(p)
        k *= 2
    return order


def _pinned_size(nbytes: int, device: torch.device) -> int:
    """Host bytes a pinned block of ``nbytes`` takes: CUDA's caching host allocator rounds up to a power of 2."""
    if device.type == "cuda" and nbytes > 0:
        return 1 << (nbytes - 1).bit_length()
    return nbytes


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
    Raises `OffloadError` when no plan fits, stating the minimum budget. Measuring runs the model; on a CPU
    target a few layers are also offloaded for a moment (they come back bitwise equal, in new storage).
    """
    from .apply import offload, resolve_device

    if not isinstance(model, nn.Module):
        raise OffloadError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    dev = resolve_device(device)
    budget = parse_size(budget, name="budget")
    host_budget = None if host_budget is None else parse_size(host_budget, name="host_budget")
    if any(t.is_meta for t in model.parameters()):
        raise OffloadError(
            "`model` has parameters on the meta device: plan() times the model's layers, so load its weights "
            "first, or offload with an explicit OffloadConfig"
        )
    info = _analyse(model, layers, adapters)
    n = len(info.names)
    total = info.other_bytes + sum(info.data_bytes)
    if budget < info.other_bytes + max(info.nbytes, default=0):  # refused before measuring anything
        _too_small(model, budget, host_budget, info.other_bytes + max(info.nbytes, default=0))
    runners = sample_workloads(model, sample, dev)
    goal = "decode" if "decode" in runners else next(iter(runners))
    folder = Path(disk_path).expanduser() if disk_path is not None else default_cache_dir()
    cpu = dev.type == "cpu"

    # the link, for the tier the offloaded layers will come from
    largest = max(info.nbytes, default=0)
    if cpu:
        folder.mkdir(parents=True, exist_ok=True)
        read, fault = disk_read_rate(folder, largest), 0.0
        available = _available_ram()
        warm = available is None or total <= 0.8 * available  # the page cache can keep the layer cache
        link = f"layer cache mapped in place from {folder}"
        copy_rate = 0.0 if warm else read
        link += " (page cache: page faults only)" if warm else f" (disk reads at {read / 1e6:.0f} MB/s)"
    else:
        copy_rate = h2d_bandwidth(dev, largest)
        fault, link = 0.0, f"pinned host RAM -> {dev} at {copy_rate / 1e9:.1f} GB/s"

    # compute per layer: in place when the model already lives on the device (a CPU target), else under a
    # temporary offload of every layer with prefetch off (so it needs no more device memory than any plan)
    measured: dict[str, tuple[list[float], float]] = {}
    in_place = all(t.device == dev for t in (*model.parameters(), *model.buffers()))
    probe = None if in_place else offload(model, device=dev, config=OffloadConfig(layers=tuple(info.stacks),
                                                                                   prefetch_step=0))  # fmt: skip
    try:
        for _ in range(2):  # two rounds, interleaved; per workload the one with the faster forward counts
            for name, run in runners.items():
                compute, other = measure_layers(info.layers, run, dev, reps)
                if name not in measured or sum(compute) + other < sum(measured[name][0]) + measured[name][1]:
                    measured[name] = (compute, other)
    finally:
        if probe is not None:
            probe.remove()
    if cpu and any(info.nbytes) and total > budget:  # offloading will be needed: what it adds per byte
        fault = mapped_overhead(model, info, runners[goal], measured[goal][0], folder, reps)

    def memory(chosen: list[int], step: int, src: str) -> tuple[int, int, int]:
        slot = max((info.nbytes[i] for i in chosen), default=0)
        resident = total - sum(info.data_bytes[i] for i in chosen)
        if not chosen:
            return resident, 0, 0
        if cpu:
            return resident, slot, 0  # the mapped window of the layer being computed
        pool = (max(cyclic_slots(len(chosen), step)) + 1 if step else 1) * slot
        if src == "host":
            return resident, pool, sum(_pinned_size(info.nbytes[i], dev) for i in chosen)
        return resident, pool, 2 * _pinned_size(slot, dev)

    # on an accelerator with a host budget, layers that do not fit host RAM come from a layer cache
    staged_read = disk_read_rate(folder, largest) if not cpu and host_budget is not None else 0.0
    spread = {p: r for r, p in enumerate(_spread_order(n))} if n else {}
    order = sorted(range(n), key=lambda i: (-info.nbytes[i], spread[i]))
    compute, other = measured[goal]
    best: tuple | None = None
    minimum = None
    for k in range(n + 1):
        chosen = sorted(order[:k])
        for step in range(1, max(1, min(k, 8)) + 1) if k else [1]:
            for src in (["disk"] if cpu else ["host", "disk"] if staged_read else ["host"]) if k else ["host"]:
                resident, pool, host = memory(chosen, step, src)
                need = resident + pool
                minimum = need if minimum is None else min(minimum, need)
                if need > budget or (host_budget is not None and host > host_budget):
                    continue
                rate = copy_rate if src == "host" or cpu else 1 / (1 / copy_rate + 1 / staged_read)
                copies = {i: info.nbytes[i] / rate if rate else 0.0 for i in chosen}
                serial = {i: info.nbytes[i] * fault for i in chosen}
                predicted, _ = simulate(compute, other, chosen, copies, serial, step)
                if best is None or predicted < best[0] * (1 - _TIE):  # ties: fewer layers, smaller step
                    best = (predicted, need, chosen, step, src, resident, pool, host, rate)
    if best is None:
        _too_small(model, budget, host_budget, minimum or 0)
    predicted, need, chosen, step, src, resident, pool, host, rate = best
    result = Plan(
        model=type(model).__name__, fingerprint=fingerprint(model), device=str(dev), budget=budget,
        host_budget=host_budget, stacks=info.stacks, layer_names=info.names, layer_bytes=info.nbytes,
        offloaded=chosen, prefetch_step=step if chosen else 1, source=src if chosen else "host",
        disk_path=str(folder) if chosen and src == "disk" else None, mmap=True, resident_bytes=resident,
        pool_bytes=pool, host_bytes=host, link=link if chosen else "none (nothing offloaded)",
        copy_bytes_per_s=rate if chosen else 0.0, serial_s_per_byte=fault if chosen else 0.0,
        workloads={name: Workload(name, c, o) for name, (c, o) in measured.items()}, goal=goal,
    )  # fmt: skip
    for w in result.workloads.values():
        w.predicted_s, w.wait_s = result.predict(w.compute_s, w.other_s)
        exposed = sum(w.wait_s) + sum(result.serial_s(i) for i in result.offloaded)
        w.bound = "link" if exposed > 0.5 * (w.predicted_s - exposed) else "compute"
    log.info("weightlift plan:\n%s", result)
    return result


def check_plan(plan_: Plan, model: nn.Module, device: torch.device) -> None:
    """Refuse a plan made for another model or device."""
    if not isinstance(plan_, Plan):
        raise OffloadError(f"`plan` must be a weightlift.Plan (from weightlift.plan()), got {type(plan_).__name__}")
    if plan_.fingerprint != fingerprint(model):
        raise OffloadError(
            f"`plan` was made for another model ({plan_.model}, fingerprint {plan_.fingerprint}); this "
            f"{type(model).__name__} has other tensors: make a new plan with weightlift.plan(model, ...)"
        )
    if torch.device(plan_.device) != device:
        raise OffloadError(
            f"`plan` was made for device {plan_.device}, not {device}: pass device={plan_.device!r} or plan again"
        )
