"""Tensor-parallel models: each rank offloads its own shard (torch.distributed ``DTensor`` parameters).

A ``DTensor`` parameter is taken apart like any tensor subclass (`weightlift.tensors`): its local shard is
the leaf that streams through this rank's slots, while its DeviceMesh and placements stay as they were, so
it is still a ``DTensor`` whose local tensor points into the slot. Budgets, reports and layer caches are per
rank. What only the process group can say lives here:

- `group_of`: ``(rank, world size)`` for a model holding ``DTensor`` shards (refused when no process group is
  initialised), None for a model on one device;
- `agree`: every rank passed the same setting (a config, a budget, a plan), checked by an all-gather;
- `slowest`: the plans every rank made, gathered; all ranks use the one predicting the slowest forward, so
  no rank runs a schedule its own measurements did not choose for the slowest rank.

Every function here is a collective where the model is sharded: all ranks call it, in the same order.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import OffloadError


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def group_of(model: nn.Module) -> tuple[int, int] | None:
    """``(rank, world size)`` when ``model`` holds ``DTensor`` parameters or buffers, else None."""
    if not any(is_dtensor(t) for t in (*model.parameters(), *model.buffers())):
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        raise OffloadError(
            f"`model` ({type(model).__name__}) holds DTensor shards but no torch.distributed process group is "
            "initialised: offload it on each rank while the group that sharded it is up (under torchrun, before "
            "torch.distributed.destroy_process_group())"
        )
    return dist.get_rank(), dist.get_world_size()


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def agree(what: str, value: Any, group: tuple[int, int] | None) -> None:
    """Every rank passed the same ``value`` for ``what`` (a dataclass is compared field by field, anything
    else as its repr): else `OffloadError` on every rank, naming what differs and each rank's value. Nothing
    to check for a model on one device (``group`` None)."""
    if group is None:
        return
    if dataclasses.is_dataclass(value):
        mine = {f.name: repr(getattr(value, f.name)) for f in dataclasses.fields(value)}
    else:
        mine = {"": value if isinstance(value, str) else repr(value)}
    seen = _gather(mine)
    differ = [k for k in mine if len({s.get(k) for s in seen}) > 1]
    if differ:
        field = differ[0]
        name = f"{what}.{field}" if field else what
        values = "; ".join(f"rank {r}: {s.get(field)}" for r, s in enumerate(seen))
        raise OffloadError(
            f"`{name}` differs between ranks ({values}; this is rank {group[0]}): every rank of a "
            f"tensor-parallel model must offload with the same {what}"
        )


def slowest(plan: Any, group: tuple[int, int] | None) -> Any:
    """The plan every rank uses: of the plans the ranks made (each from its own measurements), the one that
    predicts the slowest forward (ties: the lowest rank's). ``plan`` itself for a model on one device."""
    if group is None:
        return plan
    plans = [json.loads(p) for p in _gather(plan.to_json())]
    times = [p["workloads"][p["goal"]]["predicted_s"] for p in plans]
    chosen = max(range(len(plans)), key=lambda r: (times[r], -r))
    return type(plan).from_dict(plans[chosen])


def is_dtensor(tensor: object) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def shard_runs(tensor: Any) -> list[tuple[int, int, int]]:
    """Where a DTensor's local shard lies in the whole tensor stored row-major (as a checkpoint holds it):
    ``(byte offset in the whole tensor, nbytes, byte offset in the local shard)`` per contiguous run, so that
    a rank reads its own slice and no byte of another rank's (`runs_of`)."""
    (chunk,) = tensor.__create_chunk_list__()  # this rank's block: its offset and size in every dimension
    return runs_of(list(tensor.shape), list(chunk.offsets), list(chunk.sizes), tensor.element_size())


def shard_pieces(tensor: Any, pieces: Sequence[Any]) -> tuple[Any, ...]:
    """The pieces of a DTensor's local shard, cut out of the ``pieces`` that hold the whole tensor in a
    checkpoint (`checkpoint.Piece`), however many stored tensors they come from (`cut_pieces`)."""
    return cut_pieces(pieces, shard_runs(tensor))


def cut_pieces(pieces: Sequence[Any], runs: list[tuple[int, int, int]]) -> tuple[Any, ...]:
    """``runs`` (`runs_of`: bytes of the whole tensor -> bytes of the block) cut out of ``pieces`` (each with
    ``file``, ``offset`` in it, ``nbytes``, and ``at`` in the whole tensor's bytes); each new piece's ``at``
    is in the block's bytes."""
    ordered = sorted(pieces, key=lambda p: p.at)
    starts = [p.at for p in ordered]
    out = []
    for offset, n, local in runs:
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(ordered) and ordered[i].at < offset + n:
            p = ordered[i]
            lo, hi = max(offset, p.at), min(offset + n, p.at + p.nbytes)
            if lo < hi:
                out.append(dataclasses.replace(p, offset=p.offset + lo - p.at, nbytes=hi - lo, at=local + lo - offset))
            i += 1
    return tuple(out)


def runs_of(shape: list[int], offsets: list[int], sizes: list[int], item: int) -> list[tuple[int, int, int]]:
    """The contiguous byte runs of the block ``offsets``/``sizes`` of a row-major tensor of ``shape``: one run
    for a block of whole rows (a shard of the first dimension), one per row for a shard of the last."""
    if not shape:
        return [(0, item, 0)]
    if math.prod(sizes) == 0:
        return []
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    cut = max((d for d in range(len(shape)) if sizes[d] != shape[d]), default=-1)  # the last dimension split
    if cut < 0:
        return [(0, math.prod(shape) * item, 0)]
    run = sizes[cut] * strides[cut] * item
    out, at = [], 0
    for index in itertools.product(*(range(o, o + n) for o, n in zip(offsets[:cut], sizes[:cut]))):
        start = sum(i * st for i, st in zip(index, strides)) + offsets[cut] * strides[cut]
        out.append((start * item, run, at))
        at += run
    return out


def cache_suffix(group: tuple[int, int] | None) -> str:
    """What a rank's layer cache file name carries: its rank and the world size (empty on one device)."""
    return "" if group is None else f"-rank{group[0]}-of{group[1]}"


def world_size(group: tuple[int, int] | None) -> int:
    return 1 if group is None else group[1]
