"""Mixture-of-experts layers at expert granularity: move only the experts a token uses.

A decode token of a mixture of experts needs a layer's dense part (attention, norms, the router, shared
experts) and the few experts its router picks, yet a whole layer is mostly experts. Here:

- `find_experts` finds a layer's expert stacks by structure, never by class name: a module whose direct
  parameters all lead with the same dimension E (transformers 5's fused ``experts.gate_up_proj``
  ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, biases and MXFP4 blocks alike), or a ``ModuleList`` of E
  modules of one shape; beside it, a router whose weight is ``[E, H]``. Shared experts and routers are
  ordinary modules and stay in the dense part. The user can name the stacks instead (``experts=``).
- `LayerExperts` turns a layer's `storage.Layout` into byte ranges: the dense ranges, and per expert the
  ranges of its slice of every expert tensor.
- `ExpertStreams` runs it: the layer's transfer (or read-ahead) covers the dense ranges and the experts
  predicted for it; a forward pre-hook on the experts module reads the router's choice (the integer tensor
  the experts are called with) and moves the chosen experts not there yet, before they compute. When a
  forward's tokens choose more than half of a stack's experts (prefill, batches) the whole stack moves at
  once. Fused experts compute only on the experts they are given tokens for (transformers' eager,
  ``batched_mm`` and ``grouped_mm`` implementations alike), and each expert of a ``ModuleList`` runs only
  when called, so the bytes of experts not moved are never read: outputs are exact whatever was
  predicted; a wrong guess costs bytes, never correctness.

Lookahead (``expert_lookahead``): ``"previous"`` predicts that a layer uses the experts it used in its
last forward; ``"router"`` applies the layer's router weight to the hidden state entering the previous
MoE layer's experts. Off by default: with routing spread evenly a guess mostly moves bytes nobody reads
(see the benchmark in ``benchmarks/moe_bench.py``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from . import ops
from .dtypes import leaf_span
from .errors import OffloadError
from .report import ExpertReport
from .storage import Layout

log = logging.getLogger(__name__)

WHOLE_AT = 0.5  # a forward whose tokens choose more than this share of a stack's experts moves them all

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class ExpertStack:
    """One stack of experts inside a layer: its module path, the expert count, and how it is kept."""

    path: str  # dotted module path inside the layer, e.g. "mlp.experts"
    count: int  # E
    fused: bool  # True: parameters leading with E; False: a ModuleList of E modules
    router: str | None = None  # dotted path of the router module inside the layer, when found


def _direct(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in module._parameters.items() if t is not None]


def _fused_count(module: nn.Module) -> int | None:
    """E when every direct parameter of ``module`` leads with the same E > 1, at least one of them is a stack
    of matrices (3-D or more), and it has no other weights."""
    params = _direct(module)
    if not any(t.dim() >= 3 for _, t in params) or any(list(_direct(m)) for _, m in module.named_children()):
        return None
    leads = {t.shape[0] if t.dim() >= 2 else None for _, t in params}
    (lead,) = leads if len(leads) == 1 else (None,)
    return lead if lead is not None and lead > 1 else None


def _list_count(module: nn.Module) -> int | None:
    """E when ``module`` is a ModuleList of E > 1 modules of one type with parameters of the same shapes."""
    if not isinstance(module, nn.ModuleList) or len(module) < 2:
        return None
    first = module[0]
    shapes = [(n, tuple(t.shape), t.dtype) for n, t in first.named_parameters()]
    if not shapes:
        return None
    for other in module:
        theirs = [(n, tuple(t.shape), t.dtype) for n, t in other.named_parameters()]
        if type(other) is not type(first) or theirs != shapes:
            return None
    return len(module)


def _router_of(parent: nn.Module, name: str, count: int, prefix: str) -> str | None:
    """A sibling of ``name`` under ``parent`` whose weight is ``[count, H]``: the router."""
    for other, child in parent.named_children():
        weight = child._parameters.get("weight") if other != name else None
        if weight is not None and weight.dim() == 2 and weight.shape[0] == count:
            return f"{prefix}{other}"
    return None


def _stack(layer: nn.Module, path: str) -> ExpertStack | None:
    module = layer.get_submodule(path)
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    prefix = f"{parent_path}." if parent_path else ""
    for fused, count in ((True, _fused_count(module)), (False, _list_count(module))):
        if count is not None:
            return ExpertStack(path, count, fused, _router_of(parent, name, count, prefix))
    return None


KNOWN = ("eager", "batched_mm", "grouped_mm")  # transformers' experts forwards that index only chosen experts


def _reads_only_chosen(module: nn.Module) -> bool:
    """Fused experts whose forward dispatches through transformers' ``ExpertsInterface`` (the attributes its
    ``use_experts_implementation`` decorator sets) to an implementation that reads only chosen experts."""
    config = getattr(module, "config", None)
    return hasattr(module, "is_transposed") and getattr(config, "_experts_implementation", None) in KNOWN


def find_experts(layer: nn.Module, names: str | Sequence[str] | None = None, where: str = "layer") -> list[ExpertStack]:
    """The expert stacks of ``layer``. Detected (``names`` None): a stack needs a router beside it, and fused
    experts a forward known to read only the experts it is called for (`KNOWN`).
    Named (module paths inside the layer, or ``fnmatch`` patterns such as ``"*.experts"``): each module
    named must be an expert stack, or `OffloadError` says what it is instead."""
    if names is None:
        found = []
        for path, module in layer.named_modules():
            stack = _stack(layer, path) if path else None
            if stack is None or stack.router is None:
                continue
            if stack.fused and not _reads_only_chosen(module):
                log.info("`%s.%s` looks like fused experts, but its forward is not one weightlift knows to read only "
                         "the experts it is given tokens for: it moves whole; name it with `experts=` to stream it "
                         "expert by expert", where, path)  # fmt: skip
                continue
            found.append(stack)
        return found
    patterns = (names,) if isinstance(names, str) else tuple(names)
    found = []
    for pattern in patterns:
        paths = [p for p, _ in layer.named_modules() if p and fnmatch.fnmatchcase(p, pattern)]
        if not paths:
            raise OffloadError(
                f"`experts`={pattern!r} names no module of `{where}`; its modules look like "
                f"{[p for p, _ in layer.named_modules() if p][:6]}"
            )
        for path in paths:
            stack = _stack(layer, path)
            if stack is None:
                module = layer.get_submodule(path)
                raise OffloadError(
                    f"`experts`={pattern!r} names `{where}.{path}` ({type(module).__name__}), which is not a stack "
                    "of experts: it must hold parameters that all lead with the expert count [E, ...], or be a "
                    "ModuleList of E modules of one shape. Name the experts module itself (e.g. 'mlp.experts')"
                )
            found.append(stack)
    return found


def expert_bytes(layer: nn.Module, stack: ExpertStack) -> int:
    """Bytes of one expert of ``stack`` as stored (from shapes: works on meta skeletons too)."""
    module = layer.get_submodule(stack.path)
    if stack.fused:
        return sum(t.numel() // stack.count * t.element_size() for _, t in _direct(module))
    return sum(t.numel() * t.element_size() for t in module[0].parameters())


def routed_bytes(layers: Sequence[nn.Module], nbytes: Sequence[int], run: Callable[[], object]) -> list[int] | None:
    """Bytes each layer moves per forward of ``run`` at expert granularity (for the planner): its dense
    part plus the experts that forward's tokens choose (every expert where more than half are chosen).
    ``nbytes``: each layer's whole size. None when no layer has experts. Runs ``run`` once."""
    stacks = [find_experts(layer) for layer in layers]
    if not any(stacks):
        return None
    chosen: dict[tuple[int, int], set[int]] = {}
    handles = []
    for i, (layer, found) in enumerate(zip(layers, stacks)):
        for s, stack in enumerate(found):
            module = layer.get_submodule(stack.path)

            def seen(module, args, kwargs, key=(i, s), count=stack.count):
                index = _routing(args, kwargs)
                picked = range(count) if index is None else {e for e in index.reshape(-1).tolist() if 0 <= e < count}
                chosen.setdefault(key, set()).update(picked)

            if stack.fused:
                handles.append(module.register_forward_pre_hook(seen, with_kwargs=True))
            else:
                for e, expert in enumerate(module):
                    handles.append(expert.register_forward_pre_hook(
                        lambda m, a, k, key=(i, s), e=e: chosen.setdefault(key, set()).add(e), with_kwargs=True))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, (layer, found) in enumerate(zip(layers, stacks)):
        moved = nbytes[i]
        for s, stack in enumerate(found):
            n = len(chosen.get((i, s), ()))
            moved -= expert_bytes(layer, stack) * (stack.count - (stack.count if n > WHOLE_AT * stack.count else n))
        out.append(max(moved, 0))
    return out


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(whole: tuple[int, int], taken: Ranges) -> Ranges:
    out, at = [], whole[0]
    for a, b in _merge(taken):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < whole[1]:
        out.append((at, whole[1]))
    return out


def nbytes_of(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


@dataclass
class StackUnits:
    """The byte ranges (in the layer's slot layout) of each expert of one stack."""

    stack: ExpertStack
    experts: list[Ranges]  # per expert
    whole: Ranges  # every expert, merged

    def of(self, chosen: Sequence[int]) -> Ranges:
        return _merge([r for e in chosen for r in self.experts[e]])


@dataclass
class LayerExperts:
    """One offloaded layer cut into its dense part and its experts' units."""

    dense: Ranges
    stacks: list[StackUnits]

    @property
    def dense_bytes(self) -> int:
        return nbytes_of(self.dense)

    @property
    def expert_bytes(self) -> int:
        return sum(nbytes_of(s.whole) for s in self.stacks)

    @classmethod
    def of(cls, layout: Layout, stacks: list[ExpertStack], where: str) -> LayerExperts | None:
        """The units of ``layout``; None when no stack's tensors are in it (``params`` left them resident)."""
        units = []
        for stack in stacks:
            experts: list[Ranges] = [[] for _ in range(stack.count)]
            for entry in layout.entries:
                if not entry.qualname.startswith(f"{stack.path}."):
                    continue
                rest = entry.qualname[len(stack.path) + 1 :]
                for spec, offset in zip(entry.specs, entry.offsets):
                    if not stack.fused:  # a ModuleList: the leaf belongs to the expert its name starts with
                        experts[int(rest.split(".")[0])].append((offset, offset + leaf_span(spec)))
                    elif spec.dim() >= 1 and spec.shape[0] == stack.count and spec.is_contiguous():
                        chunk = spec.stride(0) * spec.element_size()
                        for e in range(stack.count):
                            experts[e].append((offset + e * chunk, offset + (e + 1) * chunk))
                    else:  # a leaf not split by expert (a scale of the whole tensor, say) travels with the dense part
                        log.info("`%s.%s` is not split by expert: it moves with the dense part", where, entry.qualname)
            if any(experts):
                merged = [_merge(r) for r in experts]
                units.append(StackUnits(stack, merged, _merge([r for rs in merged for r in rs])))
        if not units:
            return None
        taken = [r for u in units for r in u.whole]
        return cls(_minus((0, layout.nbytes), taken), units)


@dataclass
class ExpertCounters:
    """What expert-level streaming did so far (see `report.ExpertReport`)."""

    dense_bytes: int = 0  # bytes of dense parts moved (copied, read or read ahead)
    expert_bytes: int = 0  # bytes of experts moved
    routed: int = 0  # stack forwards that moved only the chosen experts
    whole: int = 0  # stack forwards that moved every expert (most were chosen, or no routing was seen)
    used: int = 0  # experts computed on (per stack forward, distinct)
    hits: int = 0  # of those, already in place: moved ahead, or still in the layer's slot from its last run
    misses: int = 0  # of those, moved when the router chose them
    predicted: int = 0  # experts moved ahead by the lookahead
    predicted_used: int = 0  # of those, used
    tokens: int = 0  # tokens through the first expert stack


def _routing(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The integer tensor of expert indices the experts module is called with, if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool and value.numel():  # fmt: skip
            return value
    return None


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


@dataclass
class _State:
    """Per offloaded position: which experts its slot (or read-ahead) holds since it was last loaded."""

    moved: list[set[int]]  # per stack: experts moved since the layer was last loaded
    used: list[set[int]]  # per stack: experts computed on since then
    ahead: list[set[int]] = field(default_factory=list)  # per stack: predicted experts not used yet
    pending: object = None  # engine ticket of the predicted experts' transfer, while one may be in flight
    last: list[set[int]] = field(default_factory=list)  # per stack: experts used in the layer's last run
    guess: list[list[int]] = field(default_factory=list)  # per stack: the router lookahead's prediction


class Mover(Protocol):
    """How byte ranges of an offloaded position's layout get where compute reads them: copied into its
    slot by the copy engine, or read ahead in the mapped file (`apply` builds one of each)."""

    def ahead(self, position: int, ranges: Ranges) -> object:
        """Start moving ``ranges`` (the slot's last reader has run); a ticket for `now`, or None."""

    def now(self, position: int, ranges: Ranges, pending: object, present: Ranges) -> None:
        """Compute issued from now on sees ``ranges``, and the move ``pending`` (a ticket or None) has landed.
        ``present``: the other ranges compute will read, moved before (a mapped file asks for them again:
        their pages may have left the page cache since, and a fault would read the disk's read-ahead
        window around each one)."""


class ExpertStreams:
    """The run-time side: hooks on every offloaded layer's expert modules, the lookahead, the counters."""

    def __init__(self, units: dict[int, LayerExperts], modules: dict[int, nn.Module], lookahead: str | None,
                 routers: dict[int, list[torch.Tensor | None]] | None = None,
                 detected: bool = True) -> None:  # fmt: skip
        self.units = units  # offloaded position -> its units
        self.detected = detected  # stacks found by `find_experts` (not named): their forward is checked each call
        self.modules = modules  # offloaded position -> the layer module
        self.lookahead = lookahead
        self.routers = routers or {}  # position -> per stack, a resident copy of the router weight ("router")
        self.counters = ExpertCounters()
        self.mover: Mover | None = None
        self.state = {p: _State([set() for _ in u.stacks], [set() for _ in u.stacks]) for p, u in units.items()}
        self.hooks: list = []
        self.stack_hooks: list[StackHook] = []  # held here: the ops registry holds them weakly
        self._first = min(units) if units else None
        self._order = sorted(units)
        self._warned = False

    def install(self, mover: Mover) -> None:
        self.mover = mover
        for position, units in self.units.items():
            layer = self.modules[position]
            for s, stack in enumerate(units.stacks):
                module = layer.get_submodule(stack.stack.path)
                if stack.stack.fused:
                    hook = StackHook(self, position, s)
                    self.stack_hooks.append(hook)
                    self.hooks.append(module.register_forward_pre_hook(hook.fused, with_kwargs=True))
                else:
                    for e, expert in enumerate(module):
                        hook = StackHook(self, position, s, e)
                        self.stack_hooks.append(hook)
                        self.hooks.append(expert.register_forward_pre_hook(hook.called, with_kwargs=True))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks, self.stack_hooks = [], []

    def report(self) -> ExpertReport:
        c, units = self.counters, self.units.values()
        return ExpertReport(
            stacks=sum(len(u.stacks) for u in units),
            experts=sum(s.stack.count for u in units for s in u.stacks),
            dense_bytes=sum(u.dense_bytes for u in units),
            expert_bytes=sum(u.expert_bytes for u in units),
            dense_moved=c.dense_bytes, experts_moved=c.expert_bytes, tokens=c.tokens, routed=c.routed,
            whole=c.whole, used=c.used, hits=c.hits, misses=c.misses, predicted=c.predicted,
            predicted_used=c.predicted_used,
        )  # fmt: skip

    def dense(self, position: int) -> Ranges | None:
        """The ranges a layer's own transfer moves: its dense part (None: not a MoE layer, all of it)."""
        units = self.units.get(position)
        return None if units is None else units.dense

    def loaded(self, position: int) -> None:
        """``position``'s dense part was just sent on its way into place (a prefetch or a synchronous load):
        forget what was moved for it before, and move ahead the experts predicted for it."""
        units, state = self.units.get(position), self.state.get(position)
        if units is None or state is None:
            return
        self.counters.dense_bytes += units.dense_bytes
        if any(state.used):
            state.last = state.used
        state.moved, state.used = [set() for _ in units.stacks], [set() for _ in units.stacks]
        state.ahead = [set() for _ in units.stacks]
        state.pending = None
        guess = state.guess if self.lookahead == "router" else state.last if self.lookahead == "previous" else []
        ranges: Ranges = []
        for s, chosen in enumerate(guess):
            if chosen:
                state.moved[s], state.ahead[s] = set(chosen), set(chosen)
                ranges += units.stacks[s].of(sorted(chosen))
                self.counters.predicted += len(chosen)
        if ranges and self.mover is not None:
            ranges = _merge(ranges)
            self.counters.expert_bytes += nbytes_of(ranges)
            state.pending = self.mover.ahead(position, ranges)

    def _need(self, position: int, s: int, chosen: list[int], whole: bool) -> None:
        """Before stack ``s`` of ``position`` computes on ``chosen``: move what is not there yet."""
        units, state, c = self.units[position], self.state[position], self.counters
        stack = units.stacks[s]
        have = state.moved[s]
        wanted = range(stack.stack.count) if whole else chosen
        missing = [e for e in wanted if e not in have]
        c.used += len(chosen)
        c.hits += sum(1 for e in chosen if e in have)
        c.misses += sum(1 for e in chosen if e not in have)
        state.used[s].update(chosen)
        if state.ahead:
            c.predicted_used += len(state.ahead[s] & set(chosen))
            state.ahead[s] -= set(chosen)
        present = [e for e in wanted if e in have]
        ranges = stack.of(missing)
        c.expert_bytes += nbytes_of(ranges)
        assert self.mover is not None
        self.mover.now(position, ranges, state.pending, stack.of(present))  # waits for experts in flight
        state.pending = None
        have.update(missing)

    def route(self, position: int, s: int, hidden: torch.Tensor | None, index: torch.Tensor | None) -> None:
        """Stack ``s`` of ``position`` is about to compute on ``hidden`` with the expert indices ``index``
        (None: unknown, so every expert moves)."""
        count = self.units[position].stacks[s].stack.count
        rows = hidden.reshape(-1, hidden.shape[-1]).shape[0] if hidden is not None else None
        if position == self._first and rows is not None:
            self.counters.tokens += rows
        if index is not None and (index.dim() == 0 or index.reshape(-1, index.shape[-1]).shape[0] != rows):
            index = None  # not one row of choices per token: not the routing
        if index is None:
            if not self._warned:
                self._warned = True
                log.warning("the experts at `%s` were called without one row of expert indices per token: moving "
                            "all of them", self.units[position].stacks[s].stack.path)  # fmt: skip
            self.counters.whole += 1
            self._need(position, s, list(range(count)), True)
            return
        chosen = sorted({e for e in index.reshape(-1).tolist() if 0 <= e < count})
        whole = len(chosen) > WHOLE_AT * count
        if whole:
            self.counters.whole += 1
        else:
            self.counters.routed += 1
        self._need(position, s, chosen, whole)
        if self.lookahead == "router" and hidden is not None:
            self._guess_next(position, hidden, index.shape[-1])

    def _guess_next(self, position: int, hidden: torch.Tensor, k: int) -> None:
        """The router lookahead: the next MoE layer's router applied to this layer's experts' input."""
        at = self._order.index(position)
        if at + 1 >= len(self._order):
            return
        nxt = self._order[at + 1]
        guesses = []
        for weight in self.routers.get(nxt, []):
            if weight is None:
                guesses.append([])
                continue
            x = hidden.reshape(-1, hidden.shape[-1])[-1:]  # the last token: decode's only one
            logits = torch.nn.functional.linear(x.to(weight.device, weight.dtype), weight)
            guesses.append(sorted(logits.topk(min(k, logits.shape[-1]), dim=-1).indices.reshape(-1).tolist()))
        self.state[nxt].guess = guesses


class StackHook:
    """The forward pre-hook of one expert stack (fused), or of one expert of a ModuleList (``expert``).
    Under `torch.compile` it calls the ``weightlift::experts`` op (`weightlift.ops`), which declares it
    mutates the experts' input: every read of the expert weights that depends on that input runs after it."""

    def __init__(self, streams: ExpertStreams, position: int, s: int, expert: int | None = None) -> None:
        self.streams, self.position, self.s, self.expert = streams, position, s, expert
        self.key = ops.register(self)

    def route(self, hidden: torch.Tensor, index: torch.Tensor | None) -> None:
        if self.expert is None:
            self.streams.route(self.position, self.s, hidden, index)
        else:
            self.streams._need(self.position, self.s, [self.expert], False)

    def fused(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        index, hidden = _routing(args, kwargs), _hidden(args, kwargs)
        if self.streams.detected and not _reads_only_chosen(module):
            index = None  # its experts implementation was changed to one not known to skip unchosen experts
        if hidden is not None and index is not None and torch.compiler.is_compiling():
            torch.ops.weightlift.experts(hidden, index, self.key)
        else:
            self.route(hidden, index)

    def called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _hidden(args, kwargs)
        if hidden is not None and torch.compiler.is_compiling():
            torch.ops.weightlift.experts(hidden, None, self.key)
        else:
            self.route(hidden, None)
