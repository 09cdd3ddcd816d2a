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

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import forecast
from .apply import apply
from .checkpoint import CheckpointIndex, checkpoint_files, mappable
from .config import OffloadConfig, format_size, parse_size, resolve_device
from .distributed import group_of, slowest, world_size
from .errors import OffloadError
from .expert_cache import predicted as cached_moves
from .experts import expert_bytes, find_experts, routed_bytes, token_routes, top_k_of
from .footprint import RunFootprint
from .machine import available_ram
from .measure import (
    MEASURE_SECONDS,
    analyse,
    checkpoint_read_rate,
    disk_read_rate,
    h2d_bandwidth,
    mapped_overhead,
    measure_layers,
    sample_workloads,
    streamed_overhead,
)
from .plan_data import Plan, Workload
from .pool import arena_sizes, pinned_size
from .schedule import cyclic_slots, spread_order

log = logging.getLogger(__name__)

_TIE = 0.02  # a plan must be predicted 2% faster to beat one that offloads fewer layers or uses fewer slots


def default_cache_dir() -> Path:
    """Where plans put the layer cache when no ``disk_path`` is given: ``$WEIGHTLIFT_CACHE`` or
    ``~/.cache/weightlift``."""
    return Path(os.environ.get("WEIGHTLIFT_CACHE") or Path.home() / ".cache" / "weightlift")


# ---------------------------------------------------------------------------------------------- identity


def fingerprint(model: nn.Module) -> str:
    """Of every parameter's and buffer's name, dtype and shape: what a saved plan must match."""
    items = [
        [name, str(t.dtype), list(t.shape)]
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    ]
    return hashlib.blake2b(json.dumps([type(model).__name__, items]).encode(), digest_size=10).hexdigest()


# ---------------------------------------------------------------------------------------------- choosing


def _too_small(
    model: nn.Module, budget: int, host_budget: int | None, minimum: int, reserve: RunFootprint | None = None
) -> None:
    what = f"`budget`={format_size(budget)}"
    if host_budget is not None:
        what += f" with `host_budget`={format_size(host_budget)}"
    run = ""
    if reserve is not None and reserve.nbytes:
        run = (f" plus the run's {format_size(reserve.kv_cache_bytes)} of KV cache for {reserve.tokens} tokens and "
               f"{format_size(reserve.activation_bytes)} of activations")  # fmt: skip
        minimum += reserve.nbytes
    raise OffloadError(
        f"{what} is too small for {type(model).__name__}: the smallest plan needs {format_size(minimum)} "
        f"({minimum} bytes) of device memory (the weights outside the layers plus one slot of the largest "
        f"layer{run}); raise the budget"
        + (" or `host_budget` (or give `disk_path` so layers stream from disk)" if host_budget is not None else "")
        + (" or ask for fewer tokens (`--tokens`) or a shorter prompt" if run else "")
    )


def _cold_rate(checkpoint: Path | None, folder: Path, nbytes: int) -> float:
    """The disk's rate for layers of ``nbytes`` read cold: from the checkpoint's own files when there is one
    (`measure.checkpoint_read_rate`), else from a file written for it in ``folder``."""
    if checkpoint is not None:
        return checkpoint_read_rate(checkpoint_files(checkpoint), nbytes)
    return disk_read_rate(folder, nbytes)


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
    reserve: RunFootprint | None = None,
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
    never holds more of them than ``budget``. ``reserve`` (`weightlift.footprint.RunFootprint`): what the run
    holds besides the weights (its KV cache and activations), taken off ``budget`` before the weights are
    planned, and stated in the plan.
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
    weights_budget = budget - (reserve.nbytes if reserve is not None else 0)  # what the weights may hold
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
    if weights_budget < info.minimum_bytes:  # refused before measuring anything
        _too_small(model, budget, host_budget, info.minimum_bytes, reserve)
    offloading = total > weights_budget  # else nothing is offloaded (an offloaded layer never predicts faster)
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
                copy_rate = _cold_rate(ckpt, folder, largest)
                link += f" (disk reads at {copy_rate / 1e6:.0f} MB/s)"
        else:  # tensors built of several pieces of the checkpoint: read into slots
            copy_rate = disk_read_rate(folder, largest, cold=False) if warm else _cold_rate(ckpt, folder, largest)
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
    routes: list = []  # the sample's tokens, one at a time, as the expert cache would see them
    try:
        for round_ in range(2):  # two rounds, interleaved; per workload the one with the faster forward counts
            for name, run in runners.items():
                if round_ and sum(measured[name][0]) + measured[name][1] > MEASURE_SECONDS / reps:
                    continue  # forwards this long are not disturbed by a burst of other work: one round will do
                compute, other = measure_layers(info.layers, run, dev, reps)
                if name not in measured or sum(compute) + other < sum(measured[name][0]) + measured[name][1]:
                    measured[name] = (compute, other)
        if offloading:
            for name, run in runners.items():
                found = routed_bytes(info.layers, info.nbytes, run)
                if found is not None:
                    moved[name] = found
        if moved and not (cpu and in_place):  # layers go through slots: a device expert cache may pay
            routes = token_routes(info.layers, runners["prefill" if "prefill" in runners else goal])
    finally:
        if probe is not None:
            probe.remove()
    if cpu and offloading and any(info.nbytes) and in_place:  # what computing on the mapped file adds per byte
        if empty:  # measured mapped: a few layers read into memory give what it added
            room = weights_budget - info.other_bytes
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
    cache = _CacheTerms.of(model, info) if routes else None
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
                    if need > weights_budget or (host_budget is not None and host > host_budget):
                        continue
                    rate = copy_rate if src == "host" or cpu else 1 / (1 / copy_rate + 1 / staged_read)
                    carried = part.moved.get(goal, part.nbytes)  # each layer's bytes a forward of `goal` moves
                    entries, hit = 0, None
                    if cache is not None and part.moved:  # what is left of the budget holds experts
                        entries, carried, hit = cache.predict(routes, chosen, weights_budget - need, part, carried)
                    predicted, _ = forecast.predict(compute, other, carried, chosen, step, rate, fault)
                    if best is None or predicted < best[0] * (1 - _TIE):  # ties: fewer layers, smaller step
                        held = entries * (cache.entry_bytes if cache else 0)
                        best = (predicted, need + held, chosen, step, src, resident, pool + held, host, rate, part,
                                (entries, held, hit, carried))  # fmt: skip
    if best is None:
        _too_small(model, budget, host_budget, minimum or 0, reserve)
    predicted, need, chosen, step, src, resident, pool, host, rate, part, (entries, held, hit, carried) = best
    moved = dict(part.moved)
    if entries:
        moved[goal] = carried
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
        expert_cache=entries if chosen else 0, expert_cache_bytes=held if chosen else 0,
        expert_cache_hit_rate=hit if chosen else None,
        kv_cache_bytes=reserve.kv_cache_bytes if reserve else 0,
        activation_bytes=reserve.activation_bytes if reserve else 0, context_tokens=reserve.tokens if reserve else 0,
    )  # fmt: skip
    if result.expert_cache and cpu:
        result.mmap = False  # a cache needs slots: layers are read into them (they could not be mapped anyway)
    for w in result.workloads.values():
        w.predicted_s, w.wait_s = result.predict(w.compute_s, w.other_s, w.name)
        exposed = sum(w.wait_s) + sum(result.serial_s(i, w.name) for i in result.offloaded)
        w.bound = "link" if exposed > 0.5 * (w.predicted_s - exposed) else "compute"
    group = group_of(model)
    result.world_size = world_size(group)
    result = slowest(result, group)  # tensor parallel: every rank uses the plan of the slowest prediction
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


@dataclass
class _CacheTerms:
    """What sizing a device expert cache needs of the model: an entry's bytes (its largest expert), and per
    layer of the stack list its experts' bytes, count and top-k."""

    entry_bytes: int
    expert_total: list[int]  # per layer: bytes of all its experts
    count: list[int]  # per layer: its experts, all stacks
    top_k: list[int]  # per layer: the experts one token uses (1 where unknown)
    memo: dict

    @classmethod
    def of(cls, model: nn.Module, info: Any) -> _CacheTerms | None:
        stacks = [find_experts(layer) for layer in info.layers]
        sizes = [[expert_bytes(layer, s) for s in found] for layer, found in zip(info.layers, stacks)]
        if not any(sizes):
            return None
        config = getattr(model, "config", None)
        return cls(
            max(b for per in sizes for b in per),
            [sum(b * s.count for b, s in zip(per, found)) for per, found in zip(sizes, stacks)],
            [sum(s.count for s in found) for found in stacks],
            [max([top_k_of(layer, s, config) or 1 for s in found], default=1)
             for layer, found in zip(info.layers, stacks)],
            {},
        )  # fmt: skip

    def predict(self, routes: list, chosen: list[int], spare: int, part: _Part, carried: list[int]
                ) -> tuple[int, list[int], float | None]:  # fmt: skip
        """The cache ``spare`` bytes hold for the ``chosen`` layers, and what they move then
        (`expert_cache.predicted`)."""
        dense = [max(0, b - e) for b, e in zip(part.nbytes, self.expert_total)]
        moe = [i for i in chosen if self.count[i]]
        return cached_moves(routes, moe, spare, self.entry_bytes, max((self.top_k[i] for i in moe), default=1),
                            sum(self.count[i] for i in moe), carried, dense, self.memo)  # fmt: skip


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
    ranks = world_size(group_of(model))
    if plan_.world_size != ranks:
        raise OffloadError(
            f"`plan` was made for {plan_.world_size} tensor-parallel rank(s), and this model is sharded over {ranks}: "
            "make the plan again under this world size"
        )
