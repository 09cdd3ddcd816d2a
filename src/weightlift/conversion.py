"""Which checkpoint tensors build each model tensor, by transformers' own load-time conversion rules.

transformers 5 changes tensors as ``from_pretrained`` loads them (``transformers.conversion_mapping``):
keys are renamed (``WeightRenaming``: Mixtral's ``block_sparse_moe.`` -> ``mlp.``) and tensors are
converted (``WeightConverter``: per-expert ``experts.E.w1.weight`` / ``w3`` stacked with
``MergeModulelist(dim=0)`` and joined with ``Concatenate(dim=1)`` into one fused ``experts.gate_up_proj``).
This module runs those same rules (the model's own list, from ``get_model_conversion_mapping``, and the
key renaming of ``core_model_loading.rename_source_key``) over a checkpoint's keys, and turns each
conversion into byte ranges ("pieces") of the model tensor when it is a pure rearrangement of whole
rows: stacking, concatenation and equal chunks in which every source tensor is one contiguous run of
the target's row-major bytes. Anything else (a transpose, a permutation, a dequantization, a split or
concatenation whose parts interleave) is refused with the tensor and the operation named.

Supported operations: ``WeightRenaming`` (one piece), ``MergeModulelist``, ``Concatenate``, ``Chunk``
(each only where every source stays one contiguous run), ``Transpose(check_dims=True)`` where the stored
shape already is the model's (transformers then leaves the tensor as it is).
"""

from __future__ import annotations

import bisect
import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import OffloadError

_DISK = "offload from a layer cache with source='disk' (written from the model loaded in memory by from_pretrained)"


@dataclass
class Recipe:
    """How transformers builds model tensor ``target``: the checkpoint keys it collects, by source pattern
    (in the order it collects them), and the converter that joins them (None: a plain rename)."""

    target: str
    converter: object = None  # a transformers WeightConverter
    output: str = ""  # the converter's target pattern that names ``target`` (one-to-many converters)
    sources: dict[str, list[str]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [k for ks in self.sources.values() for k in ks]


def recipes(model: nn.Module | None, keys: Iterable[str]) -> dict[str, Recipe]:
    """Model tensor name -> its recipe, for every model tensor that transformers' conversion rules build
    from ``keys`` (the checkpoint's names). Empty for a model that is not a transformers model."""
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model, hf_quantizer=getattr(model, "hf_quantizer", None))
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = dict.fromkeys(
        [n for n, _ in model.named_parameters(remove_duplicate=False)]
        + [n for n, _ in model.named_buffers(remove_duplicate=False)],
        True,
    )
    prefix = model.base_model_prefix
    out: dict[str, Recipe] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order transformers collects them in
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if renamed not in names and key in names:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=names)
        if renamed not in names:
            continue
        if pattern is None:
            out.setdefault(renamed, Recipe(renamed, sources={key: [key]}))
            continue
        converter = by_pattern[pattern]
        first = converter.target_patterns[0]
        before, found, after = renamed.partition(first)
        targets = [renamed] if not found else [before + t + after for t in converter.target_patterns]
        for target, output in zip(targets, converter.target_patterns):
            recipe = out.setdefault(target, Recipe(target, converter, output))
            recipe.sources.setdefault(pattern, []).append(key)
    return out


@dataclass
class _Sym:
    """A tensor built from sources: its shape and its row-major elements as runs
    (source index, first element in the source, element count)."""

    shape: tuple[int, ...]
    runs: list[tuple[int, int, int]]
    starts: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.starts = [0]
        for _, _, n in self.runs:
            self.starts.append(self.starts[-1] + n)

    def take(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """The runs of elements ``start`` to ``start + count``."""
        starts = self.starts
        out, i, end = [], max(bisect.bisect_right(starts, start) - 1, 0), start + count
        while i < len(self.runs) and starts[i] < end:
            src, off, n = self.runs[i]
            lo, hi = max(start, starts[i]), min(end, starts[i] + n)
            if hi > lo:
                out.append((src, off + lo - starts[i], hi - lo))
            i += 1
        return out


def _merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for src, off, n in runs:
        if out and out[-1][0] == src and out[-1][1] + out[-1][2] == off:
            out[-1] = (src, out[-1][1], out[-1][2] + n)
        elif n:
            out.append((src, off, n))
    return out


def _stack(tensors: list[_Sym], dim: int) -> _Sym:
    shape = tensors[0].shape
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim:])
    runs = [r for o in range(outer) for t in tensors for r in t.take(o * inner, inner)]
    return _Sym((*shape[:dim], len(tensors), *shape[dim:]), _merged(runs))


def _cat(tensors: list[_Sym], dim: int) -> _Sym:
    shape = tensors[0].shape
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
    runs = [r for o in range(outer) for t in tensors for r in t.take(o * t.shape[dim] * inner, t.shape[dim] * inner)]
    return _Sym((*shape[:dim], sum(t.shape[dim] for t in tensors), *shape[dim + 1 :]), _merged(runs))


def _chunk(t: _Sym, chunks: int, dim: int) -> list[_Sym]:
    size = t.shape[dim] // chunks
    outer, inner = math.prod(t.shape[:dim]), math.prod(t.shape[dim + 1 :])
    out = []
    for i in range(chunks):
        runs = [r for o in range(outer) for r in t.take((o * t.shape[dim] + i * size) * inner, size * inner)]
        out.append(_Sym((*t.shape[:dim], size, *t.shape[dim + 1 :]), _merged(runs)))
    return out


@dataclass
class Built:
    """A model tensor as runs of its sources' bytes: (source key, byte offset in it, nbytes, at)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    runs: list[tuple[str, int, int, int]]


def build(
    recipe: Recipe,
    stored: Callable[[str], tuple[torch.dtype | None, tuple[int, ...], str]],
    model_shape: tuple[int, ...] | None,
    config: object = None,
) -> Built:
    """Run ``recipe``'s operations on the shapes of its sources (``stored(key)``: dtype, shape, the file's
    name for the error messages) and give the target's bytes as runs of the sources' bytes."""
    name, converter = recipe.target, recipe.converter
    ops = list(getattr(converter, "operations", []))
    keys = recipe.keys
    metas = {k: stored(k) for k in keys}
    _check_complete(recipe, ops, model_shape)
    dtypes = {metas[k][0] for k in keys}
    if None in dtypes:
        bad = next(k for k in keys if metas[k][0] is None)
        raise OffloadError(f"`{bad}` in `{metas[bad][2]}` has a dtype torch cannot hold: {_DISK}")
    if len(dtypes) > 1:
        first = metas[keys[0]][0]
        bad = next(k for k in keys if metas[k][0] != first)
        raise OffloadError(
            f"`{bad}` in `{metas[bad][2]}` is {metas[bad][0]}, `{keys[0]}` that transformers joins with it into "
            f"`{name}` is {first}: the checkpoint is inconsistent; {_DISK}"
        )
    (dtype,) = dtypes
    index = {k: i for i, k in enumerate(keys)}
    syms: dict[str, list[_Sym]] = {
        p: [_Sym(metas[k][1], [(index[k], 0, math.prod(metas[k][1]))]) for k in ks] for p, ks in recipe.sources.items()
    }
    result: dict[str, list[_Sym]] = dict(syms)
    for op in ops:
        result = _apply(op, result, recipe, metas, model_shape, config)
        _check_contiguous(result, op, recipe)
    if converter is None:
        (sym,) = result[keys[0]]
    else:
        out = result.get(recipe.output)
        if out is None and len(result) == 1:
            out = next(iter(result.values()))
        if out is None or len(out) != 1:
            raise OffloadError(f"`{name}`: transformers' {ops!r} do not leave one tensor for it here; {_DISK}")
        (sym,) = out
    size = dtype.itemsize
    runs, at = [], 0
    for src, off, n in sym.runs:
        runs.append((keys[src], off * size, n * size, at * size))
        at += n
    assert at == math.prod(sym.shape)  # the runs cover the target exactly once
    return Built(tuple(sym.shape), dtype, runs)


def _index_pattern(pattern: str) -> re.Pattern | None:
    if "*" not in pattern:
        return None
    return re.compile(r"(\d+)".join(re.escape(part.replace("\\.", ".")) for part in pattern.split("*")))


def _check_complete(recipe: Recipe, ops: list, model_shape: tuple[int, ...] | None) -> None:
    """Every source pattern present, and for per-expert patterns no index missing (transformers would
    stack the experts it has, shifted)."""
    converter = recipe.converter
    if converter is None:
        return
    for pattern in converter.source_patterns:
        if pattern not in recipe.sources:
            some = recipe.keys[0]
            raise OffloadError(
                f"`{recipe.target}` is joined by transformers from checkpoint tensors named like `{pattern}` "
                f"(with `{some}`), and the checkpoint has none: it is incomplete; {_DISK}"
            )
    found: dict[str, dict[int, str]] = {}
    for pattern, ks in recipe.sources.items():
        regex = _index_pattern(pattern)
        if regex is None:
            continue
        for k in ks:
            m = regex.search(k)
            if m is None:
                return  # the keys do not show their index plainly: the shape checks catch what is missing
            found.setdefault(pattern, {})[int(m.group(1))] = k
    if not found:
        return
    count = max(i for idx in found.values() for i in idx) + 1
    from transformers.core_model_loading import MergeModulelist

    merge = next((op for op in ops if isinstance(op, MergeModulelist)), None)
    if merge is not None and ops and ops[0] is merge and model_shape is not None and len(model_shape) > merge.dim:
        count = max(count, model_shape[merge.dim])
    for pattern, idx in found.items():
        for i in range(count):
            if i not in idx:
                k, regex = next(iter(idx.values())), _index_pattern(pattern)
                m = regex.search(k)
                missing = k[: m.start(1)] + str(i) + k[m.end(1) :]
                raise OffloadError(
                    f"`{missing}` is not in the checkpoint (transformers stacks {count} of them into "
                    f"`{recipe.target}`): it is incomplete; restore it, or {_DISK}"
                )


def _same_shapes(tensors: list[_Sym], labels: list[str], op, target: str, skip: int | None = None) -> None:
    """The tensors ``op`` joins have one shape (but along dim ``skip``); ``labels`` say what each is."""

    def norm(s):
        return tuple(n for d, n in enumerate(s) if d != skip)

    first = norm(tensors[0].shape)
    for label, t in zip(labels, tensors):
        if len(t.shape) != len(tensors[0].shape) or norm(t.shape) != first:
            raise OffloadError(
                f"{label} is {tuple(t.shape)}, {labels[0]} that transformers' {op!r} joins with it into `{target}` "
                f"is {tuple(tensors[0].shape)}: the checkpoint does not fit the model; restore it, or {_DISK}"
            )


def _apply(op, tensors: dict, recipe: Recipe, metas: dict, model_shape, config) -> dict:
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Transpose

    name = recipe.target
    if isinstance(op, MergeModulelist):
        out = {}
        for pattern, ts in tensors.items():
            _same_shapes(ts, _labels(pattern, ts, recipe, metas), op, name)
            out[pattern] = [_stack(ts, op.dim)]
        return out
    if isinstance(op, Concatenate):
        parts, labels = [], []
        for pattern in recipe.converter.source_patterns:
            ts = tensors.get(pattern, [])
            parts.extend(ts)
            labels.extend(_labels(pattern, ts, recipe, metas))
        _same_shapes(parts, labels, op, name, skip=op.dim)
        return {recipe.converter.target_patterns[0]: [_cat(parts, op.dim)]}
    if isinstance(op, Chunk):
        if len(tensors) != 1 or len(next(iter(tensors.values()))) != 1:
            raise OffloadError(f"`{name}`: transformers' {op!r} takes one tensor; the checkpoint has more: {_DISK}")
        (t,) = next(iter(tensors.values()))
        targets = op.get_target_patterns(recipe.converter.target_patterns, config=config)
        if t.shape[op.dim] % len(targets):
            raise OffloadError(
                f"`{name}`: `{recipe.keys[0]}` of shape {t.shape} does not split in {len(targets)} equal parts "
                f"along dim {op.dim} (transformers' {op!r}): {_DISK}"
            )
        return dict(zip(targets, ([c] for c in _chunk(t, len(targets), op.dim))))
    if isinstance(op, Transpose) and getattr(op, "check_dims", False):
        ts = [t for v in tensors.values() for t in v]
        if len(ts) == 1 and model_shape is not None and tuple(ts[0].shape) == tuple(model_shape):
            return tensors  # stored as the model holds it: transformers does not transpose
    raise OffloadError(
        f"`{name}` is made from the checkpoint's `{recipe.keys[0]}` by transformers' {op!r}, which moves its "
        f"bytes (not a contiguous copy): it cannot be read in place; {_DISK}"
    )


def _labels(pattern: str, ts: list[_Sym], recipe: Recipe, metas: dict) -> list[str]:
    """What each of ``ts`` (the tensors of ``pattern`` now) is, for messages."""
    keys = recipe.sources.get(pattern, [])
    if len(keys) == len(ts):
        return [f"`{k}` in `{metas[k][2]}`" for k in keys]
    return [f"the {len(keys)} tensors like `{keys[0]}` stacked" if keys else f"part {i}" for i in range(len(ts))]


def _check_contiguous(tensors: dict, op, recipe: Recipe) -> None:
    """Every source one contiguous run of each result (what the pieces can express)."""
    for ts in tensors.values():
        for t in ts:
            seen: set[int] = set()
            for src, _, _ in t.runs:
                if src in seen:
                    raise OffloadError(
                        f"`{recipe.target}`: transformers' {op!r} interleaves the bytes of `{recipe.keys[src]}` "
                        f"with others' (it is not one contiguous range of the result): it cannot be read in "
                        f"place; {_DISK}"
                    )
                seen.add(src)
