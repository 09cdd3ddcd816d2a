"""The run-time side of expert-level streaming (`weightlift.experts`): the router hook, the lookahead, the counters.

An offloaded MoE layer's own transfer (or read-ahead) covers its dense part and the experts predicted for
it; a forward pre-hook on the experts module reads the router's choice (the integer tensor the experts
are called with) and moves the chosen experts not there yet, before they compute (a `Mover`: the copy
engine into the slot, or read-ahead advice on a mapped file). When a forward's tokens choose more than
half of a stack's experts (prefill, batches) the whole stack moves at once. Outputs are exact whatever
was predicted; a wrong guess costs bytes, never correctness.

Lookahead (``expert_lookahead``): ``"previous"`` predicts that a layer uses the experts it used in its
last forward; ``"router"`` applies the layer's router weight to the hidden state entering the previous
MoE layer's experts. Off by default: measured, a guess mostly moved bytes nobody read (see
``benchmarks/moe_bench.py``).

With a device expert cache (`weightlift.expert_cache`, slots only), a chosen expert the slot lacks is copied
from its cache entry when it has one, and over the link otherwise; then every chosen expert not cached
takes an entry. The lookahead does not move ahead what the cache holds. Whole-stack forwards bypass it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from . import ops
from .expert_cache import ExpertCache
from .experts import WHOLE_AT, LayerExperts, Ranges, hidden_of, merge, nbytes_of, reads_only_chosen, routing_of
from .report import ExpertReport

log = logging.getLogger(__name__)


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
    sought: int = 0  # of the misses in routed forwards, looked for in the device expert cache
    cached: int = 0  # of those, copied from the device expert cache instead of over the link
    cached_bytes: int = 0  # bytes copied from the cache into slots


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

    def slot(self, position: int) -> torch.Tensor:
        """The uint8 device buffer ``position``'s layout lives in while it computes (slots only)."""

    def copy_now(self, position: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Device copies ``(dst, src)`` in compute order, after what was moved for ``position`` so far."""


class ExpertStreams:
    """The run-time side: hooks on every offloaded layer's expert modules, the lookahead, the counters."""

    def __init__(self, units: dict[int, LayerExperts], modules: dict[int, nn.Module], lookahead: str | None,
                 routers: dict[int, list[torch.Tensor | None]] | None = None,
                 detected: bool = True, cache: ExpertCache | None = None) -> None:  # fmt: skip
        self.units = units  # offloaded position -> its units
        self.cache = cache  # the device expert cache, or None
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
            predicted_used=c.predicted_used, cache_entries=self.cache.entries if self.cache else 0,
            cache_bytes=self.cache.nbytes if self.cache else 0, sought=c.sought, cached=c.cached,
            cached_bytes=c.cached_bytes,
            evictions=self.cache.evictions if self.cache else 0,
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
            if self.cache is not None:  # what the cache holds is copied from it when chosen
                chosen = [e for e in chosen if (position, s, e) not in self.cache]
            if chosen:
                state.moved[s], state.ahead[s] = set(chosen), set(chosen)
                ranges += units.stacks[s].of(sorted(chosen))
                self.counters.predicted += len(chosen)
        if ranges and self.mover is not None:
            ranges = merge(ranges)
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
        cache = self.cache if not whole else None  # a whole stack moves in one piece, past the cache
        cached = [e for e in missing if (position, s, e) in cache] if cache is not None else []
        c.sought += len(missing) if cache is not None else 0
        ranges = stack.of([e for e in missing if e not in cached] if cached else missing)
        c.expert_bytes += nbytes_of(ranges)
        assert self.mover is not None
        self.mover.now(position, ranges, state.pending, stack.of(present))  # waits for experts in flight
        state.pending = None
        if cache is not None:
            self._through_cache(position, s, chosen, cached)
        have.update(missing)

    def _through_cache(self, position: int, s: int, chosen: list[int], cached: list[int]) -> None:
        """Copy the experts ``cached`` from their entries into the slot, then give an entry to each chosen
        expert not cached yet (copied out of the slot, where it has landed): both in compute order."""
        cache, c, mover = self.cache, self.counters, self.mover
        assert cache is not None and mover is not None
        stack, slot = self.units[position].stacks[s], mover.slot(position)

        def pairs(e: int, at: int, into_slot: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out, offset = [], 0
            for a, b in stack.experts[e]:
                entry = cache.buffer[at, offset : offset + b - a]
                out.append((slot[a:b], entry) if into_slot else (entry, slot[a:b]))
                offset += b - a
            return out

        found, placed = cache.use([(position, s, e) for e in chosen])
        wanted = set(cached)  # the others found are in the slot already
        into = [pair for (_, _, e), at in found if e in wanted for pair in pairs(e, at, True)]
        c.cached += len(wanted)
        c.cached_bytes += sum(d.numel() for d, _ in into)
        mover.copy_now(position, into)  # issued before any entry given to another expert is filled
        mover.copy_now(position, [pair for (_, _, e), at in placed for pair in pairs(e, at, False)])

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
        index, hidden = routing_of(args, kwargs), hidden_of(args, kwargs)
        if self.streams.detected and not reads_only_chosen(module):
            index = None  # its experts implementation was changed to one not known to skip unchosen experts
        compiling = torch.compiler.is_compiling()
        if hidden is not None and index is not None and compiling:
            torch.ops.weightlift.experts(hidden, index, self.key)
        elif compiling:
            ops.eagerly(lambda: self.route(hidden, index))
        else:
            self.route(hidden, index)

    def called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = hidden_of(args, kwargs)
        compiling = torch.compiler.is_compiling()
        if hidden is not None and compiling:
            torch.ops.weightlift.experts(hidden, None, self.key)
        elif compiling:
            ops.eagerly(lambda: self.route(hidden, None))
        else:
            self.route(hidden, None)
