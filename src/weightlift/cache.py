"""What weightlift keeps in its cache folder, and removing it: what ``weightlift cache list/clear`` shows.

The folder (``$WEIGHTLIFT_CACHE`` or ``~/.cache/weightlift``, `plan.default_cache_dir`, or any
``disk_path``) holds two kinds of entries:

- layer caches, ``weightlift-<fingerprint>.safetensors`` directly in the folder: one per model and
  dtype (see `disk`), recognised by the ``format`` in their safetensors metadata;
- converted models, folders ``converted/<name>/`` holding a marker ``weightlift.json``
  (``{"format": "weightlift-converted", "source": ..., "dtype": ..., "created": ...}``);
- measured plans, ``plans/<key>.json``: what the CLI measured for a model, device and budget
  (`saved_plan`, `save_plan`), so that a second run starts without measuring again.

When an entry was last used is the mtime of its sidecar (``<file>.used`` next to a layer cache,
``.used`` inside a converted folder; `mark_used` touches it), else of the file or marker itself. Only
entries that carry weightlift's format are listed or removed: any other file in the folder is left
alone. A layer cache being written (``.weightlift-*.safetensors.tmp-<pid>``) is listed only once it is
more than a day old (a write that died; the next write of that cache removes it, holding its lock: see
`locks`). Lock files (``.<name>.lock``) are never listed: their holder removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .disk import FORMAT, VERSION, dtypes_of, mark_used, used_marker
from .errors import OffloadError
from .files import read_header

__all__ = ["CONVERTED_FORMAT", "CacheEntry", "clear", "entries", "mark_used", "plan_key", "save_plan", "saved_plan"]

log = logging.getLogger(__name__)

CONVERTED_FORMAT = "weightlift-converted"
MARKER = "weightlift.json"
_STALE_WRITE_S = 24 * 3600  # a temporary file of a write older than this is a write that died


@dataclass
class CacheEntry:
    """One thing weightlift keeps in its cache folder."""

    path: Path  # the layer cache file, the converted model's folder, or the plan file
    kind: str  # "layer cache", "converted model" or "measured plan"
    model: str  # the model's class name (layer cache) or the source file's name (converted model)
    dtype: str  # the dtypes of its weights, the most common first, comma-separated
    size: int  # bytes on disk (a folder: the sum of its files)
    last_used: datetime  # local time, timezone-aware

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "model": self.model, "dtype": self.dtype,
                "size": self.size, "last_used": self.last_used.isoformat(timespec="seconds")}  # fmt: skip


def _when(path: Path, fallback: Path) -> datetime:
    marker = used_marker(path)
    try:
        ts = marker.stat().st_mtime
    except OSError:
        ts = fallback.stat().st_mtime
    return datetime.fromtimestamp(ts).astimezone()


def _layer_cache(path: Path) -> CacheEntry | None:
    """The entry for a layer cache file, or None when it is not one of weightlift's."""
    try:
        header, _ = read_header(path)
    except OffloadError:
        return None
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    dtype = meta.get("dtypes")
    if not isinstance(dtype, str):  # an older format version: the dtypes are in the manifest
        try:
            dtype = ",".join(dtypes_of(json.loads(meta.get("manifest", "{}"))))
        except (TypeError, ValueError):
            dtype = "?"
    model = str(meta.get("model") or meta.get("stack") or "?")
    if meta.get("version") != VERSION:
        model += f" (format {meta.get('version')}, not read any more)"
    if not path.name.startswith("weightlift-"):
        model += " (unfinished write)"
    return CacheEntry(path, "layer cache", model, dtype.replace(",", ", "), path.stat().st_size, _when(path, path))


def _folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):  # symlinks to folders are not followed
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _converted(folder: Path) -> CacheEntry | None:
    """The entry for a converted model folder, or None when it carries no weightlift marker."""
    marker = folder / MARKER
    if folder.is_symlink() or not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != CONVERTED_FORMAT:
        return None
    source = str(info.get("source") or folder.name)
    return CacheEntry(folder, "converted model", Path(source).name, str(info.get("dtype", "?")),
                      _folder_size(folder), _when(folder, marker))  # fmt: skip


def entries(cache_dir: str | os.PathLike) -> list[CacheEntry]:
    """Every layer cache and converted model weightlift keeps in ``cache_dir``, oldest use first; none
    when the folder does not exist."""
    folder = Path(cache_dir).expanduser()
    if not folder.is_dir():
        return []
    found = []
    now = time.time()
    for path in sorted(folder.iterdir()):
        name = path.name
        cache = name.startswith("weightlift-") and name.endswith(".safetensors")
        died = name.startswith(".weightlift-") and ".safetensors.tmp-" in name  # a write in progress, or one that died
        if path.is_symlink() or not path.is_file() or not (cache or died):
            continue
        if died and now - path.stat().st_mtime < _STALE_WRITE_S:
            continue
        entry = _layer_cache(path)
        if entry is not None:
            found.append(entry)
    converted = folder / "converted"
    if converted.is_dir() and not converted.is_symlink():
        for sub in sorted(converted.iterdir()):
            if sub.is_dir():
                entry = _converted(sub)
                if entry is not None:
                    found.append(entry)
    plans = folder / "plans"
    if plans.is_dir() and not plans.is_symlink():
        for path in sorted(plans.glob("*.json")):
            entry = _plan_entry(path)
            if entry is not None:
                found.append(entry)
    return sorted(found, key=lambda e: e.last_used)


# ---------------------------------------------------------------------------------------------- measured plans


def plan_key(folder: Path, **what: object) -> str:
    """A name for the plan of checkpoint ``folder`` under ``what`` (device, budget ...): it changes when the
    folder's config or safetensors files change, or with weightlift's version."""
    import hashlib

    from . import __version__

    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    text = json.dumps([str(Path(folder).resolve()), stamp, sorted((k, str(v)) for k, v in what.items()), __version__])
    return f"{Path(folder).name}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"


def saved_plan(cache_dir: str | os.PathLike, key: str):
    """The `Plan` saved under ``key``, or None (none saved, or not readable as a plan)."""
    from .plan_data import Plan

    path = Path(cache_dir).expanduser() / "plans" / f"{key}.json"
    try:
        plan = Plan.from_json(path.read_text())
    except (OSError, UnicodeDecodeError, OffloadError):
        return None
    mark_used(path)
    return plan


def save_plan(cache_dir: str | os.PathLike, key: str, plan) -> Path | None:
    """Save ``plan`` under ``key`` (atomically); None, with a log line, when the cache is not writable."""
    folder = Path(cache_dir).expanduser() / "plans"
    path = folder / f"{key}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.json.tmp-{os.getpid()}"
        tmp.write_text(plan.to_json())
        os.replace(tmp, path)
    except OSError as err:
        log.warning("weightlift: could not save the plan in %s (%s): the next run measures again", folder, err)
        return None
    mark_used(path)
    return path


def _plan_entry(path: Path) -> CacheEntry | None:
    from .config import format_size

    try:
        data = json.loads(path.read_text())
        model = f"{data['model']} ({data['device']}, budget {format_size(int(data['budget']))})"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return CacheEntry(path, "measured plan", model, "-", path.stat().st_size, _when(path, path))


def _check_age(older_than_days: float | None) -> None:
    if older_than_days is None:
        return
    if isinstance(older_than_days, bool) or not isinstance(older_than_days, (int, float)) or not math.isfinite(
        older_than_days
    ) or older_than_days < 0:  # fmt: skip
        raise OffloadError(f"`older_than_days` must be a number of days >= 0, got {older_than_days!r}")


def clear(
    cache_dir: str | os.PathLike, model: str | None = None, older_than_days: float | None = None
) -> list[CacheEntry]:
    """Remove the entries of ``cache_dir`` whose model name contains ``model`` (case-insensitive; None:
    any) and that were last used more than ``older_than_days`` days ago (None: whenever); the removed
    entries. Files that are not weightlift's are never touched."""
    _check_age(older_than_days)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    wanted = None if model is None else model.casefold()
    removed = []
    for entry in entries(cache_dir):
        if wanted is not None and wanted not in entry.model.casefold():
            continue
        if cutoff is not None and entry.last_used.timestamp() > cutoff:
            continue
        try:
            if entry.kind == "converted model":
                shutil.rmtree(entry.path)
            elif entry.kind == "measured plan":
                entry.path.unlink()
                used_marker(entry.path).unlink(missing_ok=True)
            else:
                entry.path.unlink()
                used_marker(entry.path).unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # removed meanwhile (another process)
        except OSError as err:
            raise OffloadError(
                f"cannot remove `{entry.path}`: {err.strerror or err}; check its permissions "
                f"({len(removed)} entries removed before it)"
            ) from None
        log.info("weightlift: removed %s %s (%d bytes)", entry.kind, entry.path, entry.size)
        removed.append(entry)
    return removed
