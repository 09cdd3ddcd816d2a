"""Measuring this machine and a model for the planner: what its layers weigh, how long each takes to
compute on sample inputs, and how fast weights reach the device.

- Layer compute, and the rest of a forward (embeddings, head), on sample inputs: for a language model
  a prefill of 32 tokens and a decode step with its KV cache (medians of several runs, in two
  interleaved rounds of which the faster counts, so that other work on the machine during one round
  does not skew a plan). The clock of a layer stops outside its load by an earlier hook, with the
  device synchronised around each layer.
- The link: pinned host to device copies on an accelerator; a cold disk read; and, on a CPU target,
  where offloaded layers are computed on in place from the mapped layer cache, what that adds to a
  layer's compute (page faults, advice, hooks), measured with weightlift itself on a few of the
  model's own layers (`mapped_overhead`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import BUILTIN_ADAPTERS
from .apply import apply
from .config import OffloadConfig
from .errors import OffloadError
from .files import in_file
from .inventory import collect, layer_list, leaves_of, unique_bytes
from .models import find_stacks
from .schedule import spread_order
from .storage import Layout

PROMPT_TOKENS = 32
_WORKING_SET = 96 << 20  # bytes of probed layers: more than CPU caches hold


@dataclass
class ModelInfo:
    """What planning needs to know of a model's layers, without measuring anything."""


    stacks: list[str]
    names: list[str]
    layers: list[nn.Module]
    nbytes: list[int]  # slot bytes per layer
    data_bytes: list[int]  # weights per layer, as stored
    other_bytes: int  # weights outside the offloadable tensors of the layers

    @property
    def total_bytes(self) -> int:
        return self.other_bytes + sum(self.data_bytes)

    @property
    def minimum_bytes(self) -> int:
        """The smallest budget that runs the model: everything outside the layers + one slot of the largest."""
        return self.other_bytes + max(self.nbytes, default=0)


def analyse(model: nn.Module, layers: Any = None, adapters: Sequence = (), params: tuple[str, ...] = ()) -> ModelInfo:
    """The stacks, each layer's slot and weight bytes, and the bytes outside the layers (with ``params``,
    of the layers' tensors `OffloadConfig.params` names: the rest of each layer counts as outside)."""
    stacks = find_stacks(model, layers)
    names, modules = layer_list(stacks)
    adapters = (*adapters, *BUILTIN_ADAPTERS)
    entries, resident = collect(model, names, modules, OffloadConfig(params=params), adapters)
    layouts = {i: Layout.of(es) for i, es in entries.items()}
    counted = [leaf for t in resident if not in_file(t) for leaf in (leaves_of("resident tensor", t, adapters) or [])]
    return ModelInfo(
        [name for name, _ in stacks], names, modules,
        [layouts[i].nbytes if i in layouts else 0 for i in range(len(modules))],
        [layouts[i].data_bytes if i in layouts else 0 for i in range(len(modules))],
        unique_bytes(counted),
    )  # fmt: skip


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


def disk_read_rate(folder: Path, nbytes: int, cold: bool = True) -> float:
    """Bytes per second of one read of a temporary file of ``nbytes`` (at most 256 MiB) in ``folder``: a
    cold read (page cache dropped), or with ``cold=False`` a read the page cache serves."""
    nbytes = min(max(nbytes, 1 << 20), 256 << 20)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".weightlift-probe-") as f:
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        if cold and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buffer = bytearray(f.tell())
        start = time.perf_counter()
        got = os.preadv(f.fileno(), [buffer], 0)
        return got / max(time.perf_counter() - start, 1e-9)


def checkpoint_read_rate(files: Sequence[Path], nbytes: int, reps: int = 3) -> float:
    """Bytes per second at which layers of ``nbytes`` (at most 256 MiB) are read into a slot from the
    checkpoint ``files`` themselves, as the read tiers read them when the page cache cannot keep them: cold
    (each span's pages handed back first) and handed back after (`files.Stamped.drop`); the median of
    ``reps`` spans spread through the largest file. A file of the disk the run reads, not a new one: the
    probe of a file just written read at 0.5-1.8 GB/s on one disk (`disk_read_rate`) while the 8B
    checkpoint streamed at 1.1-1.3."""
    path = max(files, key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    nbytes = min(max(nbytes, 1 << 20), 256 << 20, size)
    buffer = bytearray(nbytes)
    rates = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for k in range(reps):
            at = (size - nbytes) * k // max(reps - 1, 1)
            os.posix_fadvise(fd, at, nbytes, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            got = os.preadv(fd, [buffer], at)
            rates.append(got / max(time.perf_counter() - start, 1e-9))
            os.posix_fadvise(fd, at, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return statistics.median(rates)


def mapped_overhead(
    model: nn.Module, info: ModelInfo, run: Callable[[], Any], resident: Sequence[float], folder: Path, reps: int
) -> float:
    """Seconds per byte that computing on the mapped layer cache adds to a layer's compute on a CPU target
    (page faults, read-ahead and release advice, the hooks: serial, inside compute), measured on this
    model with weightlift itself: a few of its layers (spread along the stack, enough to hold 96 MiB, so
    that as in the real run nothing stays in the CPU caches) are offloaded from the model's layer cache in
    ``folder`` (written if absent: it holds every layer, and the run the plan is for reads that same file)
    and their compute is compared with ``resident``, theirs without offloading."""

    picks = _probe_picks(info)
    cpu = torch.device("cpu")
    config = OffloadConfig(layers=tuple(info.stacks), indices=tuple(picks), source="disk", disk_path=folder)
    with apply(model, cpu, config):
        mapped, _ = measure_layers(info.layers, run, cpu, reps)
    return _per_byte(mapped, resident, picks, info)


def _probe_picks(info: ModelInfo, room: int | None = None) -> list[int]:
    """The layers a mapping is priced on: a few spread along the stack, enough to hold 96 MiB (at least
    two), those with bytes; with ``room``, only as many as fit it (at least one)."""
    n = len(info.names)
    spread = spread_order(n)[: min(n, max(2, -(-_WORKING_SET // max(max(info.nbytes), 1))))]
    picks, held = [], 0
    for i in spread:
        if info.nbytes[i] and (room is None or held + info.nbytes[i] <= room or not picks):
            picks.append(i)
            held += info.nbytes[i]
    return sorted(picks)


def _per_byte(mapped: Sequence[float], resident: Sequence[float], picks: Sequence[int], info: ModelInfo) -> float:
    """The median over ``picks`` of what computing mapped added to a layer's compute, per byte."""
    rates = [max(0.0, mapped[i] - resident[i]) / info.nbytes[i] for i in picks]
    return statistics.median(rates) if rates else 0.0


def streamed_overhead(
    model: nn.Module, info: ModelInfo, run: Callable[[], Any], mapped: Sequence[float], index: Any, room: int,
    reps: int,
) -> tuple[float, dict[int, float]]:
    """`mapped_overhead` for a model whose layers are on the meta device and stream from the checkpoint
    ``index`` (a `checkpoint.CheckpointIndex`): ``mapped`` is each layer's compute measured mapped in place;
    a few layers (at most ``room`` bytes of them, at least one) are read into memory for a moment and timed
    resident while the others stay mapped. Returns the seconds per byte, and those layers' resident compute."""
    from .checkpoint import load_meta

    picks = _probe_picks(info, room)
    others = tuple(i for i, b in enumerate(info.nbytes) if b and i not in picks)
    prefixes = tuple(f"{info.names[i]}." for i in picks)
    cpu = torch.device("cpu")
    undo = load_meta(model, index, keep=lambda name: name.startswith(prefixes))
    try:
        config = OffloadConfig(layers=tuple(info.stacks), indices=others, source="checkpoint",
                               disk_path=str(index.folder))  # fmt: skip
        with apply(model, cpu, config):
            resident, _ = measure_layers(info.layers, run, cpu, reps)
    finally:
        undo()
    return _per_byte(mapped, resident, picks, info), {i: resident[i] for i in picks}


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
        cache = state["cache"]
        if hasattr(cache, "crop"):  # every step decodes after the same prompt (a step appends to the cache)
            cache.crop(prompt_tokens)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)

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


# Measuring stops after this many seconds of runs (at least one after the warm-up): a 16 GB model streamed
# from disk takes seconds per forward, and nine of them per workload and round made planning take minutes.
MEASURE_SECONDS = 10.0


def measure_layers(
    layers: Sequence[nn.Module], run: Callable[[], Any], device: torch.device, reps: int = 5,
    seconds: float = MEASURE_SECONDS,
) -> tuple[list[float], float]:  # fmt: skip
    """Median compute seconds of each layer, and of the rest of the forward, over ``reps`` runs of ``run``
    (after one warm-up), or fewer once they took ``seconds``. The clock of a layer starts after its other
    pre-hooks (a load by weightlift's own hook, say) and that load counts neither as the layer's compute nor
    as the rest of the forward."""
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
            began = time.perf_counter()
            for _ in range(reps):
                if per_run and time.perf_counter() - began > seconds:
                    break
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
