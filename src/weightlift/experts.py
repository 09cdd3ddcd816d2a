"""Mixture-of-experts layers at expert granularity: what the experts of a layer are, and their bytes.

A decode token of a mixture of experts needs a layer's dense part (attention, norms, the router, shared
experts) and the few experts its router picks, yet a whole layer is mostly experts. Here:

- `find_experts` finds a layer's expert stacks by structure, never by class name: a module whose direct
  parameters all lead with the same dimension E (transformers 5's fused ``experts.gate_up_proj``
  ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, biases and MXFP4 blocks alike), or a ``ModuleList`` of E
  modules of one shape; beside it, a router whose weight is ``[E, H]``. Shared experts and routers are
  ordinary modules and stay in the dense part. The user can name the stacks instead (``experts=``).
  Fused experts compute only on the experts they are given tokens for in transformers' eager,
  ``batched_mm`` and ``grouped_mm`` implementations (`KNOWN`), and each expert of a ``ModuleList`` runs
  only when called: so the bytes of experts not moved are never read.
- `LayerExperts` turns a layer's `storage.Layout` into byte ranges: the dense ranges, and per expert the
  ranges of its slice of every expert tensor.
- `routed_bytes` counts, for the planner, what each layer moves in one forward.

`weightlift.expert_streams` runs it at offload time.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .dtypes import leaf_span
from .errors import OffloadError
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


def reads_only_chosen(module: nn.Module) -> bool:
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
            if stack.fused and not reads_only_chosen(module):
                log.info("`%s.%s` looks like fused experts, but its forward is not one weightlift knows to read only "
                         "the experts it is given tokens for: it moves whole; name it with `experts=` to stream it "
                         "expert by expert", where, path)  # fmt: skip
                continue
            found.append(stack)
        return found
    patterns = (names,) if isinstance(names, str) else tuple(names)
    found: list[ExpertStack] = []
    seen: set[str] = set()  # a module two patterns name is one stack
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
            if path not in seen:
                seen.add(path)
                found.append(stack)
    return found


def top_k_of(layer: nn.Module, stack: ExpertStack, config: object = None) -> int | None:
    """How many experts of ``stack`` one token uses, where the model says: its router's or its MoE block's
    ``top_k`` / ``num_experts_per_tok``, else the experts' or the model's config (``config``). None: unknown."""
    parent_path = stack.path.rpartition(".")[0]
    holders = [layer.get_submodule(stack.router) if stack.router else None,
               layer.get_submodule(parent_path) if parent_path else layer,
               getattr(layer.get_submodule(stack.path), "config", None), config]  # fmt: skip
    for holder in holders:
        for name in ("top_k", "num_experts_per_tok"):
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= stack.count:
                return value
    return None


def expert_bytes(layer: nn.Module, stack: ExpertStack) -> int:
    """Bytes of one expert of ``stack`` as stored (from shapes: works on meta skeletons too)."""
    module = layer.get_submodule(stack.path)
    if stack.fused:
        return sum(t.numel() // stack.count * t.element_size() for _, t in _direct(module))
    return sum(t.numel() * t.element_size() for t in module[0].parameters())


def _routing(layers: Sequence[nn.Module], run: Callable[[], object]) -> tuple[list[list[ExpertStack]], dict]:
    """Each layer's expert stacks, and what one run of ``run`` chose per ``(layer, stack)``: the rows of
    expert indices of each call (fused), or the set of experts called (a ModuleList: no rows, ``None``)."""
    stacks = [find_experts(layer) for layer in layers]
    chosen: dict[tuple[int, int], list] = {}
    handles = []
    for i, (layer, found) in enumerate(zip(layers, stacks)):
        for s, stack in enumerate(found):
            module = layer.get_submodule(stack.path)

            def seen(module, args, kwargs, key=(i, s)):
                index = routing_of(args, kwargs)
                chosen.setdefault(key, []).append(None if index is None else index.reshape(-1, index.shape[-1])
                                                  .tolist())  # fmt: skip

            if stack.fused:
                handles.append(module.register_forward_pre_hook(seen, with_kwargs=True))
            else:
                for e, expert in enumerate(module):
                    handles.append(expert.register_forward_pre_hook(
                        lambda m, a, k, key=(i, s), e=e: chosen.setdefault(key, []).append([[e]]), with_kwargs=True))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return stacks, chosen


def routed_bytes(layers: Sequence[nn.Module], nbytes: Sequence[int], run: Callable[[], object]) -> list[int] | None:
    """Bytes each layer moves per forward of ``run`` at expert granularity (for the planner): its dense
    part plus the experts that forward's tokens choose (every expert where more than half are chosen).
    ``nbytes``: each layer's whole size. None when no layer has experts. Runs ``run`` once."""
    stacks, chosen = _routing(layers, run)
    if not any(stacks):
        return None
    out = []
    for i, (layer, found) in enumerate(zip(layers, stacks)):
        moved = nbytes[i]
        for s, stack in enumerate(found):
            calls = chosen.get((i, s), [])
            picked = set(range(stack.count)) if any(c is None for c in calls) else \
                {e for rows in calls for row in rows for e in row if 0 <= e < stack.count}  # fmt: skip
            n = len(picked)
            moved -= expert_bytes(layer, stack) * (stack.count - (stack.count if n > WHOLE_AT * stack.count else n))
        out.append(max(moved, 0))
    return out


def token_routes(layers: Sequence[nn.Module], run: Callable[[], object]) -> list[tuple[int, list[tuple]]]:
    """The expert stack forwards decoding ``run``'s tokens one at a time would make, read from one run: for
    each token, for each layer in order, ``(layer, [(layer, stack, expert) ...])`` of the experts its row
    chose (the device expert cache's keys, for `expert_cache.replay`). Fused stacks only: a ModuleList's
    calls do not say which token chose what."""
    stacks, chosen = _routing(layers, run)
    rows = {key: [row for rows in calls if rows is not None for row in rows] for key, calls in chosen.items()
            if stacks[key[0]][key[1]].fused}  # fmt: skip
    tokens = max((len(r) for r in rows.values()), default=0)
    out = []
    for t in range(tokens):
        for (i, s), r in sorted(rows.items()):
            if t < len(r):
                out.append((i, [(i, s, e) for e in sorted(set(r[t])) if 0 <= e < stacks[i][s].count]))
    return out


def merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(whole: tuple[int, int], taken: Ranges) -> Ranges:
    out, at = [], whole[0]
    for a, b in merge(taken):
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
        return merge([r for e in chosen for r in self.experts[e]])


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
                merged = [merge(r) for r in experts]
                units.append(StackUnits(stack, merged, merge([r for rs in merged for r in rs])))
        if not units:
            return None
        taken = [r for u in units for r in u.whole]
        return cls(_minus((0, layout.nbytes), taken), units)


def routing_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The integer tensor of expert indices the experts module is called with, if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool and value.numel():  # fmt: skip
            return value
    return None


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None
