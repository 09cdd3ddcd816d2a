"""Reading offloaded layers in place from a safetensors checkpoint folder (single file or sharded).

``OffloadConfig(source="checkpoint", disk_path=folder)``: each offloaded tensor is found by its name
in the folder's ``model.safetensors.index.json`` (or in its ``*.safetensors`` files) and read at its
byte offset straight into the slot, so nothing is written and the model never has to fit in RAM.
Plain tensors of any dtype are supported (float weights, GPTQ/AWQ integer buffers, fp8); quantized
tensor subclasses and state on attributes are saved under other names by their libraries: use the
layer cache (``source="disk"``) for them.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from .disk import MappedFile, Stamped, fresh_leaf, host_bytes, pread_into, read_header
from .errors import OffloadError
from .storage import Entry, Layout
from .tensors import typed_view

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
_FIX = "the checkpoint is damaged: restore it, or offload from a layer cache with source='disk'"


@dataclass
class _Read:
    file: int  # index into CheckpointFiles.files
    offset: int  # absolute file offset
    nbytes: int
    slot_offset: int
    itemsize: int


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            raise OffloadError(f"`{index}` is not a safetensors index (no weight_map): {_FIX}") from None
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("weightlift-"))
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


class CheckpointFiles:
    """The checkpoint's files, open, and for each offloaded layer the reads that fill its slot."""

    def __init__(self, folder: Path, files: list[Path], reads: dict[int, list[_Read]]) -> None:
        self.path, self.reads = folder, reads
        self.files = [Stamped(p) for p in files]
        self.mapping: CheckpointMapping | None = None
        self._by_leaf: dict[tuple[int, int], _Read] = {(i, r.slot_offset): r for i, rs in reads.items() for r in rs}

    @classmethod
    def open(cls, folder: Path, names: list[str], layouts: dict[int, Layout]) -> CheckpointFiles:
        """Locate every offloaded tensor in the checkpoint and check its dtype and shape against the model."""
        where = _tensor_files(folder)
        headers: dict[Path, tuple[dict, int]] = {}
        files: list[Path] = []
        reads: dict[int, list[_Read]] = {}
        for index, layout in layouts.items():
            for entry in layout.entries:
                name = f"{names[index]}.{entry.qualname}"
                if entry.parts.kind != "plain":
                    raise OffloadError(
                        f"`{name}` is a {entry.parts.kind}, which checkpoints store under other names: offload it "
                        "from a layer cache with source='disk'"
                    )
                if name not in where:
                    raise OffloadError(
                        f"`{name}` is not in the checkpoint in `{folder}` (it is incomplete, or names its tensors "
                        "otherwise, as after a format conversion): offload from a layer cache with source='disk'"
                    )
                path = where[name]
                if path not in headers:
                    headers[path] = read_header(path, _FIX)
                    files.append(path)
                header, data_start = headers[path]
                record = header.get(name)
                (spec,), (slot_offset,) = entry.specs, entry.offsets
                if record is None:
                    raise OffloadError(f"`{name}` is missing from `{path}` (the index names it): {_FIX}")
                dtype, shape = _SAFETENSORS_DTYPES.get(record.get("dtype")), list(record.get("shape", []))
                if dtype != spec.dtype or shape != list(spec.shape):
                    raise OffloadError(
                        f"`{name}` in `{path}` is {record.get('dtype')} {tuple(shape)}, the model's is "
                        f"{spec.dtype} {tuple(spec.shape)}: load the model in the checkpoint's dtype, or use "
                        "source='disk' to write a layer cache of the weights in memory"
                    )
                if not spec.is_contiguous():
                    raise OffloadError(f"`{name}` is not contiguous in the model: use source='disk' for it")
                begin, end = record["data_offsets"]
                if end - begin != spec.numel() * spec.element_size():
                    raise OffloadError(f"`{name}` in `{path}` has {end - begin} bytes for its shape: {_FIX}")
                if data_start + end > path.stat().st_size:
                    raise OffloadError(f"`{path}` is truncated: `{name}` ends past the end of the file; {_FIX}")
                read = _Read(files.index(path), data_start + begin, end - begin, slot_offset, spec.element_size())
                reads.setdefault(index, []).append(read)
        return cls(folder, files, reads)

    def read_into(self, index: int, slot: torch.Tensor) -> None:
        view = memoryview(slot.numpy()).cast("B")
        for r in self.reads[index]:
            file = self.files[r.file]
            file.check()
            pread_into(file.fd, view[r.slot_offset : r.slot_offset + r.nbytes], r.offset, file.path, f"layer {index}")

    def read_leaves(self, index: int, entry: Entry) -> list[torch.Tensor]:
        (spec,), (slot_offset,) = entry.specs, entry.offsets
        r = self._by_leaf[(index, slot_offset)]
        leaf, view = fresh_leaf(spec)
        pread_into(self.files[r.file].fd, view, r.offset, self.files[r.file].path, entry.qualname)
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
                    raise OffloadError(
                        f"`{entry.qualname}` of layer {index} differs from the checkpoint in `{self.path}`: the model "
                        "changed after loading; use source='disk' to write a layer cache of the weights in memory"
                    )

    def map(self) -> CheckpointMapping | None:
        """Map the checkpoint's files to compute on them in place; None when a tensor is not aligned to its
        element size in its file (then layers are read into slots instead)."""
        if any(r.offset % r.itemsize for reads in self.reads.values() for r in reads):
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
        r = self.checkpoint._by_leaf[(index, slot_offset)]
        return [typed_view(self.files[r.file].bytes, r.offset, spec)]

    def _advise(self, advice: int, index: int) -> None:
        for r in self.checkpoint.reads[index]:
            self.files[r.file].advise(advice, r.offset, r.nbytes)

    def willneed(self, index: int) -> None:
        self._advise(mmap.MADV_WILLNEED, index)

    def release(self, index: int) -> None:
        self._advise(mmap.MADV_DONTNEED, index)

    def close(self) -> None:
        for f in self.files:
            f.close()
