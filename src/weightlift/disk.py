"""The disk tier: offloaded layers live in a layer-contiguous cache file and are read straight into slots.

One cache file per model and dtype: it holds every layer of the model's stack that can be offloaded
(not only the ones a plan offloads), and its name is a fingerprint of the stack and of all those
layers' layouts (which encode their dtypes), so every plan of one model reads the same file.

The cache is a valid safetensors file: one ``uint8`` tensor ``layer.<i>`` per layer holding
that layer's bytes in exactly the slot layout (`storage.Layout`), each starting on a 4 KiB boundary
(``pad.<k>`` tensors fill the gaps, since safetensors allows no holes), and in ``__metadata__`` a
manifest of every tensor's leaves (dtype, shape, strides, offset), a digest of each layer's bytes, the
model's class name and the dtypes of its layers' bytes (for ``weightlift cache list``).
Reading a layer is one ``pread`` of its bytes into the slot: no staging copy on a CPU target, no
per-step allocation. The file is written once (to a temporary name, fsynced, then renamed, so a
failed write never leaves a cache a later run would trust) and checked for size and mtime before
every read. Each use touches a sidecar ``<file>.used`` (never the cache file: its mtime is part of
the check) so ``weightlift cache list`` can say when it was last used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import locks
from .config import format_size
from .errors import OffloadError
from .files import MappedFile, Stamped, fresh_leaf, host_bytes, pread_into, read_header, round_up
from .storage import Entry, Layout
from .tensors import typed_view

log = logging.getLogger(__name__)

FORMAT = "weightlift-layer-cache"
VERSION = "2"  # 2: every layer of the model in one file; model and dtypes in the metadata
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _leaf_spec(spec: torch.Tensor, offset: int) -> list:
    return [str(spec.dtype).removeprefix("torch."), list(spec.shape), list(spec.stride()), offset]


def manifest_of(layouts: dict[int, Layout]) -> dict[str, list]:
    """Per layer: ``[nbytes, [[qualname, [leaf specs]], ...]]``; what a cache must match."""
    return {
        str(i): [layout.nbytes, [[e.qualname, [_leaf_spec(s, o) for s, o in zip(e.specs, e.offsets)]]
                                 for e in layout.entries]]
        for i, layout in layouts.items()
    }  # fmt: skip


def fingerprint(stack: str, manifest: dict) -> str:
    return hashlib.blake2b(json.dumps([stack, manifest]).encode(), digest_size=10).hexdigest()


def _layer_chunks(layout: Layout) -> Iterator[tuple[int, memoryview]]:
    """(offset in the layer, bytes) of each piece, read from the layer's current (in-memory) storages one
    at a time: a piece in device memory is copied to the host when its turn comes, so a consumer that drops
    each chunk before asking for the next holds one piece in RAM, never a second copy of the model."""
    for offset, source in zip(layout.offsets, layout.sources):
        yield offset, host_bytes(source)


def layer_digest(layout: Layout) -> str:
    h = hashlib.blake2b(digest_size=16)
    for _, chunk in _layer_chunks(layout):
        h.update(chunk)
        del chunk  # this piece's host copy goes before the next one is made
    return h.hexdigest()


@dataclass
class CachedLayer:
    offset: int  # absolute file offset
    nbytes: int
    digest: str


class LayerCache:
    """An open, validated cache file."""

    def __init__(self, path: Path, stack: str, manifest: dict, layers: dict[int, CachedLayer]) -> None:
        self.path, self.stack, self.manifest, self.layers = path, stack, manifest, layers
        self.file = Stamped(path)
        self.mapping: Mapping | None = None

    @classmethod
    def open(cls, path: Path) -> LayerCache:
        """Parse and check the header; `OffloadError` naming the file and what is wrong."""
        header, data_start = read_header(path)
        size = path.stat().st_size
        meta = header.get("__metadata__", {})
        if meta.get("format") == FORMAT and meta.get("version") != VERSION:
            raise OffloadError(
                f"`{path}` is a layer cache of format version {meta.get('version')}, this weightlift reads "
                f"{VERSION}: delete it to rebuild the cache"
            )
        if meta.get("format") != FORMAT:
            raise OffloadError(
                f"`{path}` is not a weightlift layer cache (format {meta.get('format')!r}): weightlift never "
                "writes over it; choose another `disk_path` or delete the file"
            )
        try:
            manifest, digests = json.loads(meta["manifest"]), json.loads(meta["digests"])
            layers = {}
            for key in manifest:
                record = header[f"layer.{key}"]
                begin, end = record["data_offsets"]
                layers[int(key)] = CachedLayer(data_start + begin, end - begin, digests[key])
        except KeyError as err:
            raise OffloadError(f"`{path}` has no tensor {err}: delete it to rebuild the cache") from None
        except (TypeError, ValueError):
            raise OffloadError(f"`{path}` has a corrupt header: delete it to rebuild the cache") from None
        need = max((c.offset + c.nbytes for c in layers.values()), default=data_start)
        if size < need:
            raise OffloadError(
                f"`{path}` is truncated: {size} bytes, its header needs {need}; delete it to rebuild the cache"
            )
        return cls(path, meta.get("stack", ""), manifest, layers)

    def check(self, manifest: dict) -> None:
        """The model's offloaded layers must be in the cache with the same tensors, dtypes and shapes."""
        for key, (_, entries) in manifest.items():
            if key not in self.manifest:
                raise OffloadError(f"`{self.path}` has no tensor `layer.{key}` for offloaded layer {key}")
            if self.manifest[key] == manifest[key]:
                continue
            cached = {name: leaves for name, leaves in self.manifest[key][1]}
            for name, leaves in entries:
                if name not in cached:
                    raise OffloadError(f"`{self.path}` has no tensor `{name}` for layer {key}")
                for mine, theirs in zip(leaves, cached[name]):
                    if mine[:3] != theirs[:3]:
                        raise OffloadError(
                            f"`{name}` of layer {key} in `{self.path}` is {theirs[0]} {tuple(theirs[1])}, the model's "
                            f"is {mine[0]} {tuple(mine[1])}: the cache belongs to another model; pass another "
                            "`disk_path` or delete the file"
                        )
                if len(leaves) != len(cached[name]):
                    raise OffloadError(
                        f"`{name}` of layer {key} in `{self.path}` has another structure than the model's"
                    )
            raise OffloadError(  # same tensors, other offsets: reading it would hand layers the wrong bytes
                f"layer {key} in `{self.path}` is laid out unlike the model's: delete the file to rebuild the cache"
            )

    def read_into(self, index: int, slot: torch.Tensor, ranges: Sequence[tuple[int, int]] | None = None,
                  drop: bool = False) -> None:  # fmt: skip
        """Read layer ``index`` into the uint8 CPU tensor ``slot`` (its first ``nbytes`` bytes, or only the
        byte ranges ``ranges`` of its layout); with ``drop``, hand the pages read back to the kernel after
        (`files.Stamped.drop`)."""
        self.file.check()
        layer = self.layers[index]
        view = memoryview(slot[: layer.nbytes].numpy()).cast("B")
        spans = ranges if ranges is not None else [(0, layer.nbytes)]
        for a, b in spans:
            pread_into(self.file.fd, view[a:b], layer.offset + a, self.path, f"layer.{index}")
        if drop:
            self.file.drop([(layer.offset + a, b - a) for a, b in spans])

    def read_leaves(self, index: int, entry: Entry) -> list[torch.Tensor]:
        """Fresh CPU tensors holding ``entry``'s true leaves, read from the file."""
        out = []
        for spec, offset in zip(entry.specs, entry.offsets):
            leaf, view = fresh_leaf(spec)
            pread_into(self.file.fd, view, self.layers[index].offset + offset, self.path, entry.qualname)
            out.append(leaf)
        return out

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        self.file.close()

    def read_exactly(self) -> None:
        """Read only as asked, mapped or not (`files.Stamped.read_exactly`, `files.MappedFile.read_exactly`)."""
        self.file.read_exactly()
        if self.mapping is not None:
            self.mapping.mapped.read_exactly()

    def map(self) -> Mapping:
        """Map the file (private, copy-on-write) so layers can be read in place, with no copy."""
        self.mapping = Mapping(self)
        return self.mapping


class Mapping:
    """The cache file mapped into memory: each offloaded layer's tensors point at its own page-aligned
    range, so a warm page cache serves them with no copy at all. ``willneed`` asks the kernel to read a
    layer ahead; ``release`` drops a layer's pages from this process once it has run (they stay in the
    page cache, reclaimable), which bounds the resident set to about one layer."""

    def __init__(self, cache: LayerCache) -> None:
        self.cache = cache
        self.mapped = MappedFile(cache.file)
        self.check = cache.file.check

    def views(self, index: int, entry: Entry) -> list[torch.Tensor]:
        layer = self.cache.layers[index]
        return entry.views(self.mapped.bytes[layer.offset : layer.offset + layer.nbytes])

    def willneed(self, index: int, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """Ask the kernel to read layer ``index`` ahead (or only the byte ranges ``ranges`` of its layout)."""
        layer = self.cache.layers[index]
        for a, b in ranges if ranges is not None else [(0, layer.nbytes)]:
            self.mapped.willneed(layer.offset + a, b - a)

    def cached(self, index: int) -> float:
        """The fraction of layer ``index``'s pages in the page cache now."""
        layer = self.cache.layers[index]
        return self.mapped.cached(layer.offset, layer.nbytes)

    def release(self, index: int) -> None:
        layer = self.cache.layers[index]
        self.mapped.advise(mmap.MADV_DONTNEED, layer.offset, layer.nbytes)

    def close(self) -> None:
        self.mapped.close()


def used_marker(path: Path) -> Path:
    """The sidecar whose mtime says when ``path`` (a cache file, or a folder) was last used."""
    return path / ".used" if path.is_dir() else path.with_name(f"{path.name}.used")


def mark_used(path: Path) -> None:
    """Record that ``path`` was used now, in its sidecar (the file itself is left alone: its size and
    mtime are what an open cache is checked against). Best effort: a read-only folder is no error."""
    marker = used_marker(Path(path))
    try:
        marker.touch()
        os.utime(marker)
    except OSError as err:
        log.debug("weightlift: cannot record the use of %s: %s", path, err)


def dtypes_of(manifest: dict) -> list[str]:
    """The dtypes of the leaves in a manifest, the one holding the most elements first."""
    counts: dict[str, int] = {}
    for _, entries in manifest.values():
        for _, leaves in entries:
            for dtype, shape, *_ in leaves:
                n = 1
                for d in shape:
                    n *= d
                counts[dtype] = counts.get(dtype, 0) + n
    return sorted(counts, key=lambda d: (-counts[d], d))


_NO_DIGEST = "0" * 32  # a blake2b-16 hex digest's width: the header is written before the layers are hashed


def _header(stack: str, layouts: dict[int, Layout], digests: dict[int, str], model: str) -> tuple[bytes, dict]:
    """The safetensors header (padded so data starts on a page) and each layer's offset in the data."""
    manifest = manifest_of(layouts)
    meta = {"format": FORMAT, "version": VERSION, "stack": stack, "model": model,
            "dtypes": ",".join(dtypes_of(manifest)), "manifest": json.dumps(manifest),
            "digests": json.dumps({str(i): digests.get(i, _NO_DIGEST) for i in sorted(layouts)})}  # fmt: skip
    entries: dict = {"__metadata__": meta}
    placed, position = {}, 0
    for i in sorted(layouts):
        begin = round_up(position)
        if begin > position:
            entries[f"pad.{i}"] = {"dtype": "U8", "shape": [begin - position], "data_offsets": [position, begin]}
        entries[f"layer.{i}"] = {"dtype": "U8", "shape": [layouts[i].nbytes],
                                 "data_offsets": [begin, begin + layouts[i].nbytes]}  # fmt: skip
        placed[i] = begin
        position = begin + layouts[i].nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (round_up(8 + len(body)) - 8 - len(body))
    return struct.pack("<Q", len(body)) + body, placed


def _write_layers(f, layouts: dict[int, Layout], placed: dict[int, int], bar) -> dict[int, str]:
    """Write each layer's bytes at its place (after the header) and return their digests, hashed on the
    way: each piece comes to the host once, for both."""
    written, digests = 0, {}
    for i in sorted(layouts):
        f.write(b"\0" * (placed[i] - written))
        h = hashlib.blake2b(digest_size=16)
        end = 0
        for offset, chunk in _layer_chunks(layouts[i]):
            f.write(b"\0" * (offset - end))
            f.write(chunk)
            h.update(chunk)
            end = offset + len(chunk)
            del chunk  # this piece's host copy goes before the next one is made
        f.write(b"\0" * (layouts[i].nbytes - end))
        written = placed[i] + layouts[i].nbytes
        digests[i] = h.hexdigest()
        bar.update(layouts[i].nbytes)
    return digests


class _Bar(tqdm):
    """tqdm's progress bar without its monitor thread: tqdm starts one the first time a bar of a class is made
    (shown or disabled) and never stops it (tqdm 4.70), so writing a layer cache left a thread behind after
    ``remove()``. The monitor only unsticks bars that update rarely; this one updates after every layer."""

    monitor_interval = 0


def write_cache(path: Path, stack: str, layouts: dict[int, Layout], model: str = "") -> dict[int, str]:
    """Write the layers' current bytes to ``path`` atomically (nothing is left behind on failure) and
    return each layer's digest. The header goes first with placeholder digests, then the layers (hashed
    as they are written), then the header again with the digests: same length, one pass over the bytes."""
    header, placed = _header(stack, layouts, {}, model)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    total = sum(layout.nbytes for layout in layouts.values())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f, _Bar(total=total, unit="B", unit_scale=True, desc="weightlift: writing cache",
                                        disable=None, leave=False) as bar:  # fmt: skip
            f.write(header)
            digests = _write_layers(f, layouts, placed, bar)
            final, _ = _header(stack, layouts, digests, model)
            assert len(final) == len(header), "a digest changed the header's length"
            f.seek(0)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OffloadError(
            f"cannot write the layer cache `{path}`: {err.strerror or err}; free space or pass another `disk_path`"
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return digests


@dataclass
class DiskMaster:
    """The true bytes of one offloaded layer, in a file (the layer cache or a checkpoint): no host RAM."""

    layout: Layout
    cache: LayerCache | Any  # anything with read_into(index, slot, ranges, drop) and read_leaves(index, entry)
    index: int
    drop: bool = False  # the page cache does not keep this layer's pages once read (`apply._kept_in_page_cache`)

    def release_originals(self) -> None:
        for e in self.layout.entries:
            e.parts.leaves = []
        self.layout.sources = []

    def leaves(self, entry: Entry) -> list[torch.Tensor]:
        return self.cache.read_leaves(self.index, entry)

    def restored(self) -> dict[int, list[torch.Tensor]]:
        """New leaves of every entry, by ``id`` (see `Layout.restored`: views of one storage stay views), from
        each entry's leaves as read from the file, laid out like a slot."""

        def fill(buffer: torch.Tensor) -> None:
            for e in self.layout.entries:
                if e.device.type != "meta":
                    for leaf, offset, spec in zip(self.cache.read_leaves(self.index, e), e.offsets, e.specs):
                        typed_view(buffer, offset, spec).copy_(leaf)

        return self.layout.restored(fill)

    def read(self, buffer: torch.Tensor, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        """Read this layer (or the byte ranges ``ranges`` of it), in the slot layout, into a CPU ``buffer``."""
        self.cache.read_into(self.index, buffer, ranges, self.drop)


def cache_path(folder: Path, stack: str, every: dict[int, Layout], suffix: str = "") -> Path:
    """The model's one cache file in ``folder``, named after its stack and the layouts of ``every`` layer that
    can be offloaded, whichever a plan offloads (``suffix``: a tensor-parallel rank's, `distributed`)."""
    return folder / f"weightlift-{fingerprint(stack, manifest_of(every))}{suffix}.safetensors"


def _other_version(path: Path) -> str | None:
    """The version of a weightlift layer cache of another format version at ``path``, else None."""
    meta = read_header(path)[0].get("__metadata__", {})
    version = meta.get("version")
    return str(version) if meta.get("format") == FORMAT and version != VERSION else None


def _reusable(path: Path, layouts: dict[int, Layout], materialized: bool) -> tuple[LayerCache | None, str]:
    """The cache at ``path`` opened when it serves ``layouts``, else None and why not ("" when absent)."""
    if not path.exists():
        return None, ""
    old = _other_version(path)
    if old is not None:
        log.info("weightlift: layer cache %s has format version %s, this weightlift writes %s: rewriting it",
                 path, old, VERSION)  # fmt: skip
        return None, f"format version {old}"
    cache = LayerCache.open(path)
    try:
        cache.check(manifest_of(layouts))
        # hashed up to the first that differs: the whole file is rewritten then anyway
        stale = next((i for i in sorted(layouts) if cache.layers[i].digest != layer_digest(layouts[i])),
                     None) if materialized else None  # fmt: skip
    except BaseException:
        cache.close()
        raise
    if stale is None:
        return cache, ""
    cache.close()
    log.info("weightlift: layer cache %s holds other weights (layer %d first): rewriting it", path, stale)
    return None, "other weights"


def temporaries(path: Path) -> list[Path]:
    """The temporary files of writes of ``path`` (``.<name>.tmp-<pid>``): one in progress, or one that died."""
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def open_cache(
    folder: Path, stack: str, layouts: dict[int, Layout], materialized: bool,
    every: dict[int, Layout] | None = None, model: str = "", suffix: str = "",
) -> LayerCache:  # fmt: skip
    """The model's cache in ``folder``, holding ``every`` layer that can be offloaded (default: just
    ``layouts``, the offloaded ones). Reused when its offloaded layers hold the same bytes (only those are
    hashed), written from ``every`` layer when absent or stale (only for a model whose weights are in
    memory), refused when damaged or foreign. Written under the cache's lock (`locks`): a second process
    waits, then reuses what the first wrote; the temporaries of writes that died are removed."""
    every = layouts if every is None else every
    path = cache_path(folder, stack, every, suffix)
    cache, _ = _reusable(path, layouts, materialized)
    if cache is None:
        with locks.writing(path) as alone:
            cache, why = _reusable(path, layouts, materialized)  # the writer waited for may have written it
            if cache is None:
                _refuse_unwritable(folder, every, why)
                for dead in temporaries(path) if alone else ():  # locked: no other write of it is in progress
                    log.info("weightlift: removing %s, left by a write that died", dead)
                    dead.unlink(missing_ok=True)
                write_cache(path, stack, every, model)
                log.warning(
                    "weightlift: wrote the layer cache of %s (%s) to %s; `weightlift cache list` lists caches, "
                    "`weightlift cache clear` removes them", model or stack, format_size(path.stat().st_size), path,
                )  # fmt: skip
                cache = LayerCache.open(path)  # under the lock: the file just written, not a later one
    else:
        log.info("weightlift: reusing layer cache %s", path)
    mark_used(path)
    return cache


def _refuse_unwritable(folder: Path, every: dict[int, Layout], why: str) -> None:
    """A cache that must be written from weights that are not in memory (on the meta device) is refused."""
    if not any(s.is_meta for layout in every.values() for s in layout.sources):
        return
    if why:
        raise OffloadError(
            f"`disk_path`={str(folder)!r} holds a layer cache of this model that cannot serve it ({why}) and its "
            "offloaded weights are on the meta device: run offload once with the weights loaded to rewrite the cache"
        )
    raise OffloadError(
        f"`disk_path`={str(folder)!r} has no layer cache for this model and its offloaded weights are on the "
        "meta device: run offload once with the weights loaded to write the cache"
    )
