"""How a command gets its model: the checkpoint folder (converted once when it must be), the whole model
in memory, or the model streamed under a budget or a saved plan (the measured plan kept in the cache);
each step a phase with its seconds (``-v``), libraries' progress bars only on a terminal."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import sys
import time
from pathlib import Path

import torch

from .config import format_size
from .errors import OffloadError

log = logging.getLogger(__name__)


def quiet():
    """Libraries' progress bars are shown only on a terminal (quiet when piped)."""
    if sys.stderr.isatty():
        return contextlib.nullcontext()
    return contextlib.redirect_stderr(io.StringIO())  # tqdm bars write to sys.stderr; logging keeps its stream


def dtype_of(args: argparse.Namespace):
    name = getattr(args, "dtype", None)
    return getattr(torch, name) if name else None


@contextlib.contextmanager
def phase(what: str):
    """One phase of a command: announced on a terminal, logged with its seconds (``-v``)."""
    if sys.stderr.isatty() and not log.isEnabledFor(logging.INFO):
        print(f"weightlift: {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    log.info("%s: %.2f s", what, time.perf_counter() - start)


def folder_of(args: argparse.Namespace, stream: bool = False) -> Path:
    """The model's checkpoint folder: a GGUF file is converted into the cache once (shown by its own bar),
    and so is a folder to ``stream`` in another ``--dtype`` than it was saved in."""
    from .hf import model_folder

    return model_folder(args.model, dtype=dtype_of(args), cache_dir=getattr(args, "cache_dir", None), stream=stream)


def load_model(args: argparse.Namespace, folder: Path):
    """The whole model of checkpoint ``folder`` in memory."""
    from transformers import AutoModelForCausalLM

    with phase(f"loading {args.model}" + (f" as {args.dtype}" if getattr(args, "dtype", None) else "")), quiet():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype_of(args) or "auto").eval()


def load(args: argparse.Namespace):
    """The whole model in memory, and its tokenizer (None when the folder has none)."""
    from .hf import tokenizer_of

    folder = folder_of(args)
    model = load_model(args, folder)
    with quiet():
        return model, tokenizer_of(folder)


def weights_bytes(folder: Path, dtype: torch.dtype | None) -> int:
    """What the model of checkpoint ``folder`` holds in memory loaded in ``dtype`` (None: as saved), from its
    safetensors headers (nothing read but them)."""
    from .dtypes import dtype_size
    from .files import read_header

    item, total = dtype_size(dtype) if dtype is not None else None, 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, _ = read_header(path, "download or save the model again")
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            begin, end = entry["data_offsets"]
            floating = entry["dtype"] in ("F16", "BF16", "F32", "F64")
            total += math.prod(entry["shape"]) * item if item is not None and floating else end - begin
    return total


def fitting_budget(args: argparse.Namespace, folder: Path, device, reserve) -> int | None:
    """For a run given no ``--budget``: None when the weights and the run (``reserve``: its KV cache and
    activations) fit in what this machine has now less a margin (`machine.room`): it runs resident. Else that
    figure as the budget to stream within."""
    from .machine import free_memory, room

    available, where = free_memory(device)
    weights = weights_bytes(folder, dtype_of(args))
    need = weights + reserve.nbytes
    run = (f"weights {format_size(weights)} + KV cache {format_size(reserve.kv_cache_bytes)} for {reserve.tokens} "
           f"tokens + activations {format_size(reserve.activation_bytes)}")  # fmt: skip
    if available is None:
        log.info("%s needs %s; the free memory of %s is unknown: loading it whole (pass --budget to stream it)",
                 args.model, run, device)  # fmt: skip
        return None
    budget = room(available)
    if need <= budget:
        log.info("%s fits: %s = %s of the %s of %s less a margin; it runs resident", args.model, run,
                 format_size(need), format_size(budget), where)  # fmt: skip
        return None
    log.warning("weightlift: %s needs %s = %s, more than the %s of %s less a margin (%s): streaming it within "
                "a budget of %s (pass --budget to choose another)", args.model, run, format_size(need),
                format_size(available), where, format_size(available - budget), format_size(budget))  # fmt: skip
    return budget


def stream(args: argparse.Namespace, device, saved=None, folder: Path | None = None, reuse: bool = True,
           reserve=None):  # fmt: skip
    """The model with the layers a plan offloads streamed from its checkpoint, never read whole: the plan
    for ``--budget`` (measured here, or by an earlier run with ``reuse``: kept in the cache) or the saved
    ``--plan``. ``reserve``: what the run holds besides the weights, inside the budget. ``(model, handle)``."""
    from .cache import plan_key, save_plan, saved_plan
    from .hf import load_streaming

    folder = folder or folder_of(args, stream=True)
    host_budget = getattr(args, "host_budget", None)
    budget, key = None if saved is not None else args.budget, None
    if budget is not None:  # what an earlier run measured for this model, device and budget
        run = -(-reserve.nbytes // (16 << 20)) * (16 << 20) if reserve is not None else 0  # to 16 MiB, up
        key = plan_key(folder, device=device, budget=budget, host_budget=host_budget, dtype=dtype_of(args), run=run)
        saved = saved_plan(args.cache_dir, key) if reuse else None
        if saved is not None:
            log.info("reusing the plan measured for --budget %s (`weightlift cache clear` removes it)", budget)
            budget = None
    what = f"planning for --budget {budget} (measuring this machine and model, streamed)" if budget else "loading"
    with phase(f"{what}; the offloaded layers stream from {folder}"):
        try:
            model, handle = load_streaming(folder, budget=budget, host_budget=host_budget, plan=saved, device=device,
                                           dtype=dtype_of(args), reserve=reserve)  # fmt: skip
        except OffloadError:
            if key is None or budget is not None:
                raise
            log.info("the saved plan no longer fits this model: planning again")  # a changed model
            model, handle = load_streaming(folder, budget=args.budget, host_budget=host_budget, device=device,
                                           dtype=dtype_of(args), reserve=reserve)  # fmt: skip
    if key is not None and budget is not None:
        save_plan(args.cache_dir, key, handle.plan)
    return model, handle
