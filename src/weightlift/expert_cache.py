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

    def held(self) -> list[Hashable]:
        """The keys cached, least recently used first."""
        return list(self._where)


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
