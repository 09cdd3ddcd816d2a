"""Reading offloaded layers in place from a safetensors checkpoint folder (single file or sharded).

``OffloadConfig(source="checkpoint", disk_path=folder)``: each offloaded tensor is found by its name
in the folder's ``model.safetensors.index.json`` (or in its ``*.safetensors`` files) and read at its
byte offset straight into the slot, so nothing is written and the model never has to fit in RAM.
Plain tensors of any dtype are supported (float weights, GPTQ/AWQ integer buffers, fp8); quantized
tensor subclasses and state on attributes are saved under other names by their libraries: use the
layer cache (``source="disk"``) for them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import conversion
from .distributed import is_dtensor, shard_pieces
from .errors import OffloadError
from .files import IN_FILE, MappedFile, Stamped, fresh_leaf, host_bytes, map_range, pread_into, read_header
from .storage import Entry, Layout
from .tensors import typed_view

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
_FIX = "the checkpoint is damaged: restore it, or offload from a layer cache with source='disk'"


def _weight_map(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> file, from the folder's ``model.safetensors.index.json``; None without one."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise OffloadError(f"`{index}` is not a safetensors index (no weight_map): {_FIX}") from None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names, else its ``*.safetensors``
    (never a weightlift layer cache kept beside them)."""
    weight_map = _weight_map(folder)
    if weight_map is not None:
        return sorted(set(weight_map.values()))
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("weightlift-"))


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it."""
    weight_map = _weight_map(folder)
    if weight_map is not None:
        return weight_map
    files = checkpoint_files(folder)
    if not files:
        raise OffloadError(
            f"`disk_path`={str(folder)!r} holds no safetensors checkpoint (no model.safetensors.index.json, no "
            "*.safetensors): point it at the model's folder, or use source='disk' to write a layer cache"
        )
    out: dict[str, Path] = {}
    for path in files:
        header, _ = read_header(path, _FIX)
        out.update({name: path for name in header if name != "__metadata__"})
    return out


@dataclass(frozen=True)
class Piece:
    """A contiguous run of a model tensor's bytes in one checkpoint file."""

    file: Path
    offset: int  # absolute offset of the bytes in the file
    nbytes: int
    at: int  # where they go in the model tensor's bytes (row-major, contiguous)


@dataclass(frozen=True)
class Located:
    """Where a model tensor's bytes are in a checkpoint: its dtype and shape there, and pieces that cover
    its bytes exactly once (one piece when the checkpoint stores it under its own name)."""

    key: str  # the checkpoint's name for it (the first piece's, for a tensor built of several)
    dtype: torch.dtype | None  # None: a dtype torch has no name for
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    stored: str = ""  # the checkpoint's dtype label (``F32``, ``BF16``, ...)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class CheckpointIndex:
    """A safetensors checkpoint folder (single file or sharded), indexed by model tensor name.

    ``locate(name)`` says where the bytes of the model tensor ``name`` are; ``read(located)`` reads them
    into a fresh CPU tensor. Every header is read once, when the index is built.
    """

    def __init__(self, folder: str | Path, model: object = None) -> None:
        self.folder = Path(folder).expanduser()
        self.model = model
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._where = _tensor_files(self.folder)
        self._recipes: dict[str, conversion.Recipe] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def header(self, path: Path) -> tuple[dict, int]:
        if path not in self._headers:
            self._headers[path] = read_header(path, _FIX)
        return self._headers[path]

    def _stored(self, key: str) -> Located | None:
        """The checkpoint tensor ``key`` as stored: one piece."""
        path = self._where.get(key)
        if path is None:
            return None
        header, data_start = self.header(path)
        record = header.get(key)
        if record is None:
            raise OffloadError(f"`{key}` is missing from `{path}` (the index names it): {_FIX}")
        try:
            begin, end = record["data_offsets"]
            shape = tuple(int(n) for n in record.get("shape", []))
        except (KeyError, TypeError, ValueError):
            raise OffloadError(f"`{path}` has a corrupt header entry for `{key}`: {_FIX}") from None
        if data_start + end > path.stat().st_size:
            raise OffloadError(f"`{path}` is truncated: `{key}` ends past the end of the file; {_FIX}")
        dtype = SAFETENSORS_DTYPES.get(record.get("dtype"))
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise OffloadError(f"`{key}` in `{path}` has {end - begin} bytes for its shape {shape}: {_FIX}")
        return Located(key, dtype, shape, (Piece(path, data_start + begin, end - begin, 0),), str(record.get("dtype")))

    def locate(self, name: str) -> Located | None:
        """Where model tensor ``name`` is, or None when the checkpoint does not hold it.

        For a transformers model the checkpoint's keys are mapped to the model's tensors by transformers'
        own load-time rules (renamed keys, per-expert tensors stacked into fused ones: `conversion`);
        a tensor that no rule builds is looked up under its own name.
        """
        if self._recipes is None:
            self._recipes = conversion.recipes(self.model, self._where)
        recipe = self._recipes.get(name)
        if recipe is None:
            return self._stored(name)
        if recipe.converter is None:
            return self._stored(recipe.keys[0])
        stored = {k: self._stored(k) for k in recipe.keys}
        built = conversion.build(
            recipe, lambda k: (stored[k].dtype, stored[k].shape, stored[k].pieces[0].file), self._shape(name),
            getattr(self.model, "config", None),
        )  # fmt: skip
        pieces = []
        for key, offset, nbytes, at in built.runs:
            (whole,) = stored[key].pieces
            pieces.append(Piece(whole.file, whole.offset + offset, nbytes, at))
        return Located(built.runs[0][0], built.dtype, built.shape, tuple(pieces), stored[built.runs[0][0]].stored)

    def _shape(self, name: str) -> tuple[int, ...] | None:
        if self._shapes is None:
            model = self.model
            tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            self._shapes = {n: tuple(t.shape) for n, t in tensors}
        return self._shapes.get(name)

    def read(self, located: Located) -> torch.Tensor:
        """A fresh contiguous CPU tensor holding ``located``'s bytes."""
        if located.dtype is None:
            raise OffloadError(f"`{located.key}` has a dtype torch cannot hold: {_FIX}")
        out = torch.empty(located.shape, dtype=located.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        for piece in located.pieces:
            fd = os.open(piece.file, os.O_RDONLY)
            try:
                pread_into(fd, view[piece.at : piece.at + piece.nbytes], piece.offset, piece.file, located.key)
            finally:
                os.close(fd)
        return out


@dataclass
class _Read:
    file: int  # index into CheckpointFiles.files
    offset: int  # absolute file offset
    nbytes: int
    slot_offset: int
    align: int  # the file offset it must sit at a multiple of to be computed on in place (see `alignment`)


def _within(reads: list[_Read], ranges: Sequence[tuple[int, int]] | None) -> list[tuple[_Read, int, int]]:
    """Each read with the part of its slot range ``[lo, hi)`` inside ``ranges`` (all of it for None)."""
    if ranges is None:
        return [(r, r.slot_offset, r.slot_offset + r.nbytes) for r in reads]
    out = []
    for a, b in ranges:
        for r in reads:
            lo, hi = max(a, r.slot_offset), min(b, r.slot_offset + r.nbytes)
            if lo < hi:
                out.append((r, lo, hi))
    return out


class CheckpointFiles:
    """The checkpoint's files, open, and for each offloaded layer the reads that fill its slot."""

    def __init__(self, folder: Path, files: list[Path], reads: dict[int, list[_Read]],
                 by_leaf: dict[tuple[int, int], list[_Read]]) -> None:  # fmt: skip
        self.path, self.reads = folder, reads
        self.files = [Stamped(p) for p in files]
        self.mapping: CheckpointMapping | None = None
        self._by_leaf = by_leaf

    @classmethod
    def open(cls, index: CheckpointIndex, names: list[str], layouts: dict[int, Layout]) -> CheckpointFiles:
        """Locate every offloaded tensor in the checkpoint and check its dtype and shape against the model."""
        folder = index.folder
        files: list[Path] = []
        reads: dict[int, list[_Read]] = {}
        by_leaf: dict[tuple[int, int], list[_Read]] = {}
        for position, layout in layouts.items():
            for entry in layout.entries:
                name = f"{names[position]}.{entry.qualname}"
                sharded = is_dtensor(entry.tensor)  # a tensor-parallel rank's shard: its slice of the stored tensor
                if entry.parts.kind != "plain" and not sharded:
                    raise OffloadError(
                        f"`{name}` is a {entry.parts.kind}, which checkpoints store under other names: offload it "
                        "from a layer cache with source='disk'"
                    )
                found = index.locate(name)
                if found is None:
                    raise OffloadError(
                        f"`{name}` is not in the checkpoint in `{folder}` (it is incomplete, or names its tensors "
                        "otherwise, as after a format conversion): offload from a layer cache with source='disk'"
                    )
                (spec,), (slot_offset,) = entry.specs, entry.offsets
                where = found.pieces[0].file
                whole = entry.tensor.shape if sharded else spec.shape
                if sharded:  # only this rank's block of the tensor, however many stored tensors hold it
                    found = dataclasses.replace(found, pieces=shard_pieces(entry.tensor, found.pieces))
                if found.dtype != spec.dtype or list(found.shape) != list(whole):
                    raise OffloadError(
                        f"`{name}` in `{where}` is {found.stored} {tuple(found.shape)}, the model's is "
                        f"{spec.dtype} {tuple(whole)}: load the model in the checkpoint's dtype, or use "
                        "source='disk' to write a layer cache of the weights in memory"
                    )
                if not spec.is_contiguous():
                    raise OffloadError(f"`{name}` is not contiguous in the model: use source='disk' for it")
                leaf_reads = []
                for piece in found.pieces:
                    if piece.file not in files:
                        files.append(piece.file)
                    leaf_reads.append(_Read(files.index(piece.file), piece.offset, piece.nbytes,
                                            slot_offset + piece.at, alignment(spec.dtype, spec.dim())))  # fmt: skip
                reads.setdefault(position, []).extend(leaf_reads)
                by_leaf[(position, slot_offset)] = leaf_reads
        return cls(folder, files, reads, by_leaf)

    def read_into(self, index: int, slot: torch.Tensor, ranges: Sequence[tuple[int, int]] | None = None,
                  drop: bool = False) -> None:  # fmt: skip
        """Read layer ``index`` into ``slot`` in the slot layout (only the byte ranges ``ranges`` of it, if given);
        with ``drop``, hand the pages read back to the kernel after (`files.Stamped.drop`)."""
        view = memoryview(slot.numpy()).cast("B")
        read: dict[int, list[tuple[int, int]]] = {}
        for r, lo, hi in _within(self.reads[index], ranges):
            file = self.files[r.file]
            file.check()
            pread_into(file.fd, view[lo:hi], r.offset + lo - r.slot_offset, file.path, f"layer {index}")
            read.setdefault(r.file, []).append((r.offset + lo - r.slot_offset, hi - lo))
        for file_index, spans in read.items() if drop else ():
            self.files[file_index].drop(spans)

    def read_leaves(self, index: int, entry: Entry) -> list[torch.Tensor]:
        (spec,), (slot_offset,) = entry.specs, entry.offsets
        leaf, view = fresh_leaf(spec)
        for r in self._by_leaf[(index, slot_offset)]:
            at = r.slot_offset - slot_offset
            pread_into(self.files[r.file].fd, view[at : at + r.nbytes], r.offset, self.files[r.file].path,
                       entry.qualname)  # fmt: skip
        return [leaf]

    def check_equal(self, layouts: dict[int, Layout]) -> None:
        """For a model in memory: its offloaded weights must be the checkpoint's, byte for byte."""
        for index, layout in layouts.items():
            for entry in layout.entries:
                (true,) = self.read_leaves(index, entry)
                (mine,) = entry.parts.leaves  # maybe in device memory: compared on the host, one tensor at a time
                if not torch.equal(
                    true.reshape(-1).view(torch.uint8), torch.frombuffer(host_bytes(mine), dtype=torch.uint8)
                ):
                    if is_dtensor(entry.tensor):
                        raise OffloadError(
                            f"`{entry.qualname}` of layer {index}: this rank's shard is not the block of the "
                            f"checkpoint's tensor in `{self.path}` that its DTensor placement names (transformers "
                            "packs some fused tensors per rank, as gate_up_proj): use source='disk' (a layer cache "
                            "per rank)"
                        )
                    raise OffloadError(
                        f"`{entry.qualname}` of layer {index} differs from the checkpoint in `{self.path}`: the model "
                        "changed after loading; use source='disk' to write a layer cache of the weights in memory"
                    )

    def read_exactly(self) -> None:
        """As `disk.LayerCache.read_exactly`."""
        for f in self.files:
            f.read_exactly()
        for m in self.mapping.files if self.mapping is not None else ():
            m.read_exactly()

    def map(self) -> CheckpointMapping | None:
        """Map the checkpoint's files to compute on them in place; None when a tensor is not aligned in its file
        (`alignment`), or is built of several pieces (then layers are read into slots instead)."""
        if any(r.offset % r.align for reads in self.reads.values() for r in reads) or any(
            len(rs) > 1 for rs in self._by_leaf.values()
        ):
            return None
        self.mapping = CheckpointMapping(self)
        return self.mapping

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        for f in self.files:
            f.close()


class CheckpointMapping:
    """The checkpoint files mapped: each offloaded tensor points at its bytes in its file (no copy), with
    the same read-ahead and release per layer as the layer cache's `disk.Mapping`."""

    def __init__(self, checkpoint: CheckpointFiles) -> None:
        self.checkpoint = checkpoint
        self.files = [MappedFile(f) for f in checkpoint.files]

    def check(self) -> None:
        for f in self.checkpoint.files:
            f.check()

    def views(self, index: int, entry: Entry) -> list[torch.Tensor]:
        (spec,), (slot_offset,) = entry.specs, entry.offsets
        (r,) = self.checkpoint._by_leaf[(index, slot_offset)]
        return [typed_view(self.files[r.file].bytes, r.offset, spec)]

    def _spans(self, index: int, ranges: Sequence[tuple[int, int]] | None = None):
        """(mapped file, offset, length) of each piece of layer ``index`` (or of its ``ranges``)."""
        for r, lo, hi in _within(self.checkpoint.reads[index], ranges):
            yield self.files[r.file], r.offset + lo - r.slot_offset, hi - lo

    def willneed(self, index: int, ranges: Sequence[tuple[int, int]] | None = None) -> None:
        for f, at, n in self._spans(index, ranges):
            f.willneed(at, n)

    def cached(self, index: int) -> float:
        """The fraction of layer ``index``'s pages in the page cache now (by bytes, over its files)."""
        spans = list(self._spans(index))
        total = sum(n for _, _, n in spans)
        return sum(f.cached(at, n) * n for f, at, n in spans) / total if total else 1.0

    def release(self, index: int) -> None:
        for f, at, n in self._spans(index):
            f.advise(mmap.MADV_DONTNEED, at, n)

    def close(self) -> None:
        for f in self.files:
            f.close()


MATRIX_ALIGN = 64  # what the CPU allocator gives every tensor


def alignment(dtype: torch.dtype, dims: int) -> int:
    """The file offset a tensor must sit at a multiple of to be computed on in place and give the bits it
    gives in memory. For a matrix or a stack of them (2-D or more), 64 bytes, what the CPU allocator gives a
    resident tensor: the matrix kernels pick their vector paths by the weight's address, so a weight 4 or
    8 bytes off gives other bits. Seen with torch 2.13 on x86: a decode step (one token, a matrix-vector
    product) of a Llama mapped from a sharded checkpoint at 4-byte offsets, off by 6e-8
    (``tests/test_checkpoint.py``), and ``grouped_mm`` on fused experts 8 bytes off (``tests/test_experts.py``).
    1-D tensors (norms, biases) only meet elementwise ops: their element size."""
    return MATRIX_ALIGN if dims >= 2 else dtype.itemsize


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, laid out so that weightlift can compute on every tensor in place
    (`alignment`): the header padded so the data starts on a 64-byte boundary, and the tensors whose size is
    a multiple of 64 bytes first, so each of them starts on one too. A valid safetensors file (no holes)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (tensors[k].numel() * tensors[k].element_size()) % MATRIX_ALIGN != 0)
    header: dict = {"__metadata__": dict(metadata or {})}
    position = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [position, position + n]}
        position += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % MATRIX_ALIGN)
    with open(path, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body)
        for key in order:
            f.write(tensors[key].detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy


def mappable(located: Located) -> bool:
    """Whether a tensor can be computed on in place in its mapped file: one piece, aligned (`alignment`)."""
    first = located.pieces[0] if len(located.pieces) == 1 else None
    return (first is not None and located.dtype is not None
            and first.offset % alignment(located.dtype, len(located.shape)) == 0)  # fmt: skip


def load_meta(model: nn.Module, index: CheckpointIndex, keep: Callable[[str], bool],
              in_file: Callable[[str], bool] | None = None) -> Callable[[], None]:  # fmt: skip
    """Read from the checkpoint every meta parameter and persistent buffer of ``model`` whose dotted name
    passes ``keep``, in place of the meta tensor (a tensor shared by several modules comes once and stays
    shared); one whose names all pass ``in_file`` is mapped from its file instead (`files.map_range`) when
    it is stored whole at an offset its element size divides. Returns an ``undo`` that puts the meta tensors
    back. Raises `OffloadError` naming a tensor the checkpoint lacks or stores with another dtype or shape;
    nothing is changed then."""
    found: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str, bool]]]] = {}
    names: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        dot = f"{mname}." if mname else ""
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, t in store.items():
                if t is None or not t.is_meta or not keep(dot + attr):
                    continue
                if not is_param and attr in module._non_persistent_buffers_set:
                    continue
                found.setdefault(id(t), (t, []))[1].append((module, attr, is_param))
                names.setdefault(id(t), []).append(dot + attr)
    loaded: dict[int, torch.Tensor] = {}
    mapped_keys: set[int] = set()
    for key, (t, _) in found.items():
        located = next((loc for n in names[key] if (loc := index.locate(n)) is not None), None)
        if located is None:
            raise OffloadError(
                f"`{names[key][0]}` is not in the checkpoint in `{index.folder}`: the folder is incomplete or holds "
                "another model; point to the model's own folder"
            )
        if located.dtype != t.dtype or tuple(located.shape) != tuple(t.shape):
            raise OffloadError(
                f"`{names[key][0]}` in `{index.folder}` is {located.stored} {tuple(located.shape)}, the model's is "
                f"{t.dtype} {tuple(t.shape)}: load the model in the checkpoint's dtype"
            )
        (first, *more) = located.pieces
        mapped = in_file is not None and all(in_file(n) for n in names[key]) and not more
        if mapped and located.dtype is not None and first.offset % located.dtype.itemsize == 0:
            loaded[key] = map_range(first.file, first.offset, located.dtype, located.shape)
            mapped_keys.add(key)
        else:
            loaded[key] = index.read(located)
    for key, (t, places) in found.items():
        new = nn.Parameter(loaded[key], requires_grad=False) if isinstance(t, nn.Parameter) else loaded[key]
        if key in mapped_keys:
            setattr(new, IN_FILE, True)
        for module, attr, is_param in places:
            (module._parameters if is_param else module._buffers)[attr] = new

    def undo() -> None:
        for t, places in found.values():
            for module, attr, is_param in places:
                (module._parameters if is_param else module._buffers)[attr] = t

    return undo
