"""Converting a GGUF file, once, into an ordinary transformers checkpoint folder in the cache.

transformers loads a ``.gguf`` by dequantizing every tensor into one state dict in RAM. ``convert_gguf``
does the same conversion one tensor at a time and writes one safetensors shard per layer of the layer
stack (plus one for everything else), so it never holds more than one layer and the tensor being
dequantized. The names and the tensor processing (Llama's q/k reverse permutation, merged experts ...)
are transformers' own (``modeling_gguf_pytorch_utils``): a model loaded from the folder equals
``from_pretrained(parent, gguf_file=name)`` bit for bit. Later runs load the folder quickly, and the
checkpoint tier streams its layers in place.

The folder is written beside its final place and renamed into it when complete, with a marker
(``weightlift.json``) that says which file, size and mtime it was converted from: a killed conversion
never leaves a folder a later run would trust, and a changed GGUF is converted again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import locks
from .checkpoint import SAFETENSORS_DTYPES, checkpoint_files, save_aligned
from .config import format_size
from .disk import mark_used
from .errors import OffloadError
from .files import read_header

log = logging.getLogger(__name__)

MARKER = "weightlift.json"
FORMAT = "weightlift-converted"
VERSION = 2  # 2: shards written aligned (checkpoint.save_aligned), so that they are mapped in place
_BLOCK = re.compile(r"(?:^|\.)blk\.(\d+)\.")  # GGUF's standard name of a layer's tensors: blk.N.*


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _source(path: Path) -> dict:
    """What identifies the GGUF a conversion came from."""
    stat = path.stat()
    return {"source": str(path.resolve()), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def converted_folder(path: Path, *, dtype: torch.dtype, cache_dir: Path) -> Path:
    """Where the conversion of GGUF ``path`` to ``dtype`` lives: cache_dir / "converted" / f"{stem}-{key}-{dtype_name}"
    (key: a short hash of the resolved path, size and mtime of the GGUF)."""
    path = Path(path).expanduser()
    src = _source(path)
    key = hashlib.sha256(f"{src['source']}\0{src['source_size']}\0{src['source_mtime_ns']}".encode()).hexdigest()
    return Path(cache_dir).expanduser() / "converted" / f"{path.stem}-{key[:12]}-{_dtype_name(dtype)}"


def _marker(path: Path, dtype: torch.dtype) -> dict:
    try:
        import transformers
    except ImportError:  # checked first: the marker is made before anything else needs transformers
        raise OffloadError("converting a GGUF model needs the extra: `pip install 'weightlift[hf]'`") from None

    return {"format": FORMAT, "version": VERSION, **_source(path), "dtype": _dtype_name(dtype),
            "transformers": transformers.__version__}  # fmt: skip


def _trusted(folder: Path, expected: dict) -> bool:
    """Whether ``folder`` holds a complete conversion of what ``expected`` describes."""
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and all(found.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _writing(cache_dir: Path, needed: int | None = None):
    """Turn a failed write (no space, read-only, not a folder) into an OffloadError naming `cache_dir`."""
    try:
        yield
    except Exception as exc:
        # safetensors reports a failed write (disk full) as its own SafetensorError, not an OSError
        if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
            raise
        need = f" (the conversion needs about {needed / 2**20:.0f} MB)" if needed else ""
        raise OffloadError(
            f"cannot write the converted model into `cache_dir`={str(cache_dir)!r}: {exc}{need}; "
            "free space there or give another, writable `--cache-dir`/`cache_dir`"
        ) from None


_NOT_GGUF = "give a complete .gguf file (download it again if it was cut short)"


def _gguf_config(path: Path) -> dict:
    """transformers' config dict of the GGUF (``load_gguf_checkpoint``), or an OffloadError if it is not one."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        raise OffloadError("converting a GGUF model needs the extra: `pip install 'weightlift[hf]'`") from None
    try:
        return load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise OffloadError(f"`model`={str(path)!r} is not a readable GGUF file ({exc}): {_NOT_GGUF}") from None


def _open(path: Path):
    """A memory-mapped ``gguf.GGUFReader`` of ``path`` for its tensors, checked to hold all of their bytes."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise OffloadError(f"`model`={str(path)!r} is not a readable GGUF file ({exc}): {_NOT_GGUF}") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise OffloadError(f"`model`={str(path)!r} is truncated: {_NOT_GGUF}")
    # the parsed metadata (the vocabulary and merges: ~100k small arrays) is not needed past here
    for key in [k for k in reader.fields if k.startswith("tokenizer.")]:
        del reader.fields[key]
    return reader


def _dequantize(tensor, chunk_bytes: int = 16 * 2**20):
    """``gguf.dequantize`` of one tensor, a few rows at a time into one float32 array: the whole tensor
    at once would hold a second full-size temporary (the embeddings, twice)."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    data, kind = tensor.data, tensor.tensor_type
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
    if kind in plain or data.ndim < 2 or data.nbytes <= chunk_bytes:
        return dequantize(data, kind)
    first = dequantize(data[:1], kind)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    step = max(1, chunk_bytes // max(1, first.nbytes))
    for row in range(0, data.shape[0], step):
        out[row : row + step] = dequantize(data[row : row + step], kind)
    return out


def _drop_pages(reader) -> None:
    """Let go of the mapped file's pages read so far (they stay in the page cache), so that the process'
    resident size does not grow to the size of the GGUF file as its tensors are read."""
    mapped = getattr(reader.data, "_mmap", None)  # np.memmap's mmap object
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapped.madvise(mmap.MADV_DONTNEED)


def _groups(reader) -> list[list]:
    """The file's tensors in shards: everything outside the layer stack first, then one list per layer."""
    other, layers = [], {}
    for tensor in reader.tensors:
        m = _BLOCK.search(tensor.name)
        if m is None:
            other.append(tensor)
        else:
            layers.setdefault(tensor.name[: m.end()], []).append(tensor)
    return [other, *layers.values()]


def convert_gguf(path: str | Path, *, dtype: torch.dtype = torch.float32, cache_dir: Path) -> Path:
    """The folder (converted_folder) holding config.json, generation_config.json, the tokenizer files
    (tokenizer.save_pretrained: tokenizer.json etc.), model.safetensors.index.json and one safetensors shard per
    layer of the layer stack plus one shard for everything else, and a marker `weightlift.json` (format
    "weightlift-converted", version, source path, source size, source mtime_ns, dtype, created). Reused as it is
    when the marker matches; else written to a temporary folder beside it and renamed into place atomically
    (a failed/killed conversion never leaves a folder a later run would trust)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OffloadError(f"`model`={str(path)!r} is not a file: give the path of a .gguf file")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OffloadError(f"`dtype`={dtype!r} is not a floating-point torch dtype: give torch.float32 or bfloat16")
    cache_dir = Path(cache_dir).expanduser()
    folder = converted_folder(path, dtype=dtype, cache_dir=cache_dir)
    return _converted(path, dtype, folder, _marker(path, dtype), cache_dir, _write)


def _converted(path: Path, dtype: torch.dtype, folder: Path, expected: dict, cache_dir: Path, write) -> Path:
    """``folder`` as ``write(path, dtype, out, cache_dir)`` makes it, reused when its marker is ``expected``,
    else written beside it, under the folder's lock (`locks`: a second process waits, then reuses it), and
    renamed into place."""
    if not _trusted(folder, expected):
        with locks.writing(folder) as alone:
            if not _trusted(folder, expected):  # the process waited for may have converted it
                return _convert(path, dtype, folder, expected, cache_dir, write, alone)
    log.info("using the converted %s in %s", path.name, folder)
    mark_used(folder)
    return folder


def _convert(path: Path, dtype: torch.dtype, folder: Path, expected: dict, cache_dir: Path, write,
             alone: bool) -> Path:  # fmt: skip
    """`_converted`'s write. ``alone``: the lock is held, no other conversion of ``folder`` is in progress,
    so the temporary folders beside it are of conversions that died, and are removed."""
    for dead in folder.parent.glob(f".{folder.name}.*.tmp") if alone else ():
        if "." in dead.name[len(folder.name) + 2 : -4]:  # another folder's (mkdtemp's names have no dot)
            continue
        log.info("removing %s, left by a conversion that died", dead)
        shutil.rmtree(dead, ignore_errors=True)
    with _writing(cache_dir):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    log.info("converting %s (%.0f MB) to %s into %s", path, path.stat().st_size / 2**20, _dtype_name(dtype), folder)
    start = time.perf_counter()
    try:
        written = write(path, dtype, tmp, cache_dir)
        with _writing(cache_dir):
            created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            (tmp / MARKER).write_text(json.dumps({**expected, "created": created}, indent=1))
            if folder.exists():  # a stale conversion (another transformers, an older format): replaced
                shutil.rmtree(folder)
            try:
                os.replace(tmp, folder)
            except OSError:  # where no lock could be had, another process finishing it first is fine
                if not _trusted(folder, expected):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.warning("weightlift: converted %s to %s in %.1f s: %s written to %s (`weightlift cache list` shows it, "
                "`weightlift cache clear` removes it)", path.name, _dtype_name(dtype), time.perf_counter() - start,
                format_size(written), folder)  # fmt: skip
    mark_used(folder)
    return folder


def _write(path: Path, dtype: torch.dtype, out: Path, cache_dir: Path) -> int:
    """Write the checkpoint of GGUF ``path`` into ``out``; the bytes of tensors written.

    The conversion is transformers' legacy GGUF loader (``load_gguf_checkpoint(..., return_tensors=True)``),
    tensor by tensor: ``gguf.dequantize``, the architecture's ``TensorProcessor``, the gguf -> transformers
    name map of the model class, and the cast to ``dtype``. Processors that write tensors themselves
    (merged MoE experts, GPT-2's lm_head) write them into the current shard; the tensors they merge are
    of one layer, so a shard is complete when its layer is.

    The file is opened six times: four full ``GGUFReader`` parses of its metadata (the config, the
    tensors, and two for the tokenizer) and two quick header reads (the tokenizer's). Only the tensors'
    reader stays open, with the vocabulary it parsed dropped, so that the other parses are transient and
    freed before any tensor is dequantized.
    """
    import numpy as np
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = _open(path)
    architecture = reader.fields["general.architecture"].contents()
    if is_gguf_arch_supported(architecture):
        # transformers' newer loader (weight conversions applied while loading) handles these; its ops are
        # not the legacy processors, so converting them here would not be bit for bit what it loads
        raise OffloadError(
            f"`model`={str(path)!r}: converting GGUF architecture {architecture!r} is not supported yet; "
            "load it without `cache_dir`/`--cache-dir` (transformers dequantizes it in RAM)"
        )
    raw = _gguf_config(path)  # the dict the processors read (Bloom's `n_head` is not a config attribute)
    config = AutoConfig.for_model(**raw)
    config.dtype = dtype
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise OffloadError(f"`model`={str(path)!r} is not a causal LM transformers knows: {exc}") from None
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=raw)
    names = get_gguf_hf_weights_map(model, processor)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    needed = sum(int(t.n_elements) for t in reader.tensors) * dtype.itemsize
    with _writing(cache_dir, needed):
        free = shutil.disk_usage(out).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"{free / 2**20:.0f} MB free")

    groups = _groups(reader)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, written = {}, 0
    bar = tqdm(total=len(reader.tensors), desc=f"weightlift: converting {path.name}", unit="tensor", disable=None)
    with bar, _writing(cache_dir, needed):
        for file, group in zip(files, groups):
            shard = {}
            parsed = {"tensors": shard, "config": raw}
            for tensor in group:
                result = processor.process(
                    weights=_dequantize(tensor), name=tensor.name,
                    tensor_key_mapping=names, parsed_parameters=parsed,
                )  # fmt: skip
                weights = result.weights
                if result.name in names:
                    if not (weights.flags.writeable and weights.flags.c_contiguous):  # a view of the mapped file
                        weights = np.copy(weights)
                    shard[names[result.name]] = torch.from_numpy(weights).to(dtype)
                elif result.name is not None:
                    log.debug("%s: GGUF tensor %s has no place in %s", path.name, result.name, type(model).__name__)
                del result, weights  # the float32 values, before the next tensor is dequantized
                bar.update()
            shard = {name: t.to(dtype).contiguous() for name, t in shard.items()}  # processor-written ones too
            if shard:
                save_aligned(shard, out / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
                written += sum(t.numel() * t.element_size() for t in shard.values())
            del shard, parsed
            _drop_pages(reader)
        del reader
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(out)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return written


# ---------------------------------------------------------------------------------------------- another dtype


def checkpoint_dtypes(folder: str | Path) -> set[torch.dtype]:
    """The floating-point dtypes a checkpoint folder stores its tensors in (read from the headers only)."""

    found = set()
    for file in checkpoint_files(Path(folder)):
        header, _ = read_header(file, "the model file is damaged: download or save the model again")
        for key, record in header.items():
            dtype = SAFETENSORS_DTYPES.get(record.get("dtype")) if key != "__metadata__" else None
            if dtype is not None and dtype.is_floating_point:
                found.add(dtype)
    return found


def _folder_marker(folder: Path, dtype: torch.dtype) -> dict:
    stats = [f.stat() for f in checkpoint_files(folder)]
    return {"format": FORMAT, "version": VERSION, "source": str(folder.resolve()),
            "source_size": sum(st.st_size for st in stats), "dtype": _dtype_name(dtype),
            "source_mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}  # fmt: skip


def convert_folder(folder: str | Path, *, dtype: torch.dtype, cache_dir: Path) -> Path:
    """A copy of checkpoint ``folder`` with its floating-point tensors in ``dtype``, in the cache
    (``cache_dir/converted/<name>-<key>-<dtype>``): what the checkpoint tier streams from when the model
    is wanted in another dtype than it was saved in (it reads the bytes as stored). Written once, a few
    tensors at a time (at most 64 MiB of them in memory), with the folder's other files (config.json
    names the new dtype); reused while the folder's safetensors files are unchanged."""
    folder = Path(folder).expanduser()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise OffloadError(f"`dtype`={dtype!r} is not a floating-point torch dtype: give torch.float32 or bfloat16")
    cache_dir = Path(cache_dir).expanduser()
    expected = _folder_marker(folder, dtype)
    key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir / "converted" / f"{folder.name}-{key}-{_dtype_name(dtype)}"
    return _converted(folder, dtype, out, expected, cache_dir, _write_folder)


def _write_folder(folder: Path, dtype: torch.dtype, out: Path, cache_dir: Path, cap: int = 64 * 2**20) -> int:
    """Write ``folder``'s checkpoint in ``dtype`` into ``out``, in shards of at most ``cap`` bytes (or one
    tensor); the bytes of tensors written."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    files = checkpoint_files(folder)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    written = held = 0

    def flush() -> None:
        nonlocal written, held
        if shard:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_aligned(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            written += held
            shard.clear()
            held = 0

    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"weightlift: converting {folder.name}", disable=None)
    with bar, _writing(cache_dir, total):
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    t = f.get_tensor(key)
                    bar.update(t.numel() * t.element_size())
                    t = (t.to(dtype) if t.is_floating_point() else t).contiguous()
                    if held and held + t.numel() * t.element_size() > cap:
                        flush()
                    shard[key] = t
                    held += t.numel() * t.element_size()
                    del t
        flush()
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        skip = {"model.safetensors.index.json", MARKER, "config.json", ".used"}
        for other in folder.iterdir():
            if other.is_file() and other.suffix != ".safetensors" and other.name not in skip:
                shutil.copy2(other, out / other.name)
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = _dtype_name(dtype)
        config.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return written
