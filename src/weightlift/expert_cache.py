"""The device expert cache: a fixed number of entries, each one expert's bytes, kept on the device across
forwards, so that an expert chosen again is copied from device memory instead of over the link.

Layers stream into slots that change hands, so without a cache every token copies its chosen experts
over the link again, even those the last token chose too. With one, a chosen expert the layer's slot does
not hold is copied from its cache entry when it has one (device to device) and over the link only when it
has none (a miss); after it lands, a chosen expert not cached yet takes an entry, evicting one by the
policy (``"lru"``: the least recently used; ``"lfu"``: the least often used, ties by recency). Compute
still reads the slot: outputs are exactly what they are without a cache, whatever it holds.

The cache knows keys and entries only; `weightlift.expert_streams` decides what to copy where. Every copy
into or out of an entry is issued in compute order (`engine.Engine.copy_now`), so an entry is never
overwritten while an earlier copy out of it is still to run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

POLICIES = ("lru", "lfu")


class ExpertCache:
    """``entries`` device buffers of ``entry_bytes`` each (one uint8 tensor, allocated once), and which
    expert (a key: position, stack, expert) each holds."""

    def __init__(self, entries: int, entry_bytes: int, device: torch.device, policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ValueError(policy)
        self.entries, self.entry_bytes, self.policy = entries, entry_bytes, policy
        self.buffer = torch.empty((entries, entry_bytes), dtype=torch.uint8, device=device)
        self._where: OrderedDict[Hashable, int] = OrderedDict()  # key -> entry, least recently used first
        self._uses: dict[Hashable, int] = {}  # key -> times used while cached (lfu)
        self._free = list(range(entries - 1, -1, -1))
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self.buffer.untyped_storage().nbytes()

    def entry(self, key: Hashable) -> int | None:
        """The entry holding ``key``, marked used; None when it holds none."""
        at = self._where.get(key)
        if at is not None:
            self._where.move_to_end(key)
            self._uses[key] += 1
        return at

    def __contains__(self, key: Hashable) -> bool:
        return key in self._where

    def place(self, key: Hashable, keep: set | frozenset = frozenset()) -> int | None:
        """An entry for ``key`` (not cached yet), evicting by the policy; keys in ``keep`` (those the
        current forward uses) are evicted last. None: the cache has no entries."""
        if self._free:
            at = self._free.pop()
        elif self._where:
            victim = self._victim(keep)
            at = self._where.pop(victim)
            del self._uses[victim]
            self.evictions += 1
        else:
            return None
        self._where[key], self._uses[key] = at, 1
        return at

    def _victim(self, keep: set | frozenset) -> Hashable:
        order = list(self._where)  # least recently used first
        spare = [k for k in order if k not in keep] or order
        if self.policy == "lru":
            return spare[0]
        return min(spare, key=lambda k: self._uses[k])  # min keeps the first (least recent) of equal counts

    def use(self, keys: list[Hashable]) -> tuple[list[tuple[Hashable, int]], list[tuple[Hashable, int]]]:
        """One stack forward uses ``keys``: ``(found, placed)``, the ``(key, entry)`` of those it holds
        (marked used), and the entries just given to the others (evicting by the policy, the forward's own
        keys last). Copies out of the found entries must be issued before copies into the placed ones."""
        found = [(k, at) for k in keys if (at := self.entry(k)) is not None]
        held = {k for k, _ in found}
        keep = set(keys)
        placed = [(k, at) for k in keys if k not in held and (at := self.place(k, keep)) is not None]
        return found, placed

    def held(self) -> list[Hashable]:
        """The keys cached, least recently used first."""
        return list(self._where)


def replay(forwards: list[tuple[Hashable, list[Hashable]]], entries: int, policy: str = "lru"
           ) -> dict[Hashable, tuple[int, int]]:  # fmt: skip
    """What a cache of ``entries`` would find over ``forwards``, stack forwards in order, each ``(layer,
    keys it uses)``: per layer, ``(looked for, found)`` (for the planner, from the sample's tokens)."""
    cache = ExpertCache(entries, 0, torch.device("cpu"), policy)
    out: dict[Hashable, tuple[int, int]] = {}
    for layer, keys in forwards:
        found, _ = cache.use(keys)
        sought, hit = out.get(layer, (0, 0))
        out[layer] = (sought + len(keys), hit + len(found))
    return out


def entries_for(config, units: dict, layers: dict, where: str, model_config: object = None) -> tuple[int, int]:
    """``(entries, entry_bytes)`` of the cache ``config.expert_cache`` asks for (``(0, 0)``: none), checked
    against the offloaded MoE layers' ``units`` (position -> `experts.LayerExperts`; ``layers``: position ->
    module) before anything changes: `OffloadError` names what is wrong and the fix."""
    from .config import format_size, parse_size
    from .errors import OffloadError
    from .experts import nbytes_of, top_k_of

    asked = config.expert_cache
    if asked is None:
        return 0, 0
    if not units:
        raise OffloadError(
            f"`expert_cache`={asked!r}: no offloaded layer of `{where}` is streamed expert by expert (the model is "
            "dense, its experts stay resident, or its experts move whole): drop expert_cache"
        )
    entry_bytes = max(nbytes_of(r) for u in units.values() for stack in u.stacks for r in stack.experts)
    entries = asked if isinstance(asked, int) else parse_size(asked, name="expert_cache") // entry_bytes
    need, at = 1, None
    for position, u in units.items():
        for stack in u.stacks:
            k = top_k_of(layers[position], stack.stack, model_config)
            if k is not None and k > need:
                need, at = k, f"`{stack.stack.path}` of offloaded layer {position}"
    if entries < need:
        which = f"the {need} experts one token uses in {at}" if at else "one expert"
        raise OffloadError(
            f"`expert_cache`={asked!r} holds {entries} experts of {format_size(entry_bytes)}, fewer than {which}: "
            f"give it at least {need} (expert_cache={need}, or '{format_size(need * entry_bytes)}'), or None"
        )
    return entries, entry_bytes


def predicted(routes: list[tuple[int, list]], chosen: list[int], spare: int, entry_bytes: int, minimum: int,
              keys: int, moved: list[int], dense: list[int], memo: dict | None = None
              ) -> tuple[int, list[int], float | None]:  # fmt: skip
    """For the planner: the cache that ``spare`` bytes of the budget hold (at most ``keys`` entries, the
    experts of the ``chosen`` offloaded layers; none below ``minimum``, a token's top-k), and what each layer
    then moves per decode token: ``moved`` less the share of its experts' bytes (``moved - dense``) the cache
    is predicted to hold, replayed over ``routes`` (`experts.token_routes` of the sample's tokens).
    Returns ``(entries, moved per layer, predicted share found)``; ``memo`` keeps replays across calls."""
    entries = min(keys, spare // entry_bytes) if entry_bytes > 0 and spare > 0 else 0
    if entries < max(minimum, 1):
        return 0, list(moved), None
    inside = set(chosen)
    key = (tuple(sorted(inside)), entries)
    stats = memo.get(key) if memo is not None else None
    if stats is None:
        stats = replay([(layer, k) for layer, k in routes if layer in inside], entries)
        if memo is not None:
            memo[key] = stats
    out = list(moved)
    for layer, (sought, found) in stats.items():
        if sought:
            out[layer] = moved[layer] - round(found / sought * max(0, moved[layer] - dense[layer]))
    sought = sum(s for s, _ in stats.values())
    return entries, out, sum(f for _, f in stats.values()) / sought if sought else None
