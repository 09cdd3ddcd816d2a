"""How a command gets its model: the checkpoint folder (converted once when it must be), the whole model
in memory, or the model streamed under a budget or a saved plan (the measured plan kept in the cache);
each step a phase with its seconds (``-v``), libraries' progress bars only on a terminal."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import time
from pathlib import Path

import torch

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


def stream(args: argparse.Namespace, device, saved=None, folder: Path | None = None, reuse: bool = True):
    """The model with the layers a plan offloads streamed from its checkpoint, never read whole: the plan
    for ``--budget`` (measured here, or by an earlier run with ``reuse``: kept in the cache) or the saved
    ``--plan``. ``(model, handle)``."""
    from .cache import plan_key, save_plan, saved_plan
    from .hf import load_streaming

    folder = folder or folder_of(args, stream=True)
    host_budget = getattr(args, "host_budget", None)
    budget, key = None if saved is not None else args.budget, None
    if budget is not None:  # what an earlier run measured for this model, device and budget
        key = plan_key(folder, device=device, budget=budget, host_budget=host_budget, dtype=dtype_of(args))
        saved = saved_plan(args.cache_dir, key) if reuse else None
        if saved is not None:
            log.info("reusing the plan measured for --budget %s (`weightlift cache clear` removes it)", budget)
            budget = None
    what = f"planning for --budget {budget} (measuring this machine and model, streamed)" if budget else "loading"
    with phase(f"{what}; the offloaded layers stream from {folder}"):
        try:
            model, handle = load_streaming(folder, budget=budget, host_budget=host_budget, plan=saved, device=device,
                                           dtype=dtype_of(args))  # fmt: skip
        except OffloadError:
            if key is None or budget is not None:
                raise
            log.info("the saved plan no longer fits this model: planning again")  # a changed model
            model, handle = load_streaming(folder, budget=args.budget, host_budget=host_budget, device=device,
                                           dtype=dtype_of(args))  # fmt: skip
    if key is not None and budget is not None:
        save_plan(args.cache_dir, key, handle.plan)
    return model, handle
