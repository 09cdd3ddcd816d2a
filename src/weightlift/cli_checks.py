"""The command line's checks, made before any model is loaded or measured (and before transformers is
imported): numeric ranges, conflicting options, output paths, the cache folder, the device, the model's
files, budgets and a saved plan; and library errors put in the CLI's words. Each failure is an
`OffloadError` that `cli.main` prints as one line."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .errors import OffloadError

# OffloadError messages name the library's arguments in backticks; on the command line they are flags.
_FLAGS = {
    "budget": "--budget", "host_budget": "--host-budget", "disk_path": "--cache-dir", "device": "--device",
    "plan": "--plan", "source": "--source", "prefetch_step": "--prefetch-step", "group_size": "--group-size",
    "num_in_group": "--num-in-group", "model": "MODEL", "dtype": "--dtype",
}  # fmt: skip
_PHRASES = [
    ("weightlift.plan(model, ...)", "`weightlift plan MODEL --budget SIZE --out FILE`"),
    ("weightlift.plan()", "`weightlift plan MODEL --budget SIZE --out FILE`"),
    ("`plan.to_json()`", "`weightlift plan MODEL --budget SIZE --out FILE`"),
    ("source='disk'", "`--source disk`"),
]


def cli_words(message: str) -> str:
    """A library error message with the argument names it gives in backticks turned into the CLI's flags."""
    for python, flag in _PHRASES:
        message = message.replace(python, flag)
    return re.sub(r"`([a-z_]+)`", lambda m: f"`{_FLAGS.get(m[1], m[1])}`", message)


def check_budgets(args: argparse.Namespace):
    """Budgets and a saved plan, checked before any model is loaded: the saved plan, if any."""
    from .config import parse_size
    from .plan_data import Plan

    for name in ("budget", "host_budget"):
        if getattr(args, name, None) is not None:
            parse_size(getattr(args, name), name=name)
    if getattr(args, "plan", None):
        try:
            text = Path(args.plan).read_text()
        except OSError as e:
            raise OffloadError(f"`--plan`={args.plan!r} cannot be read ({e.strerror}): give a file from "
                               "`weightlift plan --out`") from None  # fmt: skip
        return Plan.from_json(text)
    return None


_RANGES = [  # (dest, flag, what it must be, test)
    ("tokens", "--tokens", ">= 1", lambda v: v >= 1),
    ("temperature", "--temperature", ">= 0 (0: greedy)", lambda v: v >= 0),
    ("top_p", "--top-p", "in (0, 1]", lambda v: 0 < v <= 1),
    ("threads", "--threads", ">= 1", lambda v: v >= 1),
    ("group_size", "--group-size", ">= 1", lambda v: v >= 1),
    ("prefetch_step", "--prefetch-step", ">= 0", lambda v: v >= 0),
]
BENCH_KNOBS = {"group_size": 1, "num_in_group": 1, "prefetch_step": 2, "tokens": 16}  # defaults without --budget


def _given(args: argparse.Namespace, dest: str) -> bool:
    return getattr(args, dest, None) is not None


def _check_conflicts(args: argparse.Namespace) -> None:
    """Options that would be silently ignored together are refused, naming both and the fix."""
    if _given(args, "host_budget") and not _given(args, "budget"):
        raise OffloadError("`--host-budget` is used only with `--budget`: add `--budget SIZE` or drop `--host-budget`")
    command = args.command
    if command == "bench" and _given(args, "budget"):
        for dest in ("group_size", "num_in_group", "prefetch_step", "tokens", "source", "plot"):
            if _given(args, dest):
                flag = "--" + dest.replace("_", "-")
                raise OffloadError(
                    f"`{flag}` is not used by `weightlift bench --budget` (the plan chooses what to offload and "
                    f"times fixed prefill and decode forwards): drop `{flag}`, or drop `--budget` to bench the "
                    "offload set by hand"
                )
    if command == "generate":
        if _given(args, "plan") and _given(args, "budget"):
            raise OffloadError(
                "`--plan` and `--budget` both decide what is offloaded (a saved plan keeps the budget it was made "
                "for): drop `--budget` to apply the saved plan, or drop `--plan` to plan anew for the budget"
            )
        if _given(args, "top_p") and not args.temperature:
            raise OffloadError(
                "`--top-p` applies only when sampling: add `--temperature T` (T > 0), or drop `--top-p` for greedy"
            )


def _check_writable(flag: str, value: str | None) -> None:
    """An output file: its folder exists and is writable, and it is not a folder itself."""
    if value is None:
        return
    path = Path(value).expanduser()
    if path.is_dir():
        raise OffloadError(f"`{flag}`={value!r} is a folder: give a file name, e.g. {str(path / 'out')!r}")
    parent = path.parent
    if not parent.is_dir():
        raise OffloadError(f"`{flag}`={value!r}: the folder `{parent}` does not exist; create it or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OffloadError(f"`{flag}`={value!r} is not writable here: write the file elsewhere")


def _check_cache_dir(args: argparse.Namespace) -> None:
    """A layer cache folder that will be written: a folder, or creatable under a writable one."""
    folder = getattr(args, "cache_dir", None)
    if folder is None or getattr(args, "source", None) in ("host", "checkpoint"):
        return
    if args.command == "generate" and not (_given(args, "budget") or _given(args, "plan")):
        return  # everything resident: no cache
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise OffloadError(f"`--cache-dir`={folder!r} is a file: give a folder for the layer cache")
    above = path
    while not above.exists() and above != above.parent:
        above = above.parent
    if not path.exists() and not os.access(above, os.W_OK | os.X_OK):
        raise OffloadError(f"`--cache-dir`={folder!r} cannot be created (`{above}` is not writable): give a "
                           "writable folder")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Everything about the command line that can be wrong, checked before any model is loaded or measured
    (and before transformers is imported): ranges, conflicts, output paths, the device, the model, budgets
    and a saved plan. Fills in the defaults of options whose absence the checks need to see."""
    from .config import resolve_device
    from .hf import check_model

    for dest, flag, what, ok in _RANGES:
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise OffloadError(f"`{flag}` must be {what}, got {value}")
    if _given(args, "num_in_group"):
        group = args.group_size if _given(args, "group_size") else BENCH_KNOBS["group_size"]
        if not 0 <= args.num_in_group <= group:
            raise OffloadError(f"`--num-in-group` must be between 0 and `--group-size` ({group}), "
                               f"got {args.num_in_group}")  # fmt: skip
    _check_conflicts(args)
    for dest in ("out", "plot", "trace"):
        _check_writable("--" + dest, getattr(args, dest, None))
    if _given(args, "plot"):
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise OffloadError("`--plot` needs matplotlib: `pip install 'weightlift[plot]'`, or drop `--plot`")
    _check_cache_dir(args)
    if hasattr(args, "device"):
        resolve_device(args.device)
    if _given(args, "model") and args.command != "cache":  # `cache clear MODEL` filters names, names no path
        check_model(args.model)
    check_budgets(args)
    if args.command == "bench" and not _given(args, "budget"):
        for dest, default in BENCH_KNOBS.items():
            if not _given(args, dest):
                setattr(args, dest, default)


